//! The server: the listener, the accept loop, each connection's path from accepted socket to
//! balancer, configuration reloads, and the drain on stop.
//!
//! One thread accepts. Each accepted socket passes admission's first gate
//! ([`Admission::before_handshake`]) on the accept thread, then gets a thread from a pool, which
//! runs the TLS handshake under a deadline, passes admission's second gate (peer check,
//! identity, authorization, per-client limits) and hands the client to the [`Balancer`], which
//! starts two copy threads, one per direction; the handshake thread is then free for the next
//! connection. Threads come from pools ([`crate::pool`]) so none is created per connection in
//! steady state, and the handshake's deep stack is not kept by a connection that is merely held
//! open. Every refusal, whichever gate or the balancer produced it, goes through one function
//! here ([`refuse`]): one counter, one access-log line.
//!
//! A connection takes the current [`Runtime`] (TLS config, authorization) when it is accepted
//! and keeps it: a reload swaps in a new one for later connections in one step, and never
//! touches those in flight. Stopping: [`ShutdownHandle::shutdown`] sets a flag and connects to
//! the listener to wake the blocked `accept`; the accept loop then closes the listener (new
//! connects are refused), waits up to `limits.drain_timeout` for connections in flight, closes
//! what is left, stops the health thread and returns. An upgrade stops it quietly
//! ([`ShutdownHandle::shutdown_quietly`]): the new process accepts on the same socket, so
//! there is no wake-up connection (the other process might take it), `accept` returns within
//! its poll timeout, and closing this process's handle on the socket refuses nothing.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::{Mutex, RwLock};
use rustls::ServerConnection;

use crate::access;
use crate::admission::{Admission, Handshaking, Permit, Refused};
use crate::authz::Authorizer;
use crate::balancer::{Balancer, BalancerOptions, Client, Session, Unbalanced};
use crate::cluster::Cluster;
use crate::config::{Config, ProxyProtocol};
use crate::enforce;
use crate::forward::EndReason;
use crate::health::{HealthChecker, ProbeSettings, TcpProbe};
use crate::pool::ThreadPool;
use crate::proxy::{self, ProxyFacts};
use crate::refusal_log;
use crate::sockets;
use crate::stats::Stats;
use crate::systemd;
use crate::threads;
use crate::tls::{self, SessionCache, TlsContext};
use crate::upstream::GroupTls;

/// Stack size of a connection thread: it runs the handshake (certificate verification,
/// signatures) and the routing. Small, so thousands of connections fit.
pub const CONNECTION_THREAD_STACK: usize = 256 * 1024;

/// Pause after `accept` fails for lack of resources (fds, memory), so the loop neither spins
/// nor stops; existing connections keep being served meanwhile.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

pub use crate::start_error::StartError;

/// What each new connection is served with: one configuration's TLS and authorization.
#[derive(Debug)]
pub struct Runtime {
    /// The configuration this runtime was built from.
    pub config: Config,
    tls: TlsContext,
    authz: Authorizer,
    /// Whether any group sends PROXY v2 headers, so connections need their facts.
    sends_proxy: bool,
    /// The signature and key algorithms of lclb's certificate, for PROXY v2 headers.
    server_algorithms: (Option<String>, Option<String>),
}

impl Runtime {
    fn new(config: Config, tls: TlsContext, authz: Authorizer) -> Runtime {
        let sends_proxy = config
            .groups
            .iter()
            .any(|g| g.proxy_protocol == ProxyProtocol::V2);
        let server_algorithms = proxy::server_cert_algorithms(tls.server_certificate());
        Runtime {
            config,
            tls,
            authz,
            sends_proxy,
            server_algorithms,
        }
    }

