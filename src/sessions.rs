//! The registry of connections being forwarded right now, so they can be ended from outside:
//! all of an upstream's when it goes DOWN (if `shutdown_sessions_on_down` is set), all of them
//! when a drain runs out of time, those a reload no longer admits (`tls.enforce_on_reload`),
//! and each when its client certificate expires (`tls.close_at_cert_expiry`).
//!
//! Expiry needs no thread per connection: one thread, `lclb-expiry`, sleeps until the
//! earliest notAfter among the open connections (at most a minute, so a wall clock that jumps
//! is noticed), closes what has expired, and sleeps again; a connection attached with an
//! earlier notAfter wakes it.
//!
//! A connection registers when its forwarding starts and leaves when it ends (an RAII
//! [`Registration`]). Ending sessions takes the list out of the lock first and closes them
//! after, so neither registering nor probing ever waits behind a close. This module does not
//! decide when to end sessions (health, drain and reload do) nor how a link is closed (the
//! forwarder does).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use crate::forward::{self, Aborter, EndReason};
use crate::table::UpstreamId;

/// The connections being forwarded now.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<Live>,
    /// Whether expired certificates close their connections (`tls.close_at_cert_expiry`).
    close_at_expiry: AtomicBool,
    /// Wakes the expiry thread when a connection with an earlier notAfter arrives.
    wake: Mutex<Option<Sender<()>>>,
}

/// One forwarded connection: its upstream, the handle that ends it, and when its client
/// certificate expires (Unix seconds).
#[derive(Debug)]
struct Entry {
    upstream: UpstreamId,
    group: Arc<str>,
    /// The client's identity (its `[[client]]` name).
    client: Arc<str>,
    aborter: Aborter,
    not_after: Option<i64>,
}

#[derive(Debug, Default)]
struct Live {
    entries: HashMap<u64, Entry>,
    /// (notAfter, key) of the entries that have one, earliest first.
    expiries: BTreeSet<(i64, u64)>,
}

/// What a forwarded connection is, for the registry: where it goes and whose it is.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The upstream it was given.
    pub upstream: UpstreamId,
    /// That upstream's group.
    pub group: Arc<str>,
    /// The client's identity (its `[[client]]` name).
    pub client: Arc<str>,
    /// The client certificate's notAfter, Unix seconds; `None`: it is never closed for
    /// expiry.
    pub not_after: Option<i64>,
}

/// Now, in Unix seconds.
fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The longest the expiry thread sleeps without looking: a wall clock set forward is noticed
/// within this.
const EXPIRY_LOOK: Duration = Duration::from_secs(60);

/// A connection's place in [`Sessions`]; dropping it removes the connection.
#[derive(Debug)]
pub struct Registration {
    sessions: Arc<Sessions>,
    key: u64,
}

impl Registration {
    /// The key to [`Sessions::attach`] the connection under.
    pub fn key(&self) -> u64 {
        self.key
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut live = self.sessions.live.lock();
        if let Some(entry) = live.entries.remove(&self.key) {
            if let Some(at) = entry.not_after {
                live.expiries.remove(&(at, self.key));
            }
        }
    }
}

