//! The balancer: given a client whose handshake and admission are done and the upstreams it may
//! reach, pick the least-loaded healthy allowed upstream, connect (retrying on other upstreams
//! if the connect fails) and forward until both sides are done.
//!
//! This mirrors the original library's `NewLoadBalancer(upstreams)` and
//! `Balance(conn, clientId, allowedUpstreams)`. It refuses nobody on its own account: TLS,
//! authorization and limits are admission's, and when no upstream can be had the client is
//! handed back to the caller, which refuses it. It owns the upstream table, the registry of
//! forwarded sessions and the copy threads.

use std::fmt;
use std::io;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use rustls::ServerConnection;

use crate::config::{Config, ProxyProtocol, Truncation};
use crate::forward::{
    self, Connected, EndReason, ForwardOptions, ForwardReport, COPY_THREAD_STACK,
};
use crate::pool::ThreadPool;
use crate::proxy::{self, ProxyFacts};
use crate::sessions::{SessionInfo, Sessions};
use crate::table::{Flip, Upstream, UpstreamId, UpstreamTable};
use crate::upstream::{self, GroupTls};

/// Knobs of the balancer that are not per-upstream.
#[derive(Debug, Clone)]
pub struct BalancerOptions {
    /// Bound on opening one upstream connection: the TCP connect and, for a TLS group, the
    /// handshake. Default 2s.
    pub connect_timeout: Duration,
    /// Other upstreams tried after a failed connect. Default 2.
    pub connect_retries: u32,
    /// No byte either way for this long ends a connection. Default 10m.
    pub idle_timeout: Duration,
    /// A half-closed connection idle this long is closed. Default 30s.
    pub half_close_timeout: Duration,
    /// Close an upstream's connections when it is marked DOWN. Default false.
    pub shutdown_sessions_on_down: bool,
    /// How long an idle copy thread is kept for reuse (read when the balancer is built).
    /// Default 30s.
    pub thread_keep_alive: Duration,
    /// What the upstream gets when a client ends without close_notify. Default
    /// [`Truncation::Fin`].
    pub truncation: Truncation,
}

impl Default for BalancerOptions {
    fn default() -> Self {
        let limits = crate::config::Limits::default();
        BalancerOptions {
            connect_timeout: limits.connect_timeout,
            connect_retries: crate::config::DEFAULT_CONNECT_RETRIES,
            idle_timeout: limits.idle_timeout,
            half_close_timeout: limits.half_close_timeout,
            shutdown_sessions_on_down: false,
            thread_keep_alive: crate::config::DEFAULT_THREAD_KEEP_ALIVE,
            truncation: Truncation::default(),
        }
    }
}

impl BalancerOptions {
    /// The options a config file describes.
    pub fn from_config(config: &Config) -> BalancerOptions {
        BalancerOptions {
            connect_timeout: config.limits.connect_timeout,
            connect_retries: config.health_check.connect_retries,
            idle_timeout: config.limits.idle_timeout,
            half_close_timeout: config.limits.half_close_timeout,
            shutdown_sessions_on_down: config.health_check.shutdown_sessions_on_down,
            thread_keep_alive: config.limits.thread_keep_alive,
            truncation: config.tls.truncation,
        }
    }
}

/// A client whose TLS handshake is complete.
#[derive(Debug)]
pub struct Client {
    /// The TLS state.
    pub tls: ServerConnection,
    /// The client's socket.
    pub sock: TcpStream,
    /// What a PROXY v2 header tells an upstream of this client, for groups that send one;
    /// `None`: no header is sent, whatever the group says.
    pub proxy: Option<ProxyFacts>,
    /// The client certificate's notAfter (Unix seconds), after which the connection is closed
    /// when `tls.close_at_cert_expiry` is on; `None`: never.
    pub not_after: Option<i64>,
}

/// Why a client was not forwarded.
#[derive(Debug)]
#[non_exhaustive]
pub enum BalanceError {
    /// No allowed upstream is UP.
    NoUpstream,
    /// Every connect attempt failed; each attempt's upstream and error.
    UpstreamConnect(Vec<(String, io::Error)>),
    /// The connection's two copy threads could not be had; no upstream was connected.
    Capacity(io::Error),
}