    /// What a PROXY v2 header says of a client admitted as `permit` on `conn`, from `peer`
    /// to `local`, as connection `id`; `None` when no group sends one.
    fn proxy_facts(
        &self,
        conn: &ServerConnection,
        permit: &Permit,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        id: u64,
    ) -> Option<ProxyFacts> {
        if !self.sends_proxy {
            return None;
        }
        let (sig_alg, key_alg) = self.server_algorithms.clone();
        Some(ProxyFacts {
            source: peer,
            destination: local.unwrap_or(self.config.listen),
            authority: conn.server_name().map(str::to_string),
            unique_id: id.to_string(),
            tls_version: conn
                .protocol_version()
                .map_or("unknown", proxy::tls_version_name),
            cipher: conn
                .negotiated_cipher_suite()
                .map_or("unknown", proxy::cipher_name),
            cn: permit.identity.cn.clone(),
            cert_in_connection: conn.handshake_kind() != Some(rustls::HandshakeKind::Resumed),
            sig_alg,
            key_alg,
            identity: permit.identity.name.clone(),
            uri_san: permit.identity.first_uri_san.clone(),
        })
    }

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
    pub stats: Arc<Stats>,
    /// The gates every connection passes, and the counts they keep.
    pub admission: Arc<Admission>,
    health: Mutex<Option<HealthChecker>>,
    /// Threads that run a connection's handshake and routing.
    conn_pool: ThreadPool,
    /// TLS sessions, kept across reloads so that clients keep resuming.
    tls_sessions: SessionCache,
    /// Held while a reload validates and swaps: one at a time.
    reloading: Mutex<()>,
    /// When the server was bound.
    started: SystemTime,
    /// The running config's generation and when it was loaded.
    loaded: Mutex<Loaded>,
    /// The server's stop flag: set once a stop was asked for, while the drain runs.
    stopping: Arc<AtomicBool>,
}

/// Which configuration is running: for `/status` and the `lclb_config_*` metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// 1 for the config the server started with, one more for each reload that took effect
    /// (a refused reload leaves it).
    pub generation: u64,
    /// When that config was loaded: the start, or the last reload that took effect.
    pub at: SystemTime,
}

fn probe_settings(config: &Config) -> ProbeSettings {
    ProbeSettings {
        interval: config.health_check.interval,
        timeout: config.health_check.timeout,
    }
}