impl Sessions {
    /// A place for a connection about to be forwarded; [`Sessions::attach`] fills it.
    pub fn reserve(self: &Arc<Self>) -> Registration {
        Registration {
            sessions: Arc::clone(self),
            key: self.next.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Records the forwarded connection reserved as `key`: `session` says on which upstream
    /// (of which group), whose it is and when its client certificate expires; `aborter` ends
    /// it. Called before the connection's first byte is copied.
    pub fn attach(&self, key: u64, session: SessionInfo, aborter: Aborter) {
        let SessionInfo {
            upstream,
            group,
            client,
            not_after,
        } = session;
        let earliest = {
            let mut live = self.live.lock();
            let before = live.expiries.first().map(|(at, _)| *at);
            live.entries.insert(
                key,
                Entry {
                    upstream,
                    group,
                    client,
                    aborter,
                    not_after,
                },
            );
            if let Some(at) = not_after {
                live.expiries.insert((at, key));
            }
            not_after.is_some_and(|at| before.is_none_or(|b| at < b))
        };
        if earliest {
            if let Some(wake) = &*self.wake.lock() {
                let _ = wake.try_send(());
            }
        }
    }

    /// Ends every session on `upstream`; returns how many.
    pub fn close_upstream(&self, upstream: UpstreamId, reason: EndReason) -> usize {
        let doomed: Vec<Aborter> = self
            .live
            .lock()
            .entries
            .values()
            .filter(|e| e.upstream == upstream)
            .map(|e| e.aborter.clone())
            .collect();
        close(doomed, reason)
    }

    /// Ends every session; returns how many.
    pub fn close_all(&self, reason: EndReason) -> usize {
        let doomed: Vec<Aborter> = self
            .live
            .lock()
            .entries
            .values()
            .map(|e| e.aborter.clone())
            .collect();
        close(doomed, reason)
    }

    /// Checks every session with `verdict` (given its upstream's group and its handle, whose
    /// client chain it can read) and ends, together, each one `verdict` gives a reason to;
    /// returns them, counted by reason. The registry is locked only to copy the list out.
    pub fn recheck(
        &self,
        verdict: impl Fn(&str, &Aborter) -> Option<EndReason>,
    ) -> Vec<(EndReason, usize)> {
        let all: Vec<(Arc<str>, Aborter)> = self
            .live
            .lock()
            .entries
            .values()
            .map(|e| (e.group.clone(), e.aborter.clone()))
            .collect();
        let doomed: Vec<(Aborter, EndReason)> = all
            .into_iter()
            .filter_map(|(group, a)| verdict(&group, &a).map(|r| (a, r)))
            .collect();
        let mut counts: Vec<(EndReason, usize)> = Vec::new();
        for (_, reason) in &doomed {
            match counts.iter_mut().find(|(r, _)| r == reason) {
                Some((_, n)) => *n += 1,
                None => counts.push((reason.clone(), 1)),
            }
        }
        if !doomed.is_empty() {
            forward::close_each(doomed);
        }
        counts
    }

    /// Whether connections are closed when their client certificate expires.
    pub fn set_close_at_expiry(&self, on: bool) {
        self.close_at_expiry.store(on, Ordering::Relaxed);
        if let Some(wake) = &*self.wake.lock() {
            let _ = wake.try_send(());
        }
    }

    /// Starts the thread that closes connections whose client certificate has expired. It
    /// ends once the registry is dropped.
    pub fn start_expiry(self: &Arc<Self>) -> std::io::Result<()> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        *self.wake.lock() = Some(tx);
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("lclb-expiry".into())
            .stack_size(128 * 1024)
            .spawn(move || expiry_loop(&weak, &rx))?;
        Ok(())
    }

    /// Closes the sessions whose certificate expired before `now` (Unix seconds), if closing
    /// at expiry is on; returns how many, and the next notAfter to wait for.
    fn close_expired(&self, now: i64) -> (usize, Option<i64>) {
        let on = self.close_at_expiry.load(Ordering::Relaxed);
        let (doomed, next) = {
            let live = self.live.lock();
            if !on {
                (Vec::new(), None)
            } else {
                let doomed: Vec<Aborter> = live
                    .expiries
                    .iter()
                    .take_while(|(at, _)| *at < now)
                    .filter_map(|(_, key)| live.entries.get(key).map(|e| e.aborter.clone()))
                    .collect();
                let next = live
                    .expiries
                    .iter()
                    .find(|(at, _)| *at >= now)
                    .map(|(at, _)| *at);
                (doomed, next)
            }
        };
        let n = doomed.len();
        if n > 0 {
            log::info!("closing {n} connection(s) whose client certificate has expired");
            forward::close_all(doomed, EndReason::CertExpired);
        }
        (n, next)
    }

    /// For each identity with connections open, the earliest notAfter among their client
    /// certificates (Unix seconds): when the first of them will be closed for expiry.
    pub fn earliest_expiry_by_client(&self) -> HashMap<Arc<str>, i64> {
        let live = self.live.lock();
        let mut out: HashMap<Arc<str>, i64> = HashMap::new();
        for e in live.entries.values() {
            if let Some(at) = e.not_after {
                let slot = out.entry(e.client.clone()).or_insert(at);
                *slot = (*slot).min(at);
            }
        }
        out
    }

    /// Sessions being forwarded now.
    pub fn len(&self) -> usize {
        self.live.lock().entries.len()
    }

    /// Whether no session is being forwarded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The expiry thread: closes what has expired, then sleeps until the next notAfter (at most
/// [`EXPIRY_LOOK`]) or until woken.
fn expiry_loop(sessions: &Weak<Sessions>, wake: &Receiver<()>) {
    loop {
        let next = match sessions.upgrade() {
            Some(s) => s.close_expired(unix_now()).1,
            None => return,
        };
        // A certificate is valid through its notAfter second: close once it has passed.
        let wait = next.map_or(EXPIRY_LOOK, |at| {
            let secs = at.saturating_sub(unix_now()).saturating_add(1).max(0);
            Duration::from_secs(u64::try_from(secs).unwrap_or(u64::MAX)).min(EXPIRY_LOOK)
        });
        match wake.recv_timeout(wait) {
            Ok(()) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Closes `doomed` together (outside the registry's lock: closing writes to sockets and waits
/// a moment for them); returns how many.
fn close(doomed: Vec<Aborter>, reason: EndReason) -> usize {
    let n = doomed.len();
    forward::close_all(doomed, reason);
    n
}
