//! The server: the listener, the accept loop, each connection's path from accepted socket to
//! balancer, configuration reloads, and the drain on stop.
//!
//! One thread accepts. Each accepted socket gets its own thread, which runs the TLS handshake
//! under a deadline, reads the client's identity, checks authorization and hands the client to
//! the [`Balancer`], which starts two copy threads, one per direction; the handshake thread is
//! then free for the next connection. Threads come from pools ([`crate::pool`]) so none is
//! created per connection in steady state, and the handshake's deep stack is not kept by a
//! connection that is merely held open. Refusals are counted (see [`Stats`]) and logged once
//! each, with the reason.
//!
//! A connection takes the current [`Runtime`] (TLS config, authorization) when it is accepted
//! and keeps it: a reload swaps in a new one for later connections and never touches those in
//! flight. Stopping: [`ShutdownHandle::shutdown`] sets a flag and connects to the listener to
//! wake the blocked `accept`; the accept loop then closes the listener (new connects are
//! refused), waits up to `limits.drain_timeout` for connections in flight, closes what is
//! left, stops the health thread and returns.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use rustls::{HandshakeKind, ServerConnection};

use crate::access;
use crate::authz::Authorizer;
use crate::balancer::{Balancer, BalancerOptions, Client, Session};
use crate::config::RateLimit;
use crate::config::{Config, ConfigError};
use crate::forward::EndReason;
use crate::health::{HealthChecker, ProbeSettings, TcpProbe};
use crate::pool::ThreadPool;
use crate::ratelimit::RateLimiter;
use crate::stats::{Refusal, Stats};
use crate::tls::{self, SessionCache, TlsContext};

/// Stack size of a connection thread: it runs the handshake (certificate verification,
/// signatures) and then copies client-to-upstream. Small, so thousands of connections fit.
pub const CONNECTION_THREAD_STACK: usize = 256 * 1024;

