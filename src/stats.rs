//! Counters of what the balancer did: connections accepted, refused (by reason), served, and
//! bytes moved per upstream.
//!
//! Every counter is an atomic, so counting adds no lock to the connection path; the one
//! exception is the per-client refusal record ([`ClientRefusals`]), a short lock taken only
//! when a connection is refused. This module only counts; exposing the counts (logs, a metrics
//! endpoint) is done by their readers.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::config::Config;

/// Declares [`Refusal`] and its [`Refusal::ALL`] list from one table, so that a new reason is
/// one line here and every counter array sized from the list grows with it at compile time.
macro_rules! refusals {
    ($($(#[doc = $doc:literal])* $variant:ident => $name:literal,)*) => {
        /// Why a client connection was refused. The names are the `reason` label of
        /// `lclb_rejected_connections_total` and the `reason` word of the access log.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Refusal {
            $($(#[doc = $doc])* $variant,)*
        }

        impl Refusal {
            /// Every reason, in a fixed order (the order of the counters).
            pub const ALL: [Refusal; [$($name),*].len()] = [$(Refusal::$variant),*];

            /// The reason's name in logs and metrics labels.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Refusal::$variant => $name,)*
                }
            }
        }
    };
}

refusals! {
    /// The balancer was at `limits.max_connections` (or what the thread limit allows), had
    /// `limits.max_handshakes` handshakes in progress, or could not get a thread.
    Capacity => "capacity",
    /// The source address (or IPv6 prefix) already had `limits.per_ip_max_handshakes`
    /// handshakes in progress.
    IpHandshakes => "ip_handshakes",
    /// The source address (or IPv6 prefix) exceeded `limits.per_ip_handshake_rate`.
    IpRateLimited => "ip_rate_limited",
    /// The TLS handshake failed or timed out (bad, missing, expired or untrusted certificate,
    /// protocol error, silence), or a resumed session no longer verifies.
    Tls => "tls",
    /// The verified identity may reach no upstream.
    Unauthorized => "unauthorized",
    /// The identity exceeded its connection rate.
    RateLimited => "rate_limited",
    /// The identity already had `max_concurrent` connections open.
    ConcurrencyLimited => "concurrency_limited",
    /// `[cluster]` with `on_error = "deny"`: Redis, which holds the shared limits, was down.
    ClusterUnavailable => "cluster_unavailable",
    /// No allowed upstream was UP.
    NoUpstream => "no_upstream",
    /// Every connect attempt to an allowed upstream failed.
    UpstreamConnect => "upstream_connect",
}

impl Refusal {
    /// The reason's place in [`Refusal::ALL`] (and in counter arrays sized from it).
    fn index(self) -> usize {
        // Declaration order is the order of ALL: the macro writes both from one list.
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

/// Upper bounds (seconds) of the handshake-duration histogram buckets.
pub const HANDSHAKE_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A histogram of completed handshake durations, lock-free.
#[derive(Debug, Default)]
pub struct HandshakeHistogram {
    /// Per bucket (not cumulative): handshakes at most that bound and above the previous one.
    buckets: [AtomicU64; HANDSHAKE_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl HandshakeHistogram {
    /// Records one completed handshake.
    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = HANDSHAKE_BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket bound, as Prometheus wants them, then the total count and
    /// the sum in seconds.
    pub fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut running = 0;
        let buckets = HANDSHAKE_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(&bound, n)| {
                running += n.load(Ordering::Relaxed);
                (bound, running)
            })
            .collect();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (buckets, self.count.load(Ordering::Relaxed), sum)
    }
}

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Sockets accepted by the listener.
    pub accepted: AtomicU64,
    /// Client connections open now (handshakes included).
    pub active_clients: AtomicU64,
    /// Handshakes in progress now.
    pub active_handshakes: AtomicU64,
    /// Completed handshake durations.
    pub handshakes: HandshakeHistogram,
    /// Completed handshakes that resumed an earlier session (TLS 1.2 session id or TLS 1.3
    /// ticket) instead of verifying a certificate afresh.
    pub tls_resumptions: AtomicU64,
    /// Config reloads that took effect.
    pub reloads_ok: AtomicU64,
    /// Config reloads refused (the old config stayed).
    pub reloads_failed: AtomicU64,
    /// Refusals of each configured client identity, for `/status`.
    pub clients: ClientRefusals,
    /// Redis calls of `[cluster]` that failed (admissions, lease refreshes and removals; not
    /// the probes while it is known to be down).
    pub cluster_errors: AtomicU64,
    refused: [AtomicU64; Refusal::ALL.len()],
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

/// The refusals of one client identity: how many for each reason, and the last one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientRefused {
    counts: [u64; Refusal::ALL.len()],
    /// When the last refusal happened, and why.
    pub last: Option<(SystemTime, Refusal)>,
}

impl ClientRefused {
    /// Refusals so far for `reason`.
    pub fn count(&self, reason: Refusal) -> u64 {
        self.counts[reason.index()]
    }

    /// The reasons with at least one refusal and their counts, in the order of
    /// [`Refusal::ALL`].
    pub fn by_reason(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .into_iter()
            .map(|r| (r, self.count(r)))
            .filter(|&(_, n)| n > 0)
    }
}

/// Refusals per client identity, kept only for the names of the running config's `[[client]]`
/// entries: a refused certificate whose name is no entry's (a stranger, a typo) is counted in
/// the process-wide counters only, so neither memory nor `/status` grows with the names
/// strangers choose. Names a reload removed are dropped when a new name needs room.
#[derive(Debug, Default)]
pub struct ClientRefusals {
    by_client: Mutex<HashMap<String, ClientRefused>>,
}

impl ClientRefusals {
    /// Counts a refusal of `client` for `reason`, now, if `config` has a `[[client]]` entry of
    /// that name; otherwise does nothing.
    pub fn refused(&self, client: &str, reason: Refusal, config: &Config) {
        if config.client(client).is_none() {
            return;
        }
        let now = SystemTime::now();
        let mut by_client = self.by_client.lock();
        if !by_client.contains_key(client) && by_client.len() >= config.clients.len() {
            // Full: some names are no longer configured; what they had goes with them.
            by_client.retain(|name, _| config.client(name).is_some());
        }
        let entry = by_client.entry(client.to_string()).or_default();
        entry.counts[reason.index()] += 1;
        entry.last = Some((now, reason));
    }

    /// What `client` was refused so far; all zero for a client never refused.
    pub fn of(&self, client: &str) -> ClientRefused {
        self.by_client
            .lock()
            .get(client)
            .cloned()
            .unwrap_or_default()
    }
}

/// A refused connection: the reason (its counter and log word) and what exactly happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The reason.
    pub reason: Refusal,
    /// Words for the log line: which limit, which certificate problem.
    pub detail: String,
    /// The client's identity, when the refusal came after it was known.
    pub client: Option<String>,
}

impl Refused {
    /// A refusal for `reason`, described by `detail`.
    pub fn new(reason: Refusal, detail: impl fmt::Display) -> Refused {
        Refused {
            reason,
            detail: detail.to_string(),
            client: None,
        }
    }

    /// A handshake that failed or timed out (or could not start).
    pub fn handshake(e: impl fmt::Display) -> Refused {
        Refused::new(Refusal::Tls, e)
    }

    /// No thread could be had for the connection.
    pub fn no_thread(e: impl fmt::Display) -> Refused {
        Refused::new(
            Refusal::Capacity,
            format_args!("cannot start a thread: {e}"),
        )
    }

    /// The same refusal, naming the client it refused.
    pub fn of(mut self, client: &str) -> Refused {
        self.client = Some(client.to_string());
        self
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for Refused {}

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

    #[test]
    fn the_handshake_histogram_is_cumulative_and_sums_in_seconds() {
        let h = HandshakeHistogram::default();
        h.observe(std::time::Duration::from_micros(800));
        h.observe(std::time::Duration::from_millis(3));
        h.observe(std::time::Duration::from_secs(60));
        let (buckets, count, sum) = h.snapshot();
        assert_eq!(buckets[0], (0.001, 1));
        assert_eq!(buckets[2], (0.005, 2));
        assert_eq!(buckets.last().unwrap().1, 2, "60s is only in +Inf");
        assert_eq!(count, 3);
        assert!((sum - 60.0038).abs() < 1e-9);
    }

    fn config_with_clients(names: &[&str]) -> Config {
        let mut text =
            String::from("[[upstream]]\nname = \"u\"\naddress = \"127.0.0.1:1\"\ngroup = \"g\"\n");
        for name in names {
            text.push_str(&format!("[[client]]\ncn = {name:?}\ngroups = [\"g\"]\n"));
        }
        Config::parse(&text, std::path::Path::new("/")).unwrap()
    }

    #[test]
    fn refusals_are_kept_per_configured_client_and_strangers_are_not_kept() {
        let refusals = ClientRefusals::default();
        let config = config_with_clients(&["a", "b"]);
        refusals.refused("a", Refusal::RateLimited, &config);
        refusals.refused("a", Refusal::RateLimited, &config);
        refusals.refused("a", Refusal::NoUpstream, &config);
        refusals.refused("stranger", Refusal::Unauthorized, &config);
        let a = refusals.of("a");
        assert_eq!(
            a.by_reason().collect::<Vec<_>>(),
            vec![(Refusal::RateLimited, 2), (Refusal::NoUpstream, 1)]
        );
        assert_eq!(a.last.map(|(_, r)| r), Some(Refusal::NoUpstream));
        assert_eq!(refusals.of("b"), ClientRefused::default());
        assert_eq!(refusals.of("stranger"), ClientRefused::default());
        assert_eq!(refusals.by_client.lock().len(), 1);
    }

    #[test]
    fn names_a_reload_removed_make_room_for_new_ones() {
        let refusals = ClientRefusals::default();
        refusals.refused("a", Refusal::Tls, &config_with_clients(&["a"]));
        let reloaded = config_with_clients(&["b"]);
        refusals.refused("b", Refusal::Tls, &reloaded);
        let kept: Vec<String> = refusals.by_client.lock().keys().cloned().collect();
        assert_eq!(
            kept,
            vec!["b".to_string()],
            "bounded by the configured names"
        );
    }
}
