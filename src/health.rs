//! Upstream health: the rise/fall state machine, and the thread that probes upstreams.
//!
//! An upstream turns DOWN after `fall` consecutive failed checks and UP after `rise` consecutive
//! successful ones. Checks come from two places: the active prober (a TCP connect every
//! `interval`, bounded by `timeout`) and the balancer, which reports a failed connect while
//! serving a client as a failed check, so a dead upstream can go DOWN between probe rounds. The
//! resulting UP/DOWN flag lives in the connection table, where the least-connection choice reads
//! it under the same lock as the counts.
//!
//! One dedicated thread owns the probe schedule. A round's probes run concurrently on short-lived
//! scoped threads, so a round over many upstreams, some of them black holes, takes about one
//! `timeout`, not one per dead upstream. The thread sleeps on a channel, so stopping it is
//! immediate.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use crate::config::{DEFAULT_FALL, DEFAULT_RISE};
use crate::table::{ConnTable, UpstreamId};

#[derive(Debug, Clone, Copy)]
struct Tracker {
    up: bool,
    /// Consecutive checks that disagreed with `up`.
    streak: u32,
}

/// The health state of every upstream.
pub struct Health {
    names: Mutex<Vec<String>>,
    table: Arc<ConnTable>,
    thresholds: Mutex<(u32, u32)>,
    trackers: Mutex<Vec<Tracker>>,
    listener: Mutex<Option<Listener>>,
}

/// Called after an upstream flips, with its id and new state (true = UP).
pub type Listener = Box<dyn Fn(UpstreamId, bool) + Send + Sync>;

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("names", &self.names)
            .field("trackers", &self.trackers)
            .finish_non_exhaustive()
    }
}

impl Health {
    /// Health for upstreams named `names` (ids are indices), all UP, writing UP/DOWN into
    /// `table`. Thresholds start at the defaults (rise 2, fall 3).
    pub fn new(names: Vec<String>, table: Arc<ConnTable>) -> Health {
        let trackers = vec![
            Tracker {
                up: true,
                streak: 0
            };
            names.len()
        ];
        Health {
            names: Mutex::new(names),
            table,
            thresholds: Mutex::new((DEFAULT_RISE, DEFAULT_FALL)),
            trackers: Mutex::new(trackers),
            listener: Mutex::new(None),
        }
    }

    /// Adds an upstream (UP) with the next id; returns that id. Matches [`ConnTable::add`].
    pub fn add(&self, name: &str) -> UpstreamId {
        let mut names = self.names.lock();
        names.push(name.to_string());
        self.trackers.lock().push(Tracker {
            up: true,
            streak: 0,
        });
        UpstreamId(names.len() - 1)
    }

    /// The name of an upstream, for logs.
    pub fn name(&self, id: UpstreamId) -> String {
        self.names
            .lock()
            .get(id.0)
            .cloned()
            .unwrap_or_else(|| format!("#{}", id.0))
    }

    /// Sets the function told of every flip (for example, to close a DOWN upstream's sessions).
    pub fn set_listener(&self, listener: Listener) {
        *self.listener.lock() = Some(listener);
    }

    /// Removes the function set by [`Health::set_listener`].
    pub fn clear_listener(&self) {
        *self.listener.lock() = None;
    }

    /// Sets the consecutive successes (`rise`) and failures (`fall`) that flip an upstream.
    pub fn set_thresholds(&self, rise: u32, fall: u32) {
        *self.thresholds.lock() = (rise.max(1), fall.max(1));
    }

    /// Records one check of `id`. Returns `Some(new_state)` when this check flipped it.
    /// Logs each flip once, with `detail` (the failure) when it went DOWN.
    pub fn observe(&self, id: UpstreamId, ok: bool, detail: &str) -> Option<bool> {
        let (rise, fall) = *self.thresholds.lock();
        let flipped = {
            let mut trackers = self.trackers.lock();
            let t = trackers.get_mut(id.0)?;
            if ok == t.up {
                t.streak = 0;
                return None;
            }
            t.streak += 1;
            let needed = if t.up { fall } else { rise };
            if t.streak < needed {
                return None;
            }
            t.up = ok;
            t.streak = 0;
            self.table.set_up(id, ok);
            needed
        };
        let name = self.name(id);
        if ok {
            log::info!("upstream {name} is UP ({flipped}/{flipped} checks succeeded)");
        } else {
            log::warn!("upstream {name} is DOWN: {detail} ({flipped}/{flipped} checks failed)");
        }
        if let Some(listener) = &*self.listener.lock() {
            listener(id, ok);
        }
        Some(ok)
    }

    /// Records a failed connect made while serving a client: a failed check.
    pub fn observe_connect_failure(&self, id: UpstreamId, err: &io::Error) {
        self.observe(id, false, &err.to_string());
    }

