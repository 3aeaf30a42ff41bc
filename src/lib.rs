//! lclb: a least-connection TCP load balancer with mutual TLS.
//!
//! ```text
//!             ┌──────── lclb ─────────────────────────────────────────────┐
//!  client ──▶ │ accept ─▶ handshake ─▶ CN ─▶ authorize ─▶ rate limit ─▶    │
//!  (mTLS)     │  (thread per connection)       least-loaded UP upstream ─┼──▶ upstream
//!             │ ◀──────── two copy threads, one per direction ──────────▶ │    (TCP)
//!             └───────────────────────────────────────────────────────────┘
//! ```
//!
//! Clients connect over TLS with a certificate signed by the configured CA; the certificate's
//! subject CN is the client's identity. The identity's `[[client]]` entry says which upstream
//! groups it may reach (no entry: refused). Its token bucket says whether it may open another
//! connection now. The connection then goes to the allowed, healthy upstream with the fewest
//! active connections (per unit of weight), and bytes are copied both ways until both sides are
//! done. A dedicated thread health-checks the upstreams.
//!
//! The shape is deliberately synchronous: a blocking listener, a thread per connection for the
//! handshake and routing, then two OS threads per connection for the copy. No async runtime.
//!
//! Modules, each owning one concept: [`config`] (the file and its validation), [`tls`]
//! (handshake and identity), [`authz`] (who may reach what), [`ratelimit`] (token buckets),
//! [`table`] (least-connection counts), [`health`] (rise/fall and probes), [`forward`] (the two
//! copy threads), [`balancer`] (the library API: rate limit, pick, forward), [`server`] (listener
//! and per-connection threads), [`stats`] (counters).
//!
//! As a library, the balancer mirrors the original Go API: [`Balancer::new`] takes the upstreams,
//! and [`Balancer::balance`] takes a client, its identity and its allowed upstreams.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod admission;
pub mod authz;
pub mod balancer;
mod buffers;
pub mod config;
pub mod forward;
pub mod health;
pub mod metrics;
pub mod pool;
pub mod ratelimit;
pub mod refusal_log;
pub mod server;
pub mod sessions;
pub mod stats;
pub mod table;
pub mod threads;
pub mod tls;

pub use balancer::{BalanceError, Balancer, BalancerOptions, Client, Session, Unbalanced};
pub use config::{Config, ConfigError};
pub use server::{Server, ShutdownHandle, StartError};
pub use table::{Upstream, UpstreamId};
