//! The registry of connections being forwarded right now, so they can be ended from outside:
//! all of an upstream's when it goes DOWN (if `shutdown_sessions_on_down` is set), all of them
//! when a drain runs out of time.
//!
//! A connection registers when its forwarding starts and leaves when it ends (an RAII
//! [`Registration`]). Ending sessions takes the list out of the lock first and closes them
//! after, so neither registering nor probing ever waits behind a close. This module does not
//! decide when to end sessions (health, drain and reload do) nor how a link is closed (the
//! forwarder does).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::forward::{self, Aborter, EndReason};
use crate::table::UpstreamId;

/// The connections being forwarded now.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, (UpstreamId, Aborter)>>,
}

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
        self.sessions.live.lock().remove(&self.key);
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

    /// Records the forwarded connection reserved as `key` on `upstream`, with the handle that
    /// ends it. Called before the connection's first byte is copied.
    pub fn attach(&self, key: u64, upstream: UpstreamId, aborter: Aborter) {
        self.live.lock().insert(key, (upstream, aborter));
    }

    /// Ends every session on `upstream`; returns how many.
    pub fn close_upstream(&self, upstream: UpstreamId, reason: EndReason) -> usize {
        let doomed: Vec<Aborter> = self
            .live
            .lock()
            .values()
            .filter(|(u, _)| *u == upstream)
            .map(|(_, a)| a.clone())
            .collect();
        close(doomed, reason)
    }

    /// Ends every session; returns how many.
    pub fn close_all(&self, reason: EndReason) -> usize {
        let doomed: Vec<Aborter> = self.live.lock().values().map(|(_, a)| a.clone()).collect();
        close(doomed, reason)
    }

    /// Sessions being forwarded now.
    pub fn len(&self) -> usize {
        self.live.lock().len()
    }

    /// Whether no session is being forwarded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Closes `doomed` together (outside the registry's lock: closing writes to sockets and waits
/// a moment for them); returns how many.
fn close(doomed: Vec<Aborter>, reason: EndReason) -> usize {
    let n = doomed.len();
    forward::close_all(doomed, reason);
    n
}