impl fmt::Display for BalanceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BalanceError::NoUpstream => f.write_str("no allowed upstream is up"),
            BalanceError::UpstreamConnect(attempts) => {
                f.write_str("every upstream connect failed:")?;
                for (name, e) in attempts {
                    write!(f, " {name}: {e};")?;
                }
                Ok(())
            }
            BalanceError::Capacity(e) => write!(f, "cannot start the copy threads: {e}"),
        }
    }
}

impl std::error::Error for BalanceError {}

/// A client the balancer could not forward, handed back untouched (no byte written) so the
/// caller can refuse it.
#[derive(Debug)]
pub struct Unbalanced {
    /// The client.
    pub client: Client,
    /// Why.
    pub error: BalanceError,
}

/// A forwarded connection that has ended.
#[derive(Debug)]
pub struct Session {
    /// The upstream it went to.
    pub upstream: Arc<str>,
    /// Bytes each way and how it ended.
    pub report: ForwardReport,
}

/// The least-connection balancer.
///
/// Its upstream set and options can be replaced while it runs ([`Balancer::update`]): an
/// upstream keeps its id, counts, health and counters across updates as long as its name stays,
/// so connections in flight are never disturbed and new ones see the true load.
#[derive(Debug)]
pub struct Balancer {
    table: Arc<UpstreamTable>,
    sessions: Arc<Sessions>,
    /// Threads that copy bytes, two per forwarded connection, reused across connections.
    copy_pool: ThreadPool,
    /// Shared with the flip handler the health thread holds.
    opts: Arc<RwLock<Arc<BalancerOptions>>>,
}

impl Balancer {
    /// A balancer over `upstreams` (their ids are their indices), all starting UP.
    pub fn new(upstreams: Vec<Upstream>, opts: BalancerOptions) -> Balancer {
        Balancer {
            table: UpstreamTable::new(upstreams),
            sessions: Arc::default(),
            copy_pool: ThreadPool::new("lclb-copy", COPY_THREAD_STACK, opts.thread_keep_alive),
            opts: Arc::new(RwLock::new(Arc::new(opts))),
        }
    }

    /// Replaces the upstream set and options (see [`UpstreamTable::update`]). Returns the ids
    /// of `upstreams`, in order.
    pub fn update(&self, upstreams: Vec<Upstream>, opts: BalancerOptions) -> Vec<UpstreamId> {
        let ids = self.table.update(upstreams);
        *self.opts.write() = Arc::new(opts);
        ids
    }

    /// The upstreams a config describes, each with the TLS of its group from `tls` (loaded
    /// from the same config by [`GroupTls::load`]).
    pub fn upstreams_from_config(config: &Config, tls: &GroupTls) -> Vec<Upstream> {
        config
            .upstreams
            .iter()
            .map(|u| Upstream {
                name: u.name.clone(),
                addrs: u.addrs.clone(),
                weight: u.weight,
                slow_start: u.slow_start,
                tls: tls.peer(&u.name),
                group: Arc::from(u.group.as_str()),
                proxy_group: config
                    .group(&u.group)
                    .filter(|g| g.proxy_protocol == ProxyProtocol::V2)
                    .map(|g| Arc::from(g.name.as_str())),
            })
            .collect()
    }

    /// The upstream table (records, counts, health).
    pub fn table(&self) -> &Arc<UpstreamTable> {
        &self.table
    }