/// Pause after `accept` fails for lack of resources (fds, memory), so the loop neither spins
/// nor stops; existing connections keep being served meanwhile.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Why the server could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration or a file it names is unusable.
    Config(ConfigError),
    /// The listen address could not be bound.
    Bind {
        /// The config key naming the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// A thread (the health checker) could not be started.
    Thread(io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => e.fmt(f),
            StartError::Bind { key, addr, source } => {
                write!(f, "cannot listen on {addr} (config key `{key}`): {source}")
            }
            StartError::Thread(e) => write!(f, "cannot start a thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<ConfigError> for StartError {
    fn from(e: ConfigError) -> Self {
        StartError::Config(e)
    }
}

/// What each new connection is served with: one configuration's TLS and authorization.
#[derive(Debug)]
pub struct Runtime {
    /// The configuration this runtime was built from.
    pub config: Config,
    tls: TlsContext,
    authz: Authorizer,
}

impl Runtime {
    /// The TLS material new connections are served with.
    pub fn tls(&self) -> &TlsContext {
        &self.tls
    }
}

/// State shared by the accept loop, connection threads, the reloader and the metrics server.
#[derive(Debug)]
pub struct Shared {
    runtime: RwLock<Arc<Runtime>>,
    /// The balancer (upstreams, counts, health, sessions).
    pub balancer: Balancer,
    /// The counters.
    pub stats: Stats,
    health: Mutex<Option<HealthChecker>>,
    /// New connections per source address, checked before the handshake (when configured).
    per_ip: RateLimiter<IpAddr>,
    /// Threads that run a connection's handshake and then its client -> upstream copy.
    conn_pool: ThreadPool,
    /// TLS sessions, kept across reloads so that clients keep resuming.
    sessions: SessionCache,
}

impl Shared {
    /// The runtime new connections get now.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.read().clone()
    }

    /// (Re)starts the health-check thread over the balancer's current upstreams.
    fn restart_health(&self, config: &Config) -> io::Result<()> {
        let mut slot = self.health.lock();
        if let Some(mut old) = slot.take() {
            old.stop();
        }
        self.balancer
            .health()
            .set_thresholds(config.health_check.rise, config.health_check.fall);
        let targets = self
            .balancer
            .upstreams()
            .into_iter()
            .map(|(id, u)| (id, u.addrs.clone()))
            .collect();
        *slot = Some(HealthChecker::spawn(
            self.balancer.health().clone(),
            targets,
            ProbeSettings {
                interval: config.health_check.interval,
                timeout: config.health_check.timeout,
            },
            Arc::new(TcpProbe),
        )?);
        Ok(())
    }

    fn stop_health(&self) {
        if let Some(mut checker) = self.health.lock().take() {
            checker.stop();
        }
    }

    /// Re-reads the config at `path` and every file it names; if all is valid, new
    /// connections use it from now on, and connections in flight are untouched. If anything
    /// is wrong, the running config stays and the error is returned (and counted).
    pub fn reload(&self, path: &Path) -> Result<(), StartError> {
        let result = self.try_reload(path);
        match &result {
            Ok(()) => {
                self.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
                log::info!("config reloaded from {}", path.display());
            }
            Err(e) => {
                self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                log::error!("config reload failed, keeping the running config: {e}");
            }
        }
        result
    }

    fn try_reload(&self, path: &Path) -> Result<(), StartError> {
        let config = Config::load(path)?;
        let tls = TlsContext::load_with(&config.tls, &self.sessions)?;
        let old = self.runtime();
        if config.listen != old.config.listen {
            log::warn!(
                "reload: `listen` changed to {}; it takes effect only after a restart",
                config.listen
            );
        }
        if config.metrics_listen != old.config.metrics_listen {
            log::warn!("reload: `metrics_listen` changed; it takes effect only after a restart");
        }
        // Everything is valid: nothing below can fail except starting the health thread, and
        // then the new upstreams are live but not probed, which is logged.
        let ids = self.balancer.update(
            Balancer::upstreams_from_config(&config),
            BalancerOptions::from_config(&config),
        );
        access::set_format(config.log_format);
        let runtime = Runtime {
            authz: Authorizer::from_config(&config, &ids),
            tls,
            config,
        };
        if let Err(e) = self.restart_health(&runtime.config) {
            log::error!("reload: cannot restart the health checker: {e}");
        }
        *self.runtime.write() = Arc::new(runtime);
        Ok(())
    }
}

/// A bound, not yet running, balancer server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stopping: Arc<AtomicBool>,
}

/// Stops a running [`Server`] from another thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    stopping: Arc<AtomicBool>,
    wake: SocketAddr,
}

impl ShutdownHandle {
    /// Asks the server to stop accepting and drain. Returns at once.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // accept() has no timeout; a connection to ourselves is what wakes it.
        let _ = TcpStream::connect_timeout(&self.wake, Duration::from_secs(1));
    }
}