impl Shared {
    /// The runtime new connections get now.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.read().clone()
    }

    /// When the server was bound.
    pub fn started(&self) -> SystemTime {
        self.started
    }

    /// The running config's generation and load time.
    pub fn loaded(&self) -> Loaded {
        *self.loaded.lock()
    }

    /// Whether the server has been asked to stop: it no longer accepts and is draining.
    pub fn draining(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn start_health(&self, config: &Config) -> io::Result<()> {
        let table = self.balancer.table();
        table.set_thresholds(config.health_check.rise, config.health_check.fall);
        let checker = HealthChecker::spawn(
            Arc::clone(table),
            probe_settings(config),
            Arc::new(TcpProbe),
            Box::new(self.balancer.flip_handler()),
        )?;
        *self.health.lock() = Some(checker);
        Ok(())
    }

    fn stop_health(&self) {
        // Out of the lock first: stopping waits for the thread's last probe.
        let checker = self.health.lock().take();
        if let Some(mut checker) = checker {
            checker.stop();
        }
    }

    /// Re-reads the config at `path` and every file it names; if all is valid, new
    /// connections use it from now on, and (with `tls.enforce_on_reload`) connections in
    /// flight that it refuses are closed. If anything is wrong, the running config stays and
    /// the error is returned (and counted).
    pub fn reload(&self, path: &Path) -> Result<(), StartError> {
        // One reload at a time (SIGHUP, the watcher, a library caller): two interleaved could
        // leave the table of one config beside the authorization of the other.
        let result = {
            let _one = self.reloading.lock();
            systemd::reloading();
            let result = self.try_reload(path);
            match &result {
                Ok(_) => {
                    self.stats.reloads_ok.fetch_add(1, Ordering::Relaxed);
                    let mut loaded = self.loaded.lock();
                    loaded.generation += 1;
                    loaded.at = SystemTime::now();
                    drop(loaded);
                    log::info!("config reloaded from {}", path.display());
                    systemd::reloaded("serving; config reloaded");
                }
                Err(e) => {
                    self.stats.reloads_failed.fetch_add(1, Ordering::Relaxed);
                    systemd::reloaded("serving; the last reload failed, running config kept");
                    // One line, so that a log shipper keeps the error whole: toml's message
                    // runs over several (the file's line under its position).
                    let e = e.to_string();
                    let e: Vec<&str> = e.split_whitespace().collect();
                    log::error!(
                        "config reload failed, keeping the running config: {}",
                        e.join(" ")
                    );
                }
            }
            result
        };
        let runtime = result?;
        self.enforce(&runtime);
        Ok(())
    }

    /// Holds the open connections to `runtime`, just swapped in, when its
    /// `tls.enforce_on_reload` says so. After the swap, so that a connection admitted
    /// meanwhile was admitted by the new rules; outside the reload lock, since closing takes
    /// a close wait.
    fn enforce(&self, runtime: &Runtime) {
        if !runtime.config.tls.enforce_on_reload {
            return;
        }
        let closed = enforce::after_reload(self.balancer.sessions(), runtime.tls(), &runtime.authz);
        if !closed.is_empty() {
            log::warn!(
                "reload: closed open connection(s) the new config refuses ({})",
                enforce::describe(&closed)
            );
        }
    }

    fn try_reload(&self, path: &Path) -> Result<Arc<Runtime>, StartError> {
        let config = Config::load(path).map_err(crate::confine::explain_config_read)?;
        let tls = TlsContext::load_with(&config.tls, &self.tls_sessions)?;
        let upstreams = Balancer::upstreams_from_config(&config, &GroupTls::load(&config)?);
        let old = self.runtime();
        // A changed [cluster] gets a new client; connections in flight keep their leases in
        // the old one until they end.
        let cluster = Cluster::replace(
            self.admission.cluster(),
            config.cluster.as_ref(),
            &self.stats,
        )?;
        if config.listen != old.config.listen {
            log::warn!(
                "reload: `listen` changed to {}; it takes effect only after a restart",
                config.listen
            );
        }
        if config.metrics_listen != old.config.metrics_listen {
            log::warn!("reload: `metrics_listen` changed; it takes effect only after a restart");
        }
        // Everything is valid; nothing below can fail. The table changes first (upstreams the
        // new config dropped are never chosen again, new ones are UP and unreachable until the
        // swap), then the authorization swaps in one step.
        let ids = self
            .balancer
            .update(upstreams, BalancerOptions::from_config(&config));
        access::set_format(config.log_format);
        let table = self.balancer.table();
        table.set_thresholds(config.health_check.rise, config.health_check.fall);
        warn_shadowed(&config);
        let settings = probe_settings(&config);
        let authz = Authorizer::from_config(&config, &ids);
        let runtime = Runtime::new(config, tls, authz);
        self.balancer
            .sessions()
            .set_close_at_expiry(runtime.config.tls.close_at_cert_expiry);
        let runtime = Arc::new(runtime);
        *self.runtime.write() = Arc::clone(&runtime);
        self.admission.set_cluster(cluster);
        if let Some(checker) = &*self.health.lock() {
            checker.set_settings(settings);
        }
        Ok(runtime)
    }
}

/// Logs each `[[client]]` entry that an earlier one always beats: a config mistake that
/// still runs, so a warning rather than an error.
fn warn_shadowed(config: &Config) {
    for warning in config.shadowed_clients() {
        log::warn!("{warning}");
    }
}

/// A bound, not yet running, balancer server.
#[derive(Debug)]
pub struct Server {
    /// Shared only with [`Server::listener`]'s weak handles, so dropping it closes the socket.
    listener: Arc<TcpListener>,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    stopping: Arc<AtomicBool>,
    /// Set with `stopping` by [`ShutdownHandle::shutdown_quietly`]: no wake-up connection
    /// comes, so every connection accepted is a client's.
    quietly: Arc<AtomicBool>,
}

