//! Upstream health: the rise/fall state machine, and the thread that probes upstreams.
//!
//! An upstream turns DOWN after `fall` consecutive failed checks and UP after `rise` consecutive
//! successful ones. Checks come from two places: the active prober (a TCP connect every
//! `interval`, bounded by `timeout`; for an upstream of a TLS group, a full TLS handshake and
//! close_notify, so a certificate it cannot verify, a name it does not have or a refused client
//! certificate mark it DOWN with that reason) and the balancer, which reports a failed connect
//! while serving a client as a failed check, so a dead upstream can go DOWN between probe
//! rounds. The state machine and the resulting UP/DOWN flag live in the upstream's record in
//! the [`UpstreamTable`], where the least-connection choice reads them under the same lock as
//! the counts; this module only produces checks.
//!
//! One dedicated thread owns the probe schedule. Each round probes the upstreams the table has
//! configured at that moment, so a reload needs no restart of the thread; new settings reach it
//! through its control channel. A round's probes run concurrently on short-lived
//! scoped threads, so a round over many upstreams, some of them black holes, takes about one
//! `timeout`, not one per dead upstream. The thread sleeps on a channel, so stopping it is
//! immediate.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::proxy;
use crate::table::{Flip, ProbeTarget, UpstreamId, UpstreamTable};
use crate::upstream::{self, TlsPeer};

/// Told of every flip the prober causes, on the prober's thread: it must not block (hand long
/// work such as closing sessions to another thread).
pub type OnFlip = Box<dyn Fn(&Flip) + Send>;

/// What the prober checks: a way to test one upstream, so tests can inject outcomes.
pub trait Probe: Send + Sync {
    /// Checks the upstream at `addrs` (reached over `tls` when its group has TLS, after
    /// `preface`, a PROXY LOCAL header, when its group sends PROXY headers) within `timeout`;
    /// `Err` says why it is unhealthy.
    fn check(
        &self,
        addrs: &[SocketAddr],
        tls: Option<&TlsPeer>,
        preface: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), String>;
}

/// The real probe: a TCP connect to the first address that answers and, for a TLS upstream, a
/// full TLS handshake with it (see [`upstream::probe`]).
#[derive(Debug, Default)]
pub struct TcpProbe;