/// The address to connect to in order to reach a listener bound to `addr`.
pub(crate) fn wake_address(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

impl Server {
    /// Loads the TLS files, binds the listen address and starts the health checker.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        let sessions = SessionCache::default();
        let tls = TlsContext::load_with(&config.tls, &sessions)?;
        let listener = TcpListener::bind(config.listen).map_err(|source| StartError::Bind {
            key: "listen",
            addr: config.listen,
            source,
        })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            key: "listen",
            addr: config.listen,
            source,
        })?;
        let balancer = Balancer::new(
            Balancer::upstreams_from_config(&config),
            BalancerOptions::from_config(&config),
        );
        let ids: Vec<_> = balancer.upstreams().into_iter().map(|(id, _)| id).collect();
        access::set_format(config.log_format);
        let runtime = Runtime {
            authz: Authorizer::from_config(&config, &ids),
            tls,
            config,
        };
        let shared = Arc::new(Shared {
            balancer,
            stats: Stats::default(),
            health: Mutex::new(None),
            per_ip: RateLimiter::default(),
            conn_pool: ThreadPool::new(
                "lclb-conn",
                CONNECTION_THREAD_STACK,
                runtime.config.limits.thread_keep_alive,
            ),
            runtime: RwLock::new(Arc::new(runtime)),
            sessions,
        });
        shared
            .restart_health(&shared.runtime().config)
            .map_err(StartError::Thread)?;
        Ok(Server {
            listener,
            local_addr,
            shared,
            stopping: Arc::default(),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The state shared with connection threads: balancer, counters, current runtime. Also
    /// what reloads and the metrics endpoint work on.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// A handle that stops this server from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            stopping: self.stopping.clone(),
            wake: wake_address(self.local_addr),
        }
    }

    /// Accepts and serves connections until shut down, then drains: returns once the
    /// connections in flight have ended, or `limits.drain_timeout` has passed and the rest
    /// have been closed.
    pub fn run(self) {
        let runtime = self.shared.runtime();
        log::info!(
            "lclb listening on {} with {} upstream(s) and {} client(s)",
            self.local_addr,
            runtime.config.upstreams.len(),
            runtime.config.clients.len()
        );
        drop(runtime);
        let mut next_id: u64 = 1;
        while !self.stopping.load(Ordering::SeqCst) {
            match self.listener.accept() {
                Ok((sock, peer)) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    admit(&self.shared, sock, peer, next_id);
                    next_id += 1;
                }
                Err(e) => accept_failed(&e),
            }
        }
        let Server {
            listener, shared, ..
        } = self;
        // Close the listener first so new connects are refused, not queued.
        drop(listener);
        drain(&shared);
    }
}