/// Stops a running [`Server`] from another thread.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    stopping: Arc<AtomicBool>,
    quietly: Arc<AtomicBool>,
    wake: SocketAddr,
}

impl ShutdownHandle {
    /// Asks the server to stop accepting and drain. Returns at once.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        // accept() waits up to sockets::ACCEPT_POLL; a connection to ourselves wakes it now.
        let _ = TcpStream::connect_timeout(&self.wake, Duration::from_secs(1));
    }

    /// Asks the server to stop accepting and drain, without the wake-up connection: the accept
    /// loop notices within [`crate::ACCEPT_POLL`]. For a listener another process shares (an
    /// upgrade), which could take the wake-up connection itself.
    pub fn shutdown_quietly(&self) {
        self.quietly.store(true, Ordering::SeqCst);
        self.stopping.store(true, Ordering::SeqCst);
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

/// A [`Server`] whose files are loaded and whose listener is bound, with no thread started
/// yet: what the binary confines itself in (`confine`), so that every thread is confined.
#[derive(Debug)]
pub struct BoundServer(Server);

impl BoundServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr
    }

    /// Starts the health checker, the certificate expiry thread and the `[cluster]` lease
    /// thread: the server can then run.
    pub fn start(self) -> Result<Server, StartError> {
        let shared = &self.0.shared;
        shared
            .start_health(&shared.runtime().config)
            .map_err(StartError::Thread)?;
        let sessions = shared.balancer.sessions();
        sessions.set_close_at_expiry(shared.runtime().config.tls.close_at_cert_expiry);
        sessions.start_expiry().map_err(StartError::Thread)?;
        // After the Landlock confinement, like every thread.
        if let Some(cluster) = shared.admission.cluster() {
            cluster.start_thread()?;
        }
        Ok(self.0)
    }
}