    /// The connections being forwarded now.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// What to do when an upstream flips, for the health thread: see
    /// [`Balancer::upstream_flipped`].
    pub fn flip_handler(&self) -> impl Fn(&Flip) + Send + 'static {
        let (sessions, opts) = (Arc::clone(&self.sessions), Arc::clone(&self.opts));
        move |flip| {
            let opts = opts.read().clone();
            on_flip(&sessions, &opts, flip);
        }
    }

    /// Acts on a health flip: when an upstream goes DOWN and `shutdown_sessions_on_down` is
    /// set, its sessions are closed on a thread of their own, so neither the prober nor the
    /// connection that saw the failure waits for the closes.
    pub fn upstream_flipped(&self, flip: &Flip) {
        let opts = self.opts.read().clone();
        on_flip(&self.sessions, &opts, flip);
    }

    /// Picks the least-loaded UP upstream among `allowed`, connects to it (on failure, to the
    /// next least-loaded, up to `connect_retries` others; each failure, a failed TLS handshake
    /// with a TLS upstream included, counts as a failed health check), and starts forwarding
    /// on two pooled threads, one per direction. It returns once forwarding has started, and
    /// `on_end` gets the [`Session`] when both sides are done. When no upstream can be had, the client comes back untouched in the error.
    /// `client_id` names the client in logs.
    pub fn balance(
        &self,
        client: Client,
        client_id: &str,
        allowed: &[UpstreamId],
        on_end: impl FnOnce(Session) + Send + 'static,
    ) -> Result<(), Box<Unbalanced>> {
        let opts = self.opts.read().clone();
        // Before any upstream is touched: a connection that could not be copied must be
        // refused, not connected and then dropped.
        let threads = match self.copy_pool.reserve(2) {
            Ok(threads) => threads,
            Err(e) => {
                let error = BalanceError::Capacity(e);
                return Err(Box::new(Unbalanced { client, error }));
            }
        };
        let mut tried: Vec<UpstreamId> = Vec::new();
        let mut failures: Vec<(String, io::Error)> = Vec::new();
        let (guard, target, opened) = loop {
            let Some((guard, target)) = self.table.acquire(allowed, &tried) else {
                let error = if failures.is_empty() {
                    BalanceError::NoUpstream
                } else {
                    BalanceError::UpstreamConnect(failures)
                };
                return Err(Box::new(Unbalanced { client, error }));
            };
            // The PROXY header goes first, in cleartext, before any TLS.
            let preface = match (&target.proxy_group, &client.proxy) {
                (Some(group), Some(facts)) => Some(proxy::encode_v2(facts, group)),
                _ => None,
            };
            let tls = target.tls.as_deref();
            match upstream::open(&target.addrs, tls, preface.as_deref(), opts.connect_timeout) {
                Ok(opened) => break (guard, target, opened),
                Err(e) => {
                    target
                        .stats
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "connect to upstream {} failed for {client_id}: {e}",
                        target.name
                    );
                    if let Some(flip) = self.table.observe(guard.id(), false, &e.to_string()) {
                        self.upstream_flipped(&flip);
                    }
                    tried.push(guard.id());
                    failures.push((target.name.to_string(), io::Error::from(e)));
                    if tried.len() > opts.connect_retries as usize {
                        let error = BalanceError::UpstreamConnect(failures);
                        return Err(Box::new(Unbalanced { client, error }));
                    }
                }
            }
        };
        target
            .stats
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let registration = self.sessions.reserve();
        let (key, id) = (registration.key(), guard.id());
        let name = target.name.clone();
        let sessions = &self.sessions;
        let info = SessionInfo {
            upstream: id,
            group: target.group.clone(),
            client: Arc::from(client_id),
            not_after: client.not_after,
        };
        let on_start = |aborter| sessions.attach(key, info, aborter);
        forward::forward(
            Connected {
                tls: client.tls,
                client: client.sock,
                upstream: opened.sock,
                upstream_tls: opened.tls,
                stats: target.stats,
            },
            ForwardOptions {
                idle_timeout: opts.idle_timeout,
                half_close_timeout: opts.half_close_timeout,
                truncation: opts.truncation,
            },
            threads,
            on_start,
            Box::new(move |report| {
                // The count and the registration go before the callback runs, so whatever it
                // observes (a log line, a waiting test) is the final state.
                drop(registration);
                drop(guard);
                on_end(Session {
                    upstream: name,
                    report,
                });
            }),
        );
        Ok(())
    }
}

fn on_flip(sessions: &Arc<Sessions>, opts: &BalancerOptions, flip: &Flip) {
    if flip.up || !opts.shutdown_sessions_on_down {
        return;
    }
    let sessions = Arc::clone(sessions);
    let (id, name) = (flip.id, flip.name.clone());
    let spawned = std::thread::Builder::new()
        .name("lclb-close".into())
        .spawn(move || {
            let n = sessions.close_upstream(id, EndReason::UpstreamDown);
            if n > 0 {
                log::warn!("closed {n} connection(s) on {name}, marked DOWN");
            }
        });
    if let Err(e) = spawned {
        log::error!(
            "cannot start a thread to close the connections on {}: {e}",
            flip.name
        );
    }
}