impl Probe for TcpProbe {
    fn check(
        &self,
        addrs: &[SocketAddr],
        tls: Option<&TlsPeer>,
        preface: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), String> {
        if let Some(peer) = tls {
            return upstream::probe(addrs, peer, preface, timeout).map_err(|e| e.to_string());
        }
        let mut last = String::from("no address");
        for addr in addrs {
            match TcpStream::connect_timeout(addr, timeout) {
                Ok(sock) => {
                    if let Some(bytes) = preface {
                        // The LOCAL header, so an upstream that requires PROXY headers sees
                        // a well-formed health check rather than a broken connection. A
                        // fresh socket's send buffer takes these 16 bytes at once.
                        let _ = sock.set_write_timeout(Some(timeout));
                        if let Err(e) = (&sock).write_all(bytes) {
                            return Err(format!("cannot send the PROXY LOCAL header: {e}"));
                        }
                    }
                    return Ok(());
                }
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
    control: Option<Sender<ProbeSettings>>,
    thread: Option<JoinHandle<()>>,
}

/// Settings of the prober.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSettings {
    /// Time between rounds.
    pub interval: Duration,
    /// Bound on one probe.
    pub timeout: Duration,
}

impl HealthChecker {
    /// Starts the thread: a round at once, then one every `interval` (with up to 10% jitter so a
    /// fleet of balancers does not probe in lockstep). Each round's results go into `table`;
    /// `on_flip` is told of each flip they cause.
    pub fn spawn(
        table: Arc<UpstreamTable>,
        settings: ProbeSettings,
        probe: Arc<dyn Probe>,
        on_flip: OnFlip,
    ) -> io::Result<HealthChecker> {
        let (control, settings_rx) = crossbeam_channel::unbounded::<ProbeSettings>();
        let thread = std::thread::Builder::new()
            .name("lclb-health".into())
            .spawn(move || run(&table, settings, &*probe, &on_flip, &settings_rx))?;
        Ok(HealthChecker {
            control: Some(control),
            thread: Some(thread),
        })
    }

    /// Applies new settings from the next round on (a reload); the thread wakes at once and
    /// runs a round, so upstreams a reload added are probed without waiting an interval.
    pub fn set_settings(&self, settings: ProbeSettings) {
        if let Some(control) = &self.control {
            // The receiver lives as long as the thread; a send to a stopped thread is moot.
            let _ = control.send(settings);
        }
    }

    /// Stops the thread and waits for it to end (at most one probe timeout).
    pub fn stop(&mut self) {
        // Dropping the sender disconnects the channel, which wakes the thread at once.
        self.control.take();
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
    interval.saturating_sub(tenth) + Duration::from_nanos(h.finish() % (2 * nanos))
}

/// Stack of a probe thread: a TCP connect needs little; a TLS handshake verifies a certificate
/// chain and signatures, as a connection thread does (`server::CONNECTION_THREAD_STACK`).
const PROBE_STACK: usize = 64 * 1024;
const TLS_PROBE_STACK: usize = 256 * 1024;

/// The PROXY v2 LOCAL header probes send, encoded once.
fn local_header() -> &'static [u8] {
    static LOCAL: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    LOCAL.get_or_init(proxy::encode_v2_local)
}

/// Probes every target of one round concurrently; returns each target's result.
fn round(
    targets: &[ProbeTarget],
    timeout: Duration,
    probe: &dyn Probe,
) -> Vec<(UpstreamId, Result<(), String>)> {
    std::thread::scope(|s| {
        let probes: Vec<_> = targets
            .iter()
            .map(|(id, addrs, tls, proxy)| {
                let tls = tls.as_deref();
                let preface = proxy.then_some(local_header());
                let stack = if tls.is_some() {
                    TLS_PROBE_STACK
                } else {
                    PROBE_STACK
                };
                let handle = std::thread::Builder::new()
                    .name("lclb-probe".into())
                    .stack_size(stack)
                    .spawn_scoped(s, move || probe.check(addrs, tls, preface, timeout));
                (*id, addrs, tls, preface, handle)
            })
            .collect();
        probes
            .into_iter()
            .map(|(id, addrs, tls, preface, handle)| {
                let result = match handle {
                    Ok(h) => h.join().unwrap_or_else(|_| Err("probe panicked".into())),
                    // No thread to spare: probe inline rather than skip the upstream.
                    Err(_) => probe.check(addrs, tls, preface, timeout),
                };
                (id, result)
            })
            .collect()
    })
}

fn run(
    table: &UpstreamTable,
    mut settings: ProbeSettings,
    probe: &dyn Probe,
    on_flip: &OnFlip,
    control: &Receiver<ProbeSettings>,
) {
    loop {
        for (id, result) in round(&table.probe_targets(), settings.timeout, probe) {
            let flip = match result {
                Ok(()) => table.observe(id, true, ""),
                Err(why) => table.observe(id, false, &why),
            };
            if let Some(flip) = flip {
                on_flip(&flip);
            }
        }
        match control.recv_timeout(jitter(settings.interval)) {
            Ok(new) => settings = new,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::wait_for;
    use parking_lot::Mutex;
    use std::net::TcpListener;
    use std::time::Instant;

    fn table(n: usize) -> Arc<UpstreamTable> {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        UpstreamTable::new(
            (0..n)
                .map(|i| crate::table::Upstream::new(format!("u{i}"), addr))
                .collect(),
        )
    }

    fn ignore_flips() -> OnFlip {
        Box::new(|_| {})
    }

    /// A probe whose answer the test sets.
    struct Scripted(Mutex<bool>);

    impl Probe for Scripted {
        fn check(
            &self,
            _: &[SocketAddr],
            _: Option<&TlsPeer>,
            _: Option<&[u8]>,
            _: Duration,
        ) -> Result<(), String> {
            if *self.0.lock() {
                Ok(())
            } else {
                Err("scripted failure".into())
            }
        }
    }

    #[test]
    fn the_prober_takes_a_failing_upstream_down_and_brings_it_back() {
        let table = table(1);
        table.set_thresholds(2, 2);
        let probe = Arc::new(Scripted(Mutex::new(false)));
        let settings = ProbeSettings {
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(10),
        };
        let (flips, flipped) = crossbeam_channel::unbounded();
        let on_flip: OnFlip = Box::new(move |f: &Flip| {
            let _ = flips.send(f.up);
        });
        let mut checker =
            HealthChecker::spawn(table.clone(), settings, probe.clone(), on_flip).unwrap();
        assert!(wait_for(|| !table.is_up(UpstreamId(0))));
        *probe.0.lock() = true;
        assert!(wait_for(|| table.is_up(UpstreamId(0))));
        checker.stop();
        let told: Vec<bool> = flipped.try_iter().collect();
        assert_eq!(told, vec![false, true], "each flip is told once");
    }

    /// A probe that succeeds only if every upstream of the round is being probed at once.
    struct AllAtOnce {
        expected: usize,
        arrived: Mutex<usize>,
        all_here: parking_lot::Condvar,
        results: Mutex<Vec<bool>>,
    }

    impl Probe for AllAtOnce {
        fn check(
            &self,
            _: &[SocketAddr],
            _: Option<&TlsPeer>,
            _: Option<&[u8]>,
            _: Duration,
        ) -> Result<(), String> {
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
        let table = table(50);
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
        let mut checker =
            HealthChecker::spawn(table, settings, probe.clone(), ignore_flips()).unwrap();
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
        assert!(TcpProbe.check(&[open], None, None, t).is_ok());
        let err = TcpProbe.check(&[closed], None, None, t).unwrap_err();
        assert!(err.contains("refused"), "{err}");
    }

    #[test]
    fn the_tcp_probe_reports_a_connect_that_gets_no_answer_as_timed_out() {
        use socket2::{Domain, Socket, Type};
        // A listener with a full backlog drops further SYNs: the connect gets no answer.
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        socket.listen(0).unwrap();
        let listener: TcpListener = socket.into();
        let addr = listener.local_addr().unwrap();
        let _queued = std::net::TcpStream::connect(addr).unwrap();
        let err = TcpProbe
            .check(&[addr], None, None, Duration::from_millis(300))
            .unwrap_err();
        assert_eq!(err, "connect timed out after 300ms");
    }

    /// A probe that counts its calls and always succeeds.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Probe for Counting {
        fn check(
            &self,
            _: &[SocketAddr],
            _: Option<&TlsPeer>,
            _: Option<&[u8]>,
            _: Duration,
        ) -> Result<(), String> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    #[test]
    fn new_settings_wake_the_prober_for_a_round_at_once() {
        use std::sync::atomic::Ordering;
        let hour = ProbeSettings {
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(1),
        };
        let probe = Arc::new(Counting(Default::default()));
        let mut checker =
            HealthChecker::spawn(table(1), hour, probe.clone(), ignore_flips()).unwrap();
        assert!(wait_for(|| probe.0.load(Ordering::SeqCst) == 1));
        checker.set_settings(hour);
        assert!(
            wait_for(|| probe.0.load(Ordering::SeqCst) == 2),
            "no second round without waiting an hour"
        );
        checker.stop();
    }

    #[test]
    fn dropping_the_prober_ends_its_thread_before_drop_returns() {
        let settings = ProbeSettings {
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(1),
        };
        let probe = Arc::new(Counting(Default::default()));
        let checker =
            HealthChecker::spawn(table(1), settings, probe.clone(), ignore_flips()).unwrap();
        assert!(wait_for(|| probe
            .0
            .load(std::sync::atomic::Ordering::SeqCst)
            == 1));
        drop(checker);
        // The thread held the other reference; joined, it has let go of it.
        assert_eq!(Arc::strong_count(&probe), 1);
    }

    #[test]
    fn rounds_are_spaced_by_the_interval_give_or_take_a_tenth() {
        let interval = Duration::from_secs(10);
        let waits: Vec<Duration> = (0..200).map(|_| jitter(interval)).collect();
        for w in &waits {
            assert!(
                (Duration::from_secs(9)..Duration::from_secs(11)).contains(w),
                "{w:?}"
            );
        }
        assert!(
            waits.iter().any(|w| *w < interval),
            "some rounds come early"
        );
        assert!(waits.iter().any(|w| *w > interval), "some come late");
    }

    #[test]
    fn probes_send_the_proxy_v2_local_header() {
        assert_eq!(local_header(), proxy::encode_v2_local().as_slice());
        assert!(local_header().starts_with(b"\r\n\r\n\0\r\nQUIT\n"));
    }

    #[test]
    fn stopping_the_prober_does_not_wait_for_the_interval() {
        let settings = ProbeSettings {
            interval: Duration::from_secs(3600),
            timeout: Duration::from_millis(10),
        };
        let probe = Arc::new(Scripted(Mutex::new(true)));
        let mut checker = HealthChecker::spawn(table(1), settings, probe, ignore_flips()).unwrap();
        // If stop slept through the interval this test would hang for an hour, not fail fast;
        // the join below returning at all is the check.
        checker.stop();
        assert!(checker.thread.is_none());
    }
}
