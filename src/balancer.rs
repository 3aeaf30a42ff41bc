//! The balancer: given a verified client, its identity and the upstreams it may reach, apply the
//! client's rate limit, pick the least-loaded healthy allowed upstream, connect (retrying on
//! other upstreams if the connect fails) and forward until both sides are done.
//!
//! This mirrors the original library's `NewLoadBalancer(upstreams)` and
//! `Balance(conn, clientId, allowedUpstreams)`. It does not do TLS or authorization: the server
//! hands it a client whose handshake is done and whose allowed upstreams are known.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rustls::ServerConnection;

use crate::config::{ClientLimits, Config, Truncation};
use crate::forward::{
    self, Aborter, Connected, EndReason, ForwardOptions, ForwardReport, COPY_THREAD_STACK,
};
use crate::health::Health;
use crate::pool::ThreadPool;
use crate::ratelimit::RateLimiter;
use crate::stats::{Refusal, UpstreamStats};
use crate::table::{ConnTable, UpstreamId};
use crate::tls;

/// One upstream server and its counters.
#[derive(Debug)]
pub struct Upstream {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Addresses tried in order on connect.
    pub addrs: Vec<SocketAddr>,
    /// Relative capacity for the least-connection choice.
    pub weight: u32,
    /// After coming back UP, the time over which its weight ramps up to full (zero: at once).
    pub slow_start: Duration,
    /// Counters of what went through this upstream.
    pub stats: Arc<UpstreamStats>,
}

impl Upstream {
    /// An upstream with weight 1 at one address.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Upstream {
        Upstream {
            name: name.into(),
            addrs: vec![addr],
            weight: 1,
            slow_start: Duration::ZERO,
            stats: Arc::default(),
        }
    }
}

/// Knobs of the balancer that are not per-upstream.
#[derive(Debug, Clone)]
pub struct BalancerOptions {
    /// Bound on one TCP connect to an upstream. Default 2s.
    pub connect_timeout: Duration,
    /// Other upstreams tried after a failed connect. Default 2.
    pub connect_retries: u32,
    /// No byte either way for this long ends a connection. Default 10m.
    pub idle_timeout: Duration,
    /// A half-closed connection idle this long is closed. Default 30s.
    pub half_close_timeout: Duration,
    /// The limits of identities without an override. Default 10/s, burst 20, no cap on
    /// concurrent connections.
    pub default_limits: ClientLimits,
    /// Per-identity limits.
    pub client_limits: HashMap<String, ClientLimits>,
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
            default_limits: ClientLimits::default(),
            client_limits: HashMap::new(),
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
            default_limits: config.rate_limit,
            client_limits: config
                .clients
                .iter()
                .map(|c| (c.cn.clone(), c.rate_limit))
                .collect(),
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
}

/// Why a client was not forwarded. The client has been sent close_notify and closed.
#[derive(Debug)]
#[non_exhaustive]
pub enum BalanceError {
    /// The identity exceeded its rate limit.
    RateLimited,
    /// The identity already has `max_concurrent` connections open.
    TooManyConnections(u32),
    /// No allowed upstream is UP.
    NoUpstream,
    /// Every connect attempt failed; each attempt's upstream and error.
    UpstreamConnect(Vec<(String, io::Error)>),
    /// The connection's two copy threads could not be had; no upstream was connected.
    Capacity(io::Error),
}

impl BalanceError {
    /// The refusal this error is counted as.
    pub fn refusal(&self) -> Refusal {
        match self {
            BalanceError::RateLimited | BalanceError::TooManyConnections(_) => Refusal::RateLimited,
            BalanceError::NoUpstream => Refusal::NoUpstream,
            BalanceError::UpstreamConnect(_) => Refusal::UpstreamConnect,
            BalanceError::Capacity(_) => Refusal::Capacity,
        }
    }
}

impl fmt::Display for BalanceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BalanceError::RateLimited => f.write_str("rate limit exceeded"),
            BalanceError::TooManyConnections(max) => {
                write!(
                    f,
                    "client already has {max} connections open (max_concurrent)"
                )
            }
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