    /// Whether `id` is UP.
    pub fn is_up(&self, id: UpstreamId) -> bool {
        self.trackers.lock().get(id.0).is_some_and(|t| t.up)
    }
}

/// What the prober checks: a way to test one address, so tests can inject outcomes.
pub trait Probe: Send + Sync {
    /// Checks `addrs` within `timeout`; `Err` says why the upstream is unhealthy.
    fn check(&self, addrs: &[SocketAddr], timeout: Duration) -> Result<(), String>;
}

/// The real probe: a TCP connect to the first address that answers.
#[derive(Debug, Default)]
pub struct TcpProbe;

impl Probe for TcpProbe {
    fn check(&self, addrs: &[SocketAddr], timeout: Duration) -> Result<(), String> {
        let mut last = String::from("no address");
        for addr in addrs {
            match TcpStream::connect_timeout(addr, timeout) {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.kind() == io::ErrorKind::TimedOut
                        || e.kind() == io::ErrorKind::WouldBlock =>
                {
                    last = format!(
                        "connect timed out after {}",
                        humantime::format_duration(timeout)
                    );
                }
                Err(e) => last = format!("connect failed: {e}"),
            }
        }
        Err(last)
    }
}

/// The running health-check thread. Dropping it (or calling [`HealthChecker::stop`]) stops the
/// thread and waits for it.
#[derive(Debug)]
pub struct HealthChecker {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Settings of the prober.
#[derive(Debug, Clone, Copy)]
pub struct ProbeSettings {
    /// Time between rounds.
    pub interval: Duration,
    /// Bound on one probe.
    pub timeout: Duration,
}

impl HealthChecker {
    /// Starts the thread: a round at once, then one every `interval` (with up to 10% jitter so a
    /// fleet of balancers does not probe in lockstep).
    pub fn spawn(
        health: Arc<Health>,
        targets: Vec<(UpstreamId, Vec<SocketAddr>)>,
        settings: ProbeSettings,
        probe: Arc<dyn Probe>,
    ) -> io::Result<HealthChecker> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let thread = std::thread::Builder::new()
            .name("lclb-health".into())
            .spawn(move || run(&health, &targets, settings, &*probe, &stopped))?;
        Ok(HealthChecker {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it to end (at most one probe timeout).
    pub fn stop(&mut self) {
        // Dropping the sender disconnects the channel, which wakes the thread at once.
        self.stop.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn jitter(interval: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    let tenth = interval / 10;
    let nanos = u64::try_from(tenth.as_nanos()).unwrap_or(u64::MAX).max(1);
    interval - tenth + Duration::from_nanos(h.finish() % (2 * nanos))
}

fn run(
    health: &Health,
    targets: &[(UpstreamId, Vec<SocketAddr>)],
    settings: ProbeSettings,
    probe: &dyn Probe,
    stopped: &Receiver<()>,
) {
    loop {
        let results: Vec<(UpstreamId, Result<(), String>)> = std::thread::scope(|s| {
            let probes: Vec<_> = targets
                .iter()
                .map(|(id, addrs)| {
                    let handle = std::thread::Builder::new()
                        .name("lclb-probe".into())
                        .stack_size(64 * 1024)
                        .spawn_scoped(s, move || probe.check(addrs, settings.timeout));
                    (*id, addrs, handle)
                })
                .collect();
            probes
                .into_iter()
                .map(|(id, addrs, handle)| {
                    let result = match handle {
                        Ok(h) => h.join().unwrap_or_else(|_| Err("probe panicked".into())),
                        // No thread to spare: probe inline rather than skip the upstream.
                        Err(_) => probe.check(addrs, settings.timeout),
                    };
                    (id, result)
                })
                .collect()
        });
        for (id, result) in results {
            match result {
                Ok(()) => health.observe(id, true, ""),
                Err(why) => health.observe(id, false, &why),
            };
        }
        match stopped.recv_timeout(jitter(settings.interval)) {
            Err(RecvTimeoutError::Timeout) => continue,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Instant;

    fn health(n: usize) -> (Health, Arc<ConnTable>) {
        let table = ConnTable::new(&vec![1; n]);
        let names = (0..n).map(|i| format!("u{i}")).collect();
        (Health::new(names, table.clone()), table)
    }

    #[test]
    fn an_upstream_goes_down_only_after_fall_consecutive_failures() {
        let (h, table) = health(1);
        h.set_thresholds(2, 3);
        let id = UpstreamId(0);
        assert_eq!(h.observe(id, false, "x"), None);
        assert_eq!(h.observe(id, false, "x"), None);
        assert_eq!(h.observe(id, true, ""), None, "a success resets the streak");
        assert_eq!(h.observe(id, false, "x"), None);
        assert_eq!(h.observe(id, false, "x"), None);
        assert!(table.is_up(id));
        assert_eq!(h.observe(id, false, "x"), Some(false));
        assert!(!table.is_up(id));
        assert!(!h.is_up(id));
    }

    #[test]
    fn a_down_upstream_comes_back_after_rise_consecutive_successes() {
        let (h, table) = health(1);
        h.set_thresholds(2, 1);
        let id = UpstreamId(0);
        assert_eq!(h.observe(id, false, "x"), Some(false));
        assert_eq!(h.observe(id, true, ""), None);
        assert_eq!(
            h.observe(id, false, "x"),
            None,
            "a failure resets the streak"
        );
        assert_eq!(h.observe(id, true, ""), None);
        assert_eq!(h.observe(id, true, ""), Some(true));
        assert!(table.is_up(id));
    }

    #[test]
    fn an_unknown_upstream_is_ignored() {
        let (h, _) = health(1);
        assert_eq!(h.observe(UpstreamId(5), false, "x"), None);
    }

    /// A probe whose answer the test sets.
    struct Scripted(Mutex<bool>);

    impl Probe for Scripted {
        fn check(&self, _: &[SocketAddr], _: Duration) -> Result<(), String> {
            if *self.0.lock() {
                Ok(())
            } else {
                Err("scripted failure".into())
            }
        }
    }

    fn wait_for(what: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn the_prober_takes_a_failing_upstream_down_and_brings_it_back() {
        let (h, table) = health(1);
        h.set_thresholds(2, 2);
        let h = Arc::new(h);
        let probe = Arc::new(Scripted(Mutex::new(false)));
        let settings = ProbeSettings {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(10),
        };
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut checker = HealthChecker::spawn(
            h.clone(),
            vec![(UpstreamId(0), vec![addr])],
            settings,
            probe.clone(),
        )
        .unwrap();
        assert!(wait_for(|| !table.is_up(UpstreamId(0))));
        *probe.0.lock() = true;
        assert!(wait_for(|| table.is_up(UpstreamId(0))));
        checker.stop();
    }

    /// A probe that succeeds only if every upstream of the round is being probed at once.
    struct AllAtOnce {
        expected: usize,
        arrived: Mutex<usize>,
        all_here: parking_lot::Condvar,
        results: Mutex<Vec<bool>>,
    }

    impl Probe for AllAtOnce {
        fn check(&self, _: &[SocketAddr], _: Duration) -> Result<(), String> {
            let mut arrived = self.arrived.lock();
            *arrived += 1;
            self.all_here.notify_all();
            let deadline = Instant::now() + Duration::from_secs(10);
            while *arrived < self.expected {
                if self.all_here.wait_until(&mut arrived, deadline).timed_out() {
                    self.results.lock().push(false);
                    return Err("probes ran one after another".into());
                }
            }
            self.results.lock().push(true);
            Ok(())
        }
    }

    #[test]
    fn a_round_probes_every_upstream_concurrently() {
        let (h, _) = health(50);
        let probe = Arc::new(AllAtOnce {
            expected: 50,
            arrived: Mutex::new(0),
            all_here: parking_lot::Condvar::new(),
            results: Mutex::new(Vec::new()),
        });
        let settings = ProbeSettings {
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(1),
        };
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let targets = (0..50).map(|i| (UpstreamId(i), vec![addr])).collect();
        let mut checker =
            HealthChecker::spawn(Arc::new(h), targets, settings, probe.clone()).unwrap();
        assert!(wait_for(|| probe.results.lock().len() == 50));
        checker.stop();
        assert!(
            probe.results.lock().iter().all(|&ok| ok),
            "some probe waited for another"
        );
    }

    #[test]
    fn the_tcp_probe_tells_a_listener_from_a_closed_port() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = listener.local_addr().unwrap();
        let closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let t = Duration::from_secs(1);
        assert!(TcpProbe.check(&[open], t).is_ok());
        let err = TcpProbe.check(&[closed], t).unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }

    #[test]
    fn stopping_the_prober_does_not_wait_for_the_interval() {
        let (h, _) = health(1);
        let settings = ProbeSettings {
            interval: Duration::from_secs(3600),
            timeout: Duration::from_millis(10),
        };
        let probe = Arc::new(Scripted(Mutex::new(true)));
        let mut checker = HealthChecker::spawn(Arc::new(h), vec![], settings, probe).unwrap();
        // If stop slept through the interval this test would hang for an hour, not fail fast;
        // the join below returning at all is the check.
        checker.stop();
        assert!(checker.thread.is_none());
    }
}