fn drain(shared: &Shared) {
    let stats = &shared.stats;
    let open = stats.active_clients.load(Ordering::SeqCst);
    let timeout = shared.runtime().config.limits.drain_timeout;
    log::info!(
        "lclb stopping: listener closed, draining {open} connection(s) for up to {}",
        humantime::format_duration(timeout)
    );
    let deadline = Instant::now() + timeout;
    while stats.active_clients.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = stats.active_clients.load(Ordering::SeqCst);
    if left > 0 {
        let closed = shared.balancer.sessions().abort_all(EndReason::Shutdown);
        log::warn!("drain timeout: closing {closed} connection(s) still open");
        // Aborted links end within moments; handshakes end at their own deadline.
        let grace = Instant::now() + Duration::from_secs(2);
        while stats.active_clients.load(Ordering::SeqCst) > 0 && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    shared.stop_health();
    log::info!("lclb stopped");
}

fn admit(shared: &Arc<Shared>, sock: TcpStream, peer: SocketAddr, id: u64) {
    let accepted_at = Instant::now();
    let stats = &shared.stats;
    stats.accepted.fetch_add(1, Ordering::Relaxed);
    // Every refusal here happens before a thread or a handshake is spent on the socket, which
    // is closed at once (dropped) rather than left in the kernel's backlog.
    let refuse = |reason: Refusal, detail: &dyn fmt::Display| {
        stats.refuse(reason);
        access::refused(id, "-", peer, reason, detail);
    };
    let runtime = shared.runtime();
    let limits = &runtime.config.limits;
    if limits.per_ip_handshake_rate > 0.0 {
        let rate = RateLimit {
            rate: limits.per_ip_handshake_rate,
            burst: limits.per_ip_handshake_burst,
        };
        if !shared.per_ip.try_acquire(&peer.ip(), rate) {
            return refuse(Refusal::RateLimited, &"per_ip_handshake_rate exceeded");
        }
    }
    let max = limits.max_connections as u64;
    if stats.active_clients.fetch_add(1, Ordering::SeqCst) >= max {
        stats.active_clients.fetch_sub(1, Ordering::SeqCst);
        return refuse(Refusal::Capacity, &format_args!("{max} connections open"));
    }
    let active = ActiveClient(shared.clone());
    let max = limits.max_handshakes as u64;
    if stats.active_handshakes.fetch_add(1, Ordering::SeqCst) >= max {
        stats.active_handshakes.fetch_sub(1, Ordering::SeqCst);
        return refuse(
            Refusal::Capacity,
            &format_args!("{max} handshakes in progress"),
        );
    }
    let handshaking = Handshaking(shared.clone());
    let spawned = shared.conn_pool.execute(move || {
        serve(active, &runtime, sock, peer, id, accepted_at, handshaking);
    });
    if let Err(e) = spawned {
        // The closure (and with it the socket and both counts) was dropped.
        refuse(
            Refusal::Capacity,
            &format_args!("cannot start a thread: {e}"),
        );
        std::thread::sleep(ACCEPT_BACKOFF);
    }
}

fn accept_failed(e: &io::Error) {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM: out of resources; wait for some to come back.
    if matches!(e.raw_os_error(), Some(23 | 24 | 105 | 12)) {
        log::warn!("accept failed: {e}; pausing {ACCEPT_BACKOFF:?}");
        std::thread::sleep(ACCEPT_BACKOFF);
    } else {
        log::debug!("accept failed: {e}");
    }
}

/// Holds one unit of `active_clients` for the life of a connection thread.
struct ActiveClient(Arc<Shared>);

impl Drop for ActiveClient {
    fn drop(&mut self) {
        self.0.stats.active_clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Holds one unit of `active_handshakes` until the handshake ends.
struct Handshaking(Arc<Shared>);

impl Drop for Handshaking {
    fn drop(&mut self) {
        self.0
            .stats
            .active_handshakes
            .fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves one accepted socket: handshake, identity, authorization, then the balancer, which
/// takes the connection (and `active`, its place in the count) to its two copy threads.
fn serve(
    active: ActiveClient,
    rt: &Runtime,
    sock: TcpStream,
    peer: SocketAddr,
    id: u64,
    accepted_at: Instant,
    handshaking: Handshaking,
) {
    let shared = Arc::clone(&active.0);
    let stats = &shared.stats;
    let _ = sock.set_nodelay(true);
    let refuse = |reason: Refusal, client: &str, detail: &dyn fmt::Display| {
        stats.refuse(reason);
        access::refused(id, client, peer, reason, detail);
    };
    let mut conn = match ServerConnection::new(rt.tls.server_config.clone()) {
        Ok(c) => c,
        Err(e) => return refuse(Refusal::Tls, "-", &e),
    };
    let deadline = accepted_at + rt.config.limits.handshake_timeout;
    let handshake = tls::handshake(&mut conn, &sock, deadline);
    drop(handshaking);
    if let Err(e) = handshake {
        return refuse(Refusal::Tls, "-", &e);
    }
    stats.handshakes.observe(accepted_at.elapsed());
    if conn.handshake_kind() == Some(HandshakeKind::Resumed) {
        stats.tls_resumptions.fetch_add(1, Ordering::Relaxed);
    }
    // Refusals below send close_notify; do not let a client that stopped reading hold us.
    let _ = sock.set_write_timeout(Some(Duration::from_secs(1)));
    let cn = match tls::peer_identity(&conn) {
        Ok(cn) => cn,
        Err(e) => {
            tls::close_gracefully(&mut conn, &sock);
            return refuse(Refusal::Tls, "-", &e);
        }
    };
    if let Err(e) = rt.tls.check_peer(&conn) {
        tls::close_gracefully(&mut conn, &sock);
        return refuse(Refusal::Tls, &cn, &e);
    }
    let Some(allowed) = rt.authz.allowed(&cn) else {
        tls::close_gracefully(&mut conn, &sock);
        return refuse(
            Refusal::Unauthorized,
            &cn,
            &"no [[client]] entry for this identity",
        );
    };
    let client = Client { tls: conn, sock };
    let started = Instant::now();
    let identity = cn.clone();
    let on_end = move |session: Session| {
        access::finished(id, &identity, peer, &session, started.elapsed());
        // The connection no longer counts once its line is written.
        drop(active);
    };
    if let Err(e) = shared.balancer.balance(client, &cn, &allowed, on_end) {
        refuse(e.refusal(), &cn, &e);
    }
}