/// The connections being forwarded right now, so they can be ended from outside: all of an
/// upstream's when it goes DOWN (if configured), all of them when a drain runs out of time.
#[derive(Debug, Default)]
pub struct Sessions {
    next: AtomicU64,
    live: Mutex<HashMap<u64, (UpstreamId, Aborter)>>,
}

/// Removes a session from [`Sessions`] when its connection ends.
struct Registered {
    sessions: Arc<Sessions>,
    key: Option<u64>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            self.sessions.live.lock().remove(&key);
        }
    }
}

impl Sessions {
    /// A key for a session about to start.
    fn reserve(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn register(&self, key: u64, upstream: UpstreamId, aborter: Aborter) {
        self.live.lock().insert(key, (upstream, aborter));
    }

    /// Ends every session on `upstream`; returns how many.
    pub fn abort_upstream(&self, upstream: UpstreamId, reason: EndReason) -> usize {
        let doomed: Vec<Aborter> = self
            .live
            .lock()
            .values()
            .filter(|(u, _)| *u == upstream)
            .map(|(_, a)| a.clone())
            .collect();
        // Outside the lock: closing writes to sockets and waits a moment for them.
        let n = doomed.len();
        forward::close_all(doomed, reason);
        n
    }

    /// Ends every session; returns how many.
    pub fn abort_all(&self, reason: EndReason) -> usize {
        let doomed: Vec<Aborter> = self.live.lock().values().map(|(_, a)| a.clone()).collect();
        let n = doomed.len();
        forward::close_all(doomed, reason);
        n
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

/// Connections open per client identity, for `max_concurrent` (HAProxy's `sc_conn_cur`).
#[derive(Debug, Default)]
struct ClientSlots {
    open: Mutex<HashMap<String, u32>>,
}

/// One open connection of a client; dropping it gives the slot back.
struct ClientSlot {
    slots: Arc<ClientSlots>,
    identity: Option<String>,
}

impl ClientSlots {
    /// Takes a slot for `identity` unless it already has `max` open (0 = no cap, and then
    /// nothing is tracked).
    fn take(self: &Arc<Self>, identity: &str, max: u32) -> Option<ClientSlot> {
        if max == 0 {
            return Some(ClientSlot {
                slots: Arc::clone(self),
                identity: None,
            });
        }
        let mut open = self.open.lock();
        let n = open.entry(identity.to_string()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            slots: Arc::clone(self),
            identity: Some(identity.to_string()),
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        if let Some(identity) = &self.identity {
            let mut open = self.slots.open.lock();
            if let Some(n) = open.get_mut(identity) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    open.remove(identity);
                }
            }
        }
    }
}

/// A forwarded connection that has ended.
#[derive(Debug)]
pub struct Session {
    /// The upstream it went to.
    pub upstream: String,
    /// Bytes each way and how it ended.
    pub report: ForwardReport,
}

/// The upstreams and options of one configuration.
#[derive(Debug)]
struct Generation {
    /// Every upstream ever configured, indexed by [`UpstreamId`]; removed ones stay so that
    /// connections in flight on them keep their name and counters.
    all: Vec<Arc<Upstream>>,
    /// The ids of the configured upstreams, in config order.
    current: Vec<UpstreamId>,
    opts: BalancerOptions,
}

/// The least-connection balancer.
///
/// Its upstream set and options can be replaced while it runs ([`Balancer::update`]): an
/// upstream keeps its id, counts, health and counters across updates as long as its name stays,
/// so connections in flight are never disturbed and new ones see the true load.
#[derive(Debug)]
pub struct Balancer {
    table: Arc<ConnTable>,
    health: Arc<Health>,
    sessions: Arc<Sessions>,
    limiter: RateLimiter,
    client_slots: Arc<ClientSlots>,
    /// Threads that copy upstream -> client, reused across connections.
    copy_pool: ThreadPool,
    generation: RwLock<Arc<Generation>>,
}

impl Balancer {
    /// A balancer over `upstreams` (their ids are their indices), all starting UP.
    pub fn new(upstreams: Vec<Upstream>, opts: BalancerOptions) -> Balancer {
        Balancer::with_limiter(upstreams, opts, RateLimiter::default())
    }

    /// As [`Balancer::new`], with a given rate limiter (tests inject a clock through it).
    pub fn with_limiter(
        upstreams: Vec<Upstream>,
        opts: BalancerOptions,
        limiter: RateLimiter,
    ) -> Balancer {
        let table = ConnTable::new(&[]);
        let health = Arc::new(Health::new(Vec::new(), table.clone()));
        let sessions = Arc::<Sessions>::default();
        let balancer = Balancer {
            table,
            health,
            sessions,
            limiter,
            client_slots: Arc::default(),
            copy_pool: ThreadPool::new("lclb-copy", COPY_THREAD_STACK, opts.thread_keep_alive),
            generation: RwLock::new(Arc::new(Generation {
                all: Vec::new(),
                current: Vec::new(),
                opts: opts.clone(),
            })),
        };
        balancer.update(upstreams, opts);
        balancer
    }

    /// Replaces the upstream set and options. An upstream whose name was already known keeps
    /// its id, counts, health and counters (its address, weight and slow start are updated);
    /// new names are added UP; missing names stop receiving new connections, while those in
    /// flight on them go on. Returns the ids of `upstreams`, in order.
    pub fn update(&self, upstreams: Vec<Upstream>, opts: BalancerOptions) -> Vec<UpstreamId> {
        let mut generation = self.generation.write();
        let mut all = generation.all.clone();
        let mut current = Vec::with_capacity(upstreams.len());
        for mut upstream in upstreams {
            let id = match all.iter().position(|u| u.name == upstream.name) {
                Some(i) => {
                    let id = UpstreamId(i);
                    upstream.stats = all[i].stats.clone();
                    self.table
                        .reconfigure(id, upstream.weight, upstream.slow_start);
                    id
                }
                None => {
                    let id = self.table.add(upstream.weight, upstream.slow_start);
                    let health_id = self.health.add(&upstream.name);
                    debug_assert_eq!(id, health_id, "table and health grow together");
                    id
                }
            };
            if id.0 == all.len() {
                all.push(Arc::new(upstream));
            } else {
                all[id.0] = Arc::new(upstream);
            }
            current.push(id);
        }
        let sessions = self.sessions.clone();
        if opts.shutdown_sessions_on_down {
            let health = Arc::downgrade(&self.health);
            self.health.set_listener(Box::new(move |id, up| {
                if !up {
                    let n = sessions.abort_upstream(id, EndReason::UpstreamDown);
                    if n > 0 {
                        let name = health.upgrade().map(|h| h.name(id)).unwrap_or_default();
                        log::warn!("closed {n} connection(s) on {name}, marked DOWN");
                    }
                }
            }));
        } else {
            self.health.clear_listener();
        }
        *generation = Arc::new(Generation {
            all,
            current: current.clone(),
            opts,
        });
        current
    }

    /// The upstreams a config describes.
    pub fn upstreams_from_config(config: &Config) -> Vec<Upstream> {
        config
            .upstreams
            .iter()
            .map(|u| Upstream {
                name: u.name.clone(),
                addrs: u.addrs.clone(),
                weight: u.weight,
                slow_start: u.slow_start,
                stats: Arc::default(),
            })
            .collect()
    }

    /// The configured upstreams with their ids, in config order.
    pub fn upstreams(&self) -> Vec<(UpstreamId, Arc<Upstream>)> {
        let generation = self.generation.read().clone();
        generation
            .current
            .iter()
            .map(|&id| (id, generation.all[id.0].clone()))
            .collect()
    }

    /// The connection-count table (active counts and UP/DOWN state).
    pub fn table(&self) -> &Arc<ConnTable> {
        &self.table
    }

    /// The connections being forwarded now.
    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// The health state of the upstreams, shared with the health-check thread.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// The rate limiter's view: how many identities have a bucket now.
    pub fn tracked_clients(&self) -> usize {
        self.limiter.tracked_clients()
    }

    /// Applies `client_id`'s rate limit and concurrent-connection cap, picks the least-loaded UP
    /// upstream among `allowed`, connects to it (on failure, to the next least-loaded, up to
    /// `connect_retries` others), and starts forwarding on two pooled threads, one per
    /// direction; it returns once forwarding has started, and `on_end` gets the [`Session`]
    /// when both sides are done. On refusal the client is sent close_notify and closed before
    /// this returns, and no upstream has been touched for a rate-limited client.
    pub fn balance(
        &self,
        mut client: Client,
        client_id: &str,
        allowed: &[UpstreamId],
        on_end: impl FnOnce(Session) + Send + 'static,
    ) -> Result<(), BalanceError> {
        let generation = self.generation.read().clone();
        let opts = &generation.opts;
        let limits = opts
            .client_limits
            .get(client_id)
            .copied()
            .unwrap_or(opts.default_limits);
        if !self.limiter.try_acquire(client_id, limits.rate) {
            tls::close_gracefully(&mut client.tls, &client.sock);
            return Err(BalanceError::RateLimited);
        }
        let Some(slot) = self.client_slots.take(client_id, limits.max_concurrent) else {
            tls::close_gracefully(&mut client.tls, &client.sock);
            return Err(BalanceError::TooManyConnections(limits.max_concurrent));
        };
        // Before any upstream is touched: a connection that could not be copied must be
        // refused, not connected and then dropped.
        let threads = match self.copy_pool.reserve(2) {
            Ok(threads) => threads,
            Err(e) => {
                tls::close_gracefully(&mut client.tls, &client.sock);
                return Err(BalanceError::Capacity(e));
            }
        };

        let mut tried: Vec<UpstreamId> = Vec::new();
        let mut failures: Vec<(String, io::Error)> = Vec::new();
        let (guard, upstream_sock) = loop {
            let Some(guard) = self.table.acquire(allowed, &tried) else {
                tls::close_gracefully(&mut client.tls, &client.sock);
                return Err(if failures.is_empty() {
                    BalanceError::NoUpstream
                } else {
                    BalanceError::UpstreamConnect(failures)
                });
            };
            let upstream = &generation.all[guard.id().0];
            match connect(&upstream.addrs, opts.connect_timeout) {
                Ok(sock) => break (guard, sock),
                Err(e) => {
                    upstream
                        .stats
                        .connect_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.health.observe_connect_failure(guard.id(), &e);
                    log::warn!("connect to upstream {} failed: {e}", upstream.name);
                    tried.push(guard.id());
                    failures.push((upstream.name.clone(), e));
                    if tried.len() > opts.connect_retries as usize {
                        tls::close_gracefully(&mut client.tls, &client.sock);
                        return Err(BalanceError::UpstreamConnect(failures));
                    }
                }
            }
        };
        let upstream = &generation.all[guard.id().0];
        upstream
            .stats
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        let _ = upstream_sock.set_nodelay(true);
        let key = self.sessions.reserve();
        let registered = Registered {
            sessions: Arc::clone(&self.sessions),
            key: Some(key),
        };
        let id = guard.id();
        let sessions = &self.sessions;
        let name = upstream.name.clone();
        forward::forward(
            Connected {
                tls: client.tls,
                client: client.sock,
                upstream: upstream_sock,
                stats: upstream.stats.clone(),
            },
            ForwardOptions {
                idle_timeout: opts.idle_timeout,
                half_close_timeout: opts.half_close_timeout,
                truncation: opts.truncation,
            },
            threads,
            |aborter| sessions.register(key, id, aborter),
            Box::new(move |report| {
                // The count, the client's slot and the registration go before the callback
                // runs, so whatever it observes (a log line, a waiting test) is the final state.
                drop(registered);
                drop(guard);
                drop(slot);
                on_end(Session {
                    upstream: name,
                    report,
                });
            }),
        );
        Ok(())
    }
}

/// Connects to the first of `addrs` that answers, each bounded by `timeout`.
fn connect(addrs: &[SocketAddr], timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "upstream has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(sock) => return Ok(sock),
            Err(e) => last = e,
        }
    }
    Err(last)
}
