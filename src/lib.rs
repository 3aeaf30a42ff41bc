//! lclb: a least-connection TCP load balancer with mutual TLS.
//!
//! ```text
//!             ┌──────── lclb ──────────────────────────────────────────────────┐
//!  client ──▶ │ accept ─▶ admission ─▶ handshake ─▶ admission ─▶ least-loaded   │
//!  (mTLS)     │ (server)  (per address,  (tls:      (identity, authz,  UP upstream ┼──▶ upstream
//!             │            capacity)      identity)  client limits)   (balancer)  │    (TCP)
//!             │ ◀──────────── two copy threads, one per direction (forward) ─────▶ │
//!             └────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Clients connect over TLS with a certificate that chains to a configured CA; the first
//! `[[client]]` entry whose selectors (subject CN, URI SAN, DNS SAN, key pin, issuing CA) all
//! match the certificate is the client's identity. The entry says which upstream groups it may
//! reach (no entry: refused) and under which rate and concurrency limits. The
//! connection then goes to the allowed, healthy upstream with the fewest active connections (per
//! unit of weight), and bytes are copied both ways until both sides are done. A dedicated thread
//! health-checks the upstreams.
//!
//! The shape is deliberately synchronous: a blocking listener, a thread per connection for the
//! handshake and routing, then two OS threads per connection for the copy (all from pools). No
//! async runtime.
//!
//! One connection, top to bottom, is one module after another, and no module imports one
//! above it: `server` (the listener, the one place refusals are counted and logged, reloads,
//! the drain) → `admission` (the gate before the handshake: per-address rate and handshake
//! cap, capacity; and after it: the peer check, identity, authorization, per-client rate and
//! concurrency; it returns RAII permits or typed refusals) → `tls` (the handshake, one
//! verifier per CA and which one anchored the chain, resumption re-verification, CRL
//! freshness) → `authz` (the first matching entry and its policy) → `identity` (what a
//! certificate names, and whether one entry matches it) → `balancer`
//! (pick, connect, retry; hands the client back when nothing can be had) → `table` (one record
//! per upstream: counts, weight, health state, counters) → `forward` (the two copy threads,
//! ticket-ordered records, half-close, integrity on errors) → `access` (the access log).
//! Beside that path: `config` (the file, in two stages), `ratelimit` (token buckets), `health`
//! (the prober thread), `sessions` (the forwarded connections that health, drain and reload can
//! end), `refusal_log` (refusal lines without flood or stall), `metrics` (the Prometheus
//! endpoint), `watch` (the reload thread: SIGHUP's reloads and watched files), `enforce`
//! (open connections held to a reloaded config), `proxy` (the PROXY protocol codec),
//! `upstream` (TLS toward upstreams), `stats` (counters and the refusal reasons), `threads` (the thread budget),
//! `pool` (reused threads), `buffers` (read buffers lent while data flows), `confine` (the
//! Landlock rules the server confines itself with), `tickets` (TLS session tickets sealed with
//! keys shared by several instances), `sockets` (binding with SO_REUSEPORT, inherited listening
//! sockets), `systemd` (sd_notify), `upgrade` (handing the listening sockets to a new process).
//! Modules are private;
//! the interface is re-exported here, and `cargo doc --document-private-items` shows each
//! module's own documentation.
//!
//! As a library, the balancer mirrors the original Go API: [`Balancer::new`] takes the upstreams,
//! and [`Balancer::balance`] takes a client, its identity and its allowed upstreams.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

// The configuration model is a namespace of its own (its many constants and section types);
// every other module is private, and what it offers the outside is re-exported below.
pub mod config;
// Process-level operations the binary calls by name (`lclb::systemd::ready`,
// `lclb::upgrade::request`): namespaces too, rather than a dozen renamed re-exports.
pub mod systemd;
pub mod upgrade;

mod access;
mod admission;
mod authz;
mod balancer;
mod buffers;
mod cluster;
mod confine;
mod enforce;
mod explain;
mod forward;
mod health;
mod identity;
mod metrics;
mod pool;
mod proxy;
mod ratelimit;
mod refusal_log;
mod server;
mod sessions;
mod sockets;
mod start_error;
mod stats;
mod table;
mod threads;
mod tickets;
mod tls;
mod upstream;
mod verified;
mod watch;

// The library's whole interface, in one place.
pub use access::{format as log_format, json_line, TARGET as ACCESS_LOG_TARGET};
pub use admission::{address_key, Admission, Handshaking, Permit, Refused};
pub use authz::{Authorizer, Policy, Unmatched};
pub use balancer::{BalanceError, Balancer, BalancerOptions, Client, Session, Unbalanced};
pub use cluster::{Cluster, Lease, Shared as SharedLimit};
pub use config::{Config, ConfigError};
pub use confine::{ConfineError, Confined, Confinement};
pub use explain::{explain, EntryCheck, Explanation, UpstreamLine};
pub use forward::{Aborter, EndReason, ForwardReport};
pub use identity::{client_identity, CertNames, Identity, IdentityError, Mismatch};
pub use metrics::{
    render as render_metrics, MetricsListener, MetricsServer,
    MAX_IN_FLIGHT as METRICS_MAX_IN_FLIGHT, REQUEST_DEADLINE as METRICS_REQUEST_DEADLINE,
};
pub use proxy::{
    cipher_name, encode_v2, encode_v2_local, read_header, server_cert_algorithms, tls_version_name,
    Proxied, ProxyError, ProxyFacts, MAX_V2_LENGTH,
};
pub use ratelimit::{Clock, RateLimiter, SystemClock};
pub use server::{BoundServer, Loaded, Runtime, Server, Shared, ShutdownHandle, StartError};
pub use sessions::{Registration, SessionInfo, Sessions};
pub use sockets::{inherited, log_inherited, InheritError, Inherited, Passer, ACCEPT_POLL};
pub use stats::{ClientRefusals, ClientRefused, HandshakeHistogram, Refusal, Stats, UpstreamStats};
pub use table::{
    ConnGuard, Flip, StateChange, Target, Upstream, UpstreamId, UpstreamTable, UpstreamView,
};
pub use threads::{
    connection_cap, thread_limit, LimitSource, ThreadLimit, RESERVED_THREADS,
    THREADS_PER_CONNECTION,
};
pub use tickets::{TicketKeys, KEYS_IN_USE as TICKET_KEYS_IN_USE, TICKET_LIFETIME};
pub use tls::{
    install_default_provider, provider, CertInfo, ClientTrust, CrlInfo, HandshakeError, PeerError,
    SessionCache, TlsContext,
};
pub use upstream::{GroupTls, TlsPeer, UpstreamTls};
pub use watch::{ReloadRequests, Watcher};

/// Helpers shared by the unit tests.
#[cfg(test)]
mod testing {
    use std::time::{Duration, Instant};

    /// Polls `what` until it holds; false after 10 s.
    pub fn wait_for(what: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}
