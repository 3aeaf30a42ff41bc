//! Counters of what the balancer did: connections accepted, refused (by reason), served, and
//! bytes moved per upstream.
//!
//! Every counter is an atomic, so counting adds no lock to the connection path. This module only
//! counts; exposing the counts (logs, a metrics endpoint) is done by their readers.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a client connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The TLS handshake failed or timed out (bad, missing, expired or untrusted certificate,
    /// protocol error, silence).
    Tls,
    /// The verified identity may reach no upstream.
    Unauthorized,
    /// The identity exceeded its connection rate.
    RateLimited,
    /// No allowed upstream was UP.
    NoUpstream,
    /// Every connect attempt to an allowed upstream failed.
    UpstreamConnect,
    /// The balancer was at `limits.max_connections`, or could not start a thread.
    Capacity,
}

impl Refusal {
    /// Every reason, in a fixed order (the order of the counters).
    pub const ALL: [Refusal; 6] = [
        Refusal::Tls,
        Refusal::Unauthorized,
        Refusal::RateLimited,
        Refusal::NoUpstream,
        Refusal::UpstreamConnect,
        Refusal::Capacity,
    ];

    /// The reason's name in logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Tls => "tls",
            Refusal::Unauthorized => "unauthorized",
            Refusal::RateLimited => "rate_limited",
            Refusal::NoUpstream => "no_upstream",
            Refusal::UpstreamConnect => "upstream_connect",
            Refusal::Capacity => "capacity",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Per-upstream counters.
#[derive(Debug, Default)]
pub struct UpstreamStats {
    /// Connections forwarded to this upstream, ever.
    pub connections_total: AtomicU64,
    /// Plaintext bytes from clients to this upstream.
    pub bytes_to_upstream: AtomicU64,
    /// Plaintext bytes from this upstream to clients.
    pub bytes_to_client: AtomicU64,
    /// Connect attempts to this upstream that failed while serving a client.
    pub connect_failures: AtomicU64,
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sockets accepted by the listener.
    pub accepted: AtomicU64,
    /// Client connections open now (handshakes included).
    pub active_clients: AtomicU64,
    refused: [AtomicU64; 6],
}

impl Stats {
    /// Counts one refusal.
    pub fn refuse(&self, reason: Refusal) {
        self.refused[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals so far for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        self.refused[reason.index()].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_has_its_own_counter_and_name() {
        let s = Stats::default();
        s.refuse(Refusal::RateLimited);
        s.refuse(Refusal::RateLimited);
        s.refuse(Refusal::Tls);
        assert_eq!(s.refused(Refusal::RateLimited), 2);
        assert_eq!(s.refused(Refusal::Tls), 1);
        assert_eq!(s.refused(Refusal::Capacity), 0);
        let names: std::collections::HashSet<_> = Refusal::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Refusal::ALL.len());
        for (i, r) in Refusal::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