impl Server {
    /// Loads the TLS files, binds the listen address and starts the health checker.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        Server::bind_unstarted(config)?.start()
    }

    /// [`Server::bind`], but serving on `listener` (inherited: socket activation, upgrade)
    /// instead of binding `listen`.
    pub fn with_listener(config: Config, listener: TcpListener) -> Result<Server, StartError> {
        Server::unstarted(config, Some(listener))?.start()
    }

    /// Loads the TLS files and binds the listen address, starting no thread.
    pub fn bind_unstarted(config: Config) -> Result<BoundServer, StartError> {
        Server::unstarted(config, None)
    }

    /// [`Server::bind_unstarted`] on a listener already open (inherited).
    pub fn unstarted_with_listener(
        config: Config,
        listener: TcpListener,
    ) -> Result<BoundServer, StartError> {
        Server::unstarted(config, Some(listener))
    }

    fn unstarted(config: Config, listener: Option<TcpListener>) -> Result<BoundServer, StartError> {
        let tls_sessions = SessionCache::default();
        let tls = TlsContext::load_with(&config.tls, &tls_sessions)?;
        let upstreams = Balancer::upstreams_from_config(&config, &GroupTls::load(&config)?);
        let listener = match listener {
            Some(listener) => listener,
            None => sockets::bind(config.listen, config.reuse_port).map_err(|source| {
                StartError::Bind {
                    key: "listen",
                    addr: config.listen,
                    source,
                }
            })?,
        };
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            key: "listen",
            addr: config.listen,
            source,
        })?;
        let ids: Vec<_> = (0..upstreams.len()).map(crate::table::UpstreamId).collect();
        let balancer = Balancer::new(upstreams, BalancerOptions::from_config(&config));
        access::set_format(config.log_format);
        warn_shadowed(&config);
        let authz = Authorizer::from_config(&config, &ids);
        let runtime = Runtime::new(config, tls, authz);
        let stats = Arc::new(Stats::default());
        let admission = Admission::new(stats.clone());
        admission.set_cluster(Cluster::unstarted(runtime.config.cluster.as_ref(), &stats)?);
        // Read once: the limits on threads are the process's, not the config's, so a reload
        // keeps the cap (see crate::threads).
        admission.set_thread_cap(threads::startup_cap(runtime.config.limits.max_connections));
        let stopping = Arc::<AtomicBool>::default();
        let started = SystemTime::now();
        let shared = Arc::new(Shared {
            balancer,
            admission: Arc::new(admission),
            stats,
            health: Mutex::new(None),
            conn_pool: ThreadPool::new(
                "lclb-conn",
                CONNECTION_THREAD_STACK,
                runtime.config.limits.thread_keep_alive,
            ),
            runtime: RwLock::new(Arc::new(runtime)),
            tls_sessions,
            reloading: Mutex::new(()),
            started,
            loaded: Mutex::new(Loaded {
                generation: 1,
                at: started,
            }),
            stopping: stopping.clone(),
        });
        Ok(BoundServer(Server {
            listener: Arc::new(listener),
            local_addr,
            shared,
            stopping,
            quietly: Arc::default(),
        }))
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

    /// The listening socket while the server accepts on it, for handing it to a new process
    /// (the upgrade module); it no longer upgrades once the server has stopped accepting.
    pub fn listener(&self) -> Weak<TcpListener> {
        Arc::downgrade(&self.listener)
    }

    /// A handle that stops this server from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            stopping: self.stopping.clone(),
            quietly: self.quietly.clone(),
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
                    // Stopping, this is the wake-up connection, unless the stop was quiet: then
                    // it is a client's, served like the others while the drain runs.
                    if self.stopping.load(Ordering::SeqCst) && !self.quietly.load(Ordering::SeqCst)
                    {
                        break;
                    }
                    let _ = sockets::accepted(&sock);
                    admit(&self.shared, sock, peer, next_id);
                    next_id += 1;
                }
                Err(e) if sockets::is_poll_timeout(&e) => {}
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
    let wait_until = |deadline: Option<Instant>| {
        while stats.active_clients.load(Ordering::SeqCst) > 0
            && deadline.is_none_or(|d| Instant::now() < d)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_until(Instant::now().checked_add(timeout));
    let left = stats.active_clients.load(Ordering::SeqCst);
    if left > 0 {
        let closed = shared.balancer.sessions().close_all(EndReason::Shutdown);
        log::warn!("drain timeout: closing {closed} connection(s) still open");
        // Closed links end within moments; handshakes end at their own deadline.
        wait_until(Instant::now().checked_add(Duration::from_secs(2)));
    }
    shared.stop_health();
    // The lease thread ends once the last connection's lease is gone.
    shared.admission.set_cluster(None);
    log::info!("lclb stopped");
}

/// Counts and logs a refused connection: the one place every refusal ends up.
fn refuse(shared: &Shared, id: u64, peer: SocketAddr, refused: &Refused) {
    shared.stats.refuse(refused.reason);
    if let Some(client) = refused.client.as_deref() {
        shared
            .stats
            .clients
            .refused(client, refused.reason, &shared.runtime().config);
    }
    refusal_log::record(
        id,
        refused.client.as_deref(),
        peer,
        refused.reason,
        &refused.detail,
    );
}

