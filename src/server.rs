//! The server: the listener, the accept loop, and each connection's path from accepted socket
//! to balancer.
//!
//! One thread accepts. Each accepted socket gets its own thread, which runs the TLS handshake
//! under a deadline, reads the client's identity, checks authorization and hands the client to
//! the [`Balancer`]; that same thread then copies client-to-upstream while a second one copies
//! the other way. Refusals are counted (see [`Stats`]) and logged once each, with the reason.
//!
//! Stopping: [`ShutdownHandle::shutdown`] sets a flag and connects to the listener to wake the
//! blocked `accept`; the accept loop then closes the listener (new connects are refused), waits
//! up to `limits.drain_timeout` for connections in flight, stops the health thread and returns.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::ServerConnection;

use crate::authz::Authorizer;
use crate::balancer::{Balancer, BalancerOptions, Client};
use crate::config::{Config, ConfigError};
use crate::health::{HealthChecker, ProbeSettings, TcpProbe};
use crate::stats::{Refusal, Stats};
use crate::table::UpstreamId;
use crate::tls::{self, TlsContext};

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
            StartError::Bind { addr, source } => {
                write!(f, "cannot listen on {addr} (config key `listen`): {source}")
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

/// Everything derived from one config: what each new connection is served with.
#[derive(Debug)]
struct Runtime {
    config: Config,
    tls: TlsContext,
    authz: Authorizer,
    balancer: Balancer,
}

/// A bound, not yet running, balancer server.
#[derive(Debug)]
pub struct Server {
    listener: TcpListener,
    local_addr: SocketAddr,
    runtime: Arc<Runtime>,
    stats: Arc<Stats>,
    stopping: Arc<AtomicBool>,
    health: HealthChecker,
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

impl Server {
    /// Loads the TLS files, binds the listen address and starts the health checker.
    pub fn bind(config: Config) -> Result<Server, StartError> {
        let tls = TlsContext::load(&config.tls)?;
        let listener = TcpListener::bind(config.listen).map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let balancer = Balancer::new(
            Balancer::upstreams_from_config(&config),
            BalancerOptions::from_config(&config),
        );
        balancer
            .health()
            .set_thresholds(config.health_check.rise, config.health_check.fall);
        let targets = balancer
            .upstreams()
            .iter()
            .enumerate()
            .map(|(i, u)| (UpstreamId(i), u.addrs.clone()))
            .collect();
        let health = HealthChecker::spawn(
            balancer.health().clone(),
            targets,
            ProbeSettings {
                interval: config.health_check.interval,
                timeout: config.health_check.timeout,
            },
            Arc::new(TcpProbe),
        )
        .map_err(StartError::Thread)?;
        let runtime = Runtime {
            authz: Authorizer::from_config(&config),
            tls,
            balancer,
            config,
        };
        Ok(Server {
            listener,
            local_addr,
            runtime: Arc::new(runtime),
            stats: Arc::default(),
            stopping: Arc::default(),
            health,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The balancer (for its upstreams' counts and health).
    pub fn balancer(&self) -> &Balancer {
        &self.runtime.balancer
    }

    /// A handle that stops this server from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        ShutdownHandle {
            stopping: self.stopping.clone(),
            wake,
        }
    }

    /// Accepts and serves connections until shut down, then drains. Returns once the
    /// connections in flight have ended or `limits.drain_timeout` has passed.
    pub fn run(self) {
        log::info!(
            "lclb listening on {} with {} upstream(s) and {} client(s)",
            self.local_addr,
            self.runtime.balancer.upstreams().len(),
            self.runtime.config.clients.len()
        );
        let mut next_id: u64 = 1;
        while !self.stopping.load(Ordering::SeqCst) {
            match self.listener.accept() {
                Ok((sock, peer)) => {
                    if self.stopping.load(Ordering::SeqCst) {
                        break;
                    }
                    self.admit(sock, peer, next_id);
                    next_id += 1;
                }
                Err(e) => accept_failed(&e),
            }
        }
        let Server {
            listener,
            runtime,
            stats,
            mut health,
            ..
        } = self;
        // Close the listener first so new connects are refused, not queued.
        drop(listener);
        let open = stats.active_clients.load(Ordering::SeqCst);
        log::info!("lclb stopping: listener closed, {open} connection(s) in flight");
        let deadline = Instant::now() + runtime.config.limits.drain_timeout;
        while stats.active_clients.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        health.stop();
        let left = stats.active_clients.load(Ordering::SeqCst);
        if left > 0 {
            log::warn!("lclb stopped with {left} connection(s) still open after the drain timeout");
        } else {
            log::info!("lclb stopped");
        }
    }

    fn admit(&self, sock: TcpStream, peer: SocketAddr, id: u64) {
        let accepted_at = Instant::now();
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let max = self.runtime.config.limits.max_connections as u64;
        if self.stats.active_clients.fetch_add(1, Ordering::SeqCst) >= max {
            self.stats.active_clients.fetch_sub(1, Ordering::SeqCst);
            self.stats.refuse(Refusal::Capacity);
            log::warn!("refused conn={id} peer={peer} reason=capacity: {max} connections open");
            return;
        }
        let active = ActiveClient(self.stats.clone());
        let runtime = self.runtime.clone();
        let stats = self.stats.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("lclb-conn-{id}"))
            .stack_size(CONNECTION_THREAD_STACK)
            .spawn(move || {
                let _active = active;
                serve(&runtime, &stats, sock, peer, id, accepted_at);
            });
        if let Err(e) = spawned {
            // The closure (and with it the socket and the active count) was dropped.
            self.stats.refuse(Refusal::Capacity);
            log::warn!("refused conn={id} peer={peer} reason=capacity: cannot start a thread: {e}");
            std::thread::sleep(ACCEPT_BACKOFF);
        }
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
struct ActiveClient(Arc<Stats>);

impl Drop for ActiveClient {
    fn drop(&mut self) {
        self.0.active_clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves one accepted socket: handshake, identity, authorization, then the balancer.
fn serve(
    rt: &Runtime,
    stats: &Stats,
    sock: TcpStream,
    peer: SocketAddr,
    id: u64,
    accepted_at: Instant,
) {
    let _ = sock.set_nodelay(true);
    let refuse = |reason: Refusal, client: &str, detail: &dyn fmt::Display| {
        stats.refuse(reason);
        log::info!("refused conn={id} client={client} peer={peer} reason={reason}: {detail}");
    };
    let mut conn = match ServerConnection::new(rt.tls.server_config.clone()) {
        Ok(c) => c,
        Err(e) => return refuse(Refusal::Tls, "-", &e),
    };
    let deadline = accepted_at + rt.config.limits.handshake_timeout;
    if let Err(e) = tls::handshake(&mut conn, &sock, deadline) {
        return refuse(Refusal::Tls, "-", &e);
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
    let Some(allowed) = rt.authz.allowed(&cn) else {
        tls::close_gracefully(&mut conn, &sock);
        return refuse(
            Refusal::Unauthorized,
            &cn,
            &"no [[client]] entry for this identity",
        );
    };
    let client = Client {
        tls: conn,
        sock,
        thread_name: format!("lclb-conn-{id}-up"),
    };
    let started = Instant::now();
    match rt.balancer.balance(client, &cn, &allowed) {
        Ok(session) => log::info!(
            "conn={id} client={cn} peer={peer} upstream={} duration_ms={} bytes_to_upstream={} \
             bytes_to_client={} end={}",
            session.upstream,
            started.elapsed().as_millis(),
            session.report.to_upstream,
            session.report.to_client,
            session.report.end
        ),
        Err(e) => refuse(e.refusal(), &cn, &e),
    }
}