/// The first gate, on the accept thread: a refused socket is closed at once (dropped) rather
/// than given a thread or left in the kernel's backlog.
fn admit(shared: &Arc<Shared>, sock: TcpStream, peer: SocketAddr, id: u64) {
    let accepted_at = Instant::now();
    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
    let runtime = shared.runtime();
    let limits = &runtime.config.limits;
    // A trusted balancer in front: the client's address comes in its PROXY header, read on
    // the connection's thread, so the per-address limits wait for it.
    let behind_proxy = runtime
        .config
        .accept_proxy_from
        .iter()
        .any(|block| block.contains(peer.ip()));
    let gate = if behind_proxy {
        shared.admission.before_proxy_header(limits)
    } else {
        shared.admission.before_handshake(peer.ip(), limits)
    };
    let entry = match gate {
        Ok(entry) => entry,
        Err(refused) => return refuse(shared, id, peer, &refused),
    };
    let job_shared = Arc::clone(shared);
    let spawned = shared.conn_pool.execute(move || {
        let accepted = Accepted {
            sock,
            peer,
            id,
            at: accepted_at,
            behind_proxy,
        };
        serve(&job_shared, &runtime, accepted, entry);
    });
    if let Err(e) = spawned {
        // The closure (and with it the socket and the counts it held) was dropped.
        refuse(shared, id, peer, &Refused::no_thread(e));
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

/// A socket the first gate let in, on its way to a connection thread.
struct Accepted {
    sock: TcpStream,
    /// Its source address (the balancer in front, when `behind_proxy`).
    peer: SocketAddr,
    id: u64,
    at: Instant,
    /// From an `accept_proxy_from` source: a PROXY header comes first.
    behind_proxy: bool,
}

/// Serves one admitted socket: its PROXY header when it comes from a trusted balancer, the
/// handshake, the second gate, then the balancer, which takes the connection (and its permit,
/// which holds its counts) to its two copy threads.
fn serve(shared: &Arc<Shared>, rt: &Runtime, accepted: Accepted, mut entry: Handshaking) {
    let Accepted {
        sock,
        mut peer,
        id,
        at: accepted_at,
        behind_proxy,
    } = accepted;
    let deadline = accepted_at
        .checked_add(rt.config.limits.handshake_timeout)
        .unwrap_or(accepted_at);
    let mut local = sock.local_addr().ok();
    if behind_proxy {
        // The deadline covers the header and the handshake together.
        match proxy::read_header(&sock, deadline) {
            Ok(header) => {
                let from = peer;
                peer = header.source.unwrap_or(peer);
                local = header.destination.or(local);
                log::debug!("conn {id}: PROXY header from {from}: client {peer}");
            }
            Err(e) => {
                let refused = Refused::handshake(format_args!("PROXY header from {peer}: {e}"));
                return refuse(shared, id, peer, &refused);
            }
        }
        if let Err(refused) =
            shared
                .admission
                .address_known(&mut entry, peer.ip(), &rt.config.limits)
        {
            return refuse(shared, id, peer, &refused);
        }
    }
    let _ = sock.set_nodelay(true);
    let mut conn = match ServerConnection::new(rt.tls.server_config.clone()) {
        Ok(c) => c,
        Err(e) => return refuse(shared, id, peer, &Refused::handshake(e)),
    };
    if let Err(e) = tls::handshake(&mut conn, &sock, deadline) {
        return refuse(shared, id, peer, &Refused::handshake(e));
    }
    shared.stats.handshakes.observe(accepted_at.elapsed());
    // Refusals below send close_notify; do not let a client that stopped reading hold us.
    let _ = sock.set_write_timeout(Some(Duration::from_secs(1)));
    let permit = match shared
        .admission
        .after_handshake(entry, &conn, &rt.tls, &rt.authz)
    {
        Ok(permit) => permit,
        Err(refused) => {
            tls::close_gracefully(&mut conn, &sock);
            return refuse(shared, id, peer, &refused);
        }
    };
    let proxy = rt.proxy_facts(&conn, &permit, peer, local, id);
    let client = Client {
        tls: conn,
        sock,
        proxy,
        not_after: Some(permit.not_after),
    };
    let started = Instant::now();
    let (identity, allowed) = (permit.identity.name.clone(), permit.allowed.clone());
    let on_end = move |session: Session| {
        let took = started.elapsed();
        access::finished(
            id,
            &permit.identity,
            peer,
            &session.upstream,
            &session.report,
            took,
        );
        // The connection no longer counts once its line is written.
        drop(permit);
    };
    if let Err(failed) = shared.balancer.balance(client, &identity, &allowed, on_end) {
        let Unbalanced { mut client, error } = *failed;
        tls::close_gracefully(&mut client.tls, &client.sock);
        refuse(shared, id, peer, &Refused::from(error).of(&identity));
    }
}
