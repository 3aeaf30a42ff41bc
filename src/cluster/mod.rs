//! `[cluster]`: per-client rate and `max_concurrent` shared by every instance that names the
//! same Redis, so that a client gets its allowance once, not once per instance.
//!
//! One admission is one round trip: the Lua script `admit.lua` (loaded with SCRIPT LOAD, run
//! with EVALSHA, EVAL again after a NOSCRIPT from a restarted Redis) checks the identity's
//! token bucket and its concurrency leases on Redis's own clock (`TIME`), and takes a token
//! and adds a lease only when both admit. A lease is a member of the identity's sorted set
//! scored by its expiry: this instance refreshes the leases of its open connections in one
//! pipeline every `lease_ttl / 3` and removes each when its connection ends, so a crashed
//! instance's leases expire on their own after `lease_ttl`. Nothing is ever counted up and
//! down (a crash would leak the count), and every key expires once it says nothing.
//!
//! Redis down: a call that fails or takes longer than `timeout` marks it down; from then on
//! admission does not try it and `on_error` decides ([`Shared::Local`], [`Shared::Allow`], or a
//! `cluster_unavailable` refusal), while the background thread probes it every second and marks
//! it up again. One log line per change. Leases of connections admitted while it was down are
//! kept here and written at the first refresh after it returns. A call that timed out may still
//! run once a stalled Redis catches up: its token is spent, and its lease, which this instance
//! never kept, expires after `lease_ttl`.
//!
//! With `sentinels`, the master's address comes from the first sentinel that answers (and is
//! checked with ROLE), on the background thread only; a failover is a failed call (the old
//! master is gone or read-only), hence a short "down" while the probe asks the sentinels again.
//! The redis crate's own Sentinel type is not used: its blocking lookups connect without a
//! timeout.
//!
//! With `rediss://`, the TLS files are read when the cluster is built (`tls.rs`), and a reload
//! that finds them changed builds a new cluster as for any other change.
//!
//! This module owns the Redis client, its pool and its thread. What a refusal is, and the local
//! buckets and counts, are admission's.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use redis::{
    Client, Connection, ConnectionAddr, ConnectionInfo, ErrorKind, IntoConnectionInfo, RedisError,
    RedisResult, Script,
};

use crate::config::{redacted, ClientLimits, ClusterConfig, ConfigError, OnError};
use crate::start_error::StartError;
use crate::stats::{Refusal, Refused, Stats};

mod tls;

use tls::RedisTls;

/// Time between two probes of a Redis marked down.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Idle connections kept for the next admissions; more are closed after use.
const POOL_IDLE: usize = 16;

/// Lease removals kept while Redis is down, to send when it returns; past this many, the
/// oldest are left to expire on their own.
const MAX_PENDING_REMOVALS: usize = 100_000;

/// What the shared limits say of one admission.
#[derive(Debug)]
pub enum Shared {
    /// Redis admitted it; with a `max_concurrent`, the connection's lease.
    Admitted(Option<Lease>),
    /// Redis refused it (rate or concurrency), or Redis is down under `on_error = "deny"`.
    Refused(Refused),
    /// Redis is down under `on_error = "local"`: this instance's own limits decide.
    Local,
    /// Redis is down under `on_error = "allow"`: admitted without a check.
    Allow,
}

/// The running `[cluster]`: its settings, Redis connections and lease thread.
pub struct Cluster {
    inner: Arc<Inner>,
    /// Lease removals for the thread; the thread ends when the last sender is gone.
    removals: Sender<LeaseKey>,
    /// The thread's end of `removals` until [`Cluster::start_thread`] hands it over.
    jobs: Mutex<Option<Receiver<LeaseKey>>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &self.inner.shown)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: ClusterConfig,
    /// What the TLS files held when this cluster was built.
    tls: RedisTls,
    /// Credentials, database and TLS of `redis`; its address too, without sentinels.
    base: ConnectionInfo,
    /// The master: `base` itself, or what the sentinels said last.
    master: Mutex<Option<Client>>,
    pool: Mutex<Vec<Connection>>,
    up: AtomicBool,
    stats: Arc<Stats>,
    /// This process's part of every lease id, unique among instances.
    instance: String,
    next_lease: AtomicU64,
    /// The leases of this instance's open connections, by number: what a refresh writes.
    live: Mutex<HashMap<u64, LeaseKey>>,
    admit: Script,
    /// Where Redis is, for logs, password hidden.
    shown: String,
}

/// Where one lease is in Redis: the identity's set and the member.
#[derive(Debug, Clone)]
struct LeaseKey {
    key: String,
    member: String,
}

impl Cluster {
    /// The cluster for `wanted`: `current` itself when its settings and the TLS files they
    /// name are the same (a reload that left `[cluster]` alone), a new one otherwise, `None`
    /// without `[cluster]`. The TLS files are read here, every time (a rotated CA keeps its
    /// path); an unusable one is a [`StartError::Config`] naming its key and file. A new
    /// cluster tries Redis once before it returns (bounded by `timeout` per call) and starts
    /// its thread; the replaced one lives on until the leases it gave out have ended.
    pub fn replace(
        current: Option<Arc<Cluster>>,
        wanted: Option<&ClusterConfig>,
        stats: &Arc<Stats>,
    ) -> Result<Option<Arc<Cluster>>, StartError> {
        let Some(wanted) = wanted else {
            return Ok(None);
        };
        let tls = RedisTls::load(wanted)?;
        if let Some(current) = current {
            if current.inner.config == *wanted && current.inner.tls == tls {
                return Ok(Some(current));
            }
            log::info!(
                "reload: [cluster] changed; new connections use Redis {}, open ones keep \
                 their leases where they were",
                shown(wanted)
            );
        }
        let cluster = Cluster::build(wanted.clone(), tls, Arc::clone(stats))?;
        cluster.start_thread()?;
        Ok(Some(Arc::new(cluster)))
    }

    /// As [`Cluster::replace`] without a current cluster, but starting no thread: for start-up,
    /// where the thread starts after the Landlock confinement, with [`Cluster::start_thread`].
    pub fn unstarted(
        wanted: Option<&ClusterConfig>,
        stats: &Arc<Stats>,
    ) -> Result<Option<Arc<Cluster>>, StartError> {
        let Some(wanted) = wanted else {
            return Ok(None);
        };
        let tls = RedisTls::load(wanted)?;
        Cluster::build(wanted.clone(), tls, Arc::clone(stats)).map(|c| Some(Arc::new(c)))
    }

    /// Starts the lease thread (refreshes, removals, probes while Redis is down), once; later
    /// calls do nothing.
    pub fn start_thread(&self) -> Result<(), StartError> {
        let Some(jobs) = self.jobs.lock().take() else {
            return Ok(());
        };
        let inner = Arc::clone(&self.inner);
        std::thread::Builder::new()
            .name("lclb-cluster".into())
            .spawn(move || lease_thread(&inner, &jobs))
            .map_err(StartError::Thread)?;
        Ok(())
    }

    /// Reads and checks the TLS files `config` names, as start-up does, without connecting:
    /// for `--check-config`.
    pub fn check(config: &ClusterConfig) -> Result<(), ConfigError> {
        RedisTls::load(config).map(drop)
    }

    fn build(
        config: ClusterConfig,
        tls: RedisTls,
        stats: Arc<Stats>,
    ) -> Result<Cluster, StartError> {
        let invalid = |e: RedisError| {
            StartError::Config(ConfigError::Invalid {
                key: "cluster.redis".into(),
                message: format!("{} is not usable: {e}", shown(&config)),
            })
        };
        let base = match &config.redis {
            // The TLS parameters travel in the connection info: to the master the sentinels
            // name too.
            Some(url) => tls
                .client(url.as_str().into_connection_info().map_err(invalid)?)
                .map_err(invalid)?
                .get_connection_info()
                .clone(),
            None => ConnectionInfo {
                addr: ConnectionAddr::Tcp(String::new(), 0),
                redis: Default::default(),
            },
        };
        let master = if config.sentinels.is_empty() {
            Some(Client::open(base.clone()).map_err(invalid)?)
        } else {
            // Found by the first probe.
            None
        };
        let started = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let inner = Arc::new(Inner {
            tls,
            base,
            master: Mutex::new(master),
            pool: Mutex::new(Vec::new()),
            up: AtomicBool::new(false),
            stats,
            instance: format!("{}-{started:x}", std::process::id()),
            next_lease: AtomicU64::new(1),
            live: Mutex::new(HashMap::new()),
            admit: Script::new(include_str!("admit.lua")),
            shown: shown(&config),
            config,
        });
        match inner.probe() {
            Ok(()) => {
                inner.up.store(true, Ordering::SeqCst);
                log::info!(
                    "cluster: per-client limits shared through Redis {}",
                    inner.shown
                );
            }
            Err(e) => {
                inner.stats.cluster_errors.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "cluster: Redis {} is down ({e}); on_error = {} decides until it answers",
                    inner.shown,
                    inner.config.on_error
                );
            }
        }
        let (removals, jobs) = crossbeam_channel::unbounded();
        Ok(Cluster {
            inner,
            removals,
            jobs: Mutex::new(Some(jobs)),
        })
    }

    /// Whether Redis answered the last call: the shared limits apply.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::SeqCst)
    }

    /// The settings this cluster runs with.
    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    /// Asks Redis whether `identity` may open one more connection under `limits`, in one
    /// round trip bounded by `timeout`; while Redis is down, asks nothing and answers what
    /// `on_error` says.
    pub fn admit(self: &Arc<Self>, identity: &str, limits: ClientLimits) -> Shared {
        if !self.is_up() {
            return self.down();
        }
        let inner = &self.inner;
        let (rate_key, lease_key) = inner.keys(identity);
        let number =
            (limits.max_concurrent > 0).then(|| inner.next_lease.fetch_add(1, Ordering::Relaxed));
        let member = number.map_or_else(String::new, |n| inner.member(n));
        let ttl_ms = millis(inner.config.lease_ttl);
        let result: RedisResult<i64> = inner.call(|conn| {
            inner
                .admit
                .key(&rate_key)
                .key(&lease_key)
                .arg(limits.rate.rate)
                .arg(limits.rate.burst)
                .arg(limits.max_concurrent)
                .arg(&member)
                .arg(ttl_ms)
                .invoke(conn)
        });
        match result {
            Ok(0) => Shared::Admitted(number.map(|n| self.register(n, lease_key, member))),
            Ok(1) => Shared::Refused(Refused::new(
                Refusal::RateLimited,
                "rate limit exceeded (shared through [cluster])",
            )),
            Ok(2) => Shared::Refused(Refused::new(
                Refusal::ConcurrencyLimited,
                format_args!(
                    "client already has {} connections open across the cluster (max_concurrent)",
                    limits.max_concurrent
                ),
            )),
            Ok(other) => {
                let e = RedisError::from((
                    ErrorKind::TypeError,
                    "unexpected reply of the admission script",
                    other.to_string(),
                ));
                inner.fail(&e, "admission");
                self.down()
            }
            Err(e) => {
                inner.fail(&e, "admission");
                self.down()
            }
        }
    }

    /// A lease for a connection admitted while Redis was down (by `on_error = "local"` or
    /// `"allow"`), when `limits` has a cap: kept here, and written to Redis by the first
    /// refresh after it returns, so that the connection counts there while it stays open.
    pub fn unshared_lease(self: &Arc<Self>, identity: &str, limits: ClientLimits) -> Option<Lease> {
        if limits.max_concurrent == 0 {
            return None;
        }
        let n = self.inner.next_lease.fetch_add(1, Ordering::Relaxed);
        let (_, key) = self.inner.keys(identity);
        let member = self.inner.member(n);
        Some(self.register(n, key, member))
    }

    fn register(self: &Arc<Self>, number: u64, key: String, member: String) -> Lease {
        self.inner
            .live
            .lock()
            .insert(number, LeaseKey { key, member });
        Lease {
            cluster: Arc::clone(self),
            number,
        }
    }

    fn down(&self) -> Shared {
        match self.inner.config.on_error {
            OnError::Local => Shared::Local,
            OnError::Allow => Shared::Allow,
            OnError::Deny => Shared::Refused(Refused::new(
                Refusal::ClusterUnavailable,
                format_args!("Redis {} is down (on_error = deny)", self.inner.shown),
            )),
        }
    }
}

/// One connection's concurrency lease in Redis; dropping it removes the lease (on the lease
/// thread, so the connection's own thread never waits for Redis).
pub struct Lease {
    cluster: Arc<Cluster>,
    number: u64,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Lease").field(&self.number).finish()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let removed = self.cluster.inner.live.lock().remove(&self.number);
        if let Some(removal) = removed {
            // The thread outlives every lease (each holds the cluster, which holds the
            // sender), so the send cannot fail; if it did, the lease would expire by itself.
            let _ = self.cluster.removals.send(removal);
        }
    }
}

impl Inner {
    /// The identity's bucket and lease keys. One hash tag (`{identity}`) for both, so that a
    /// Redis Cluster puts them in one slot, as a script needs.
    fn keys(&self, identity: &str) -> (String, String) {
        let prefix = &self.config.key_prefix;
        (
            format!("{prefix}{{{identity}}}:rate"),
            format!("{prefix}{{{identity}}}:leases"),
        )
    }

    fn member(&self, number: u64) -> String {
        format!("{}-{number}", self.instance)
    }

    /// Runs `f` on a pooled connection (or a new one) with the whole call bounded by
    /// `timeout`; the connection goes back to the pool only if `f` succeeded.
    ///
    /// A pooled connection that Redis closed meanwhile (its idle `timeout`, a restart) fails
    /// at once with a dropped connection: `f` runs once more on a new connection within what
    /// is left of the budget, rather than taking Redis down for a stale socket. Had the first
    /// try run and only its reply been lost, the retry takes one more token (its lease id is
    /// the same, so no second lease).
    fn call<T>(&self, mut f: impl FnMut(&mut Connection) -> RedisResult<T>) -> RedisResult<T> {
        let deadline = Instant::now().checked_add(self.config.timeout);
        let left = || {
            deadline
                .map_or(Duration::ZERO, |d| {
                    d.saturating_duration_since(Instant::now())
                })
                .max(Duration::from_millis(1))
        };
        let pooled = self.pool.lock().pop();
        if let Some(conn) = pooled {
            match self.call_on(conn, left(), &mut f) {
                Err(e) if e.is_connection_dropped() => {}
                done => return done,
            }
        }
        let conn = self.connect(left())?;
        self.call_on(conn, left(), &mut f)
    }

    fn call_on<T>(
        &self,
        mut conn: Connection,
        left: Duration,
        f: &mut impl FnMut(&mut Connection) -> RedisResult<T>,
    ) -> RedisResult<T> {
        conn.set_read_timeout(Some(left))?;
        conn.set_write_timeout(Some(left))?;
        let result = f(&mut conn)?;
        let mut pool = self.pool.lock();
        if pool.len() < POOL_IDLE {
            pool.push(conn);
        }
        Ok(result)
    }

    /// A new connection to the master, its connect (and AUTH, SELECT) bounded by `within`.
    fn connect(&self, within: Duration) -> RedisResult<Connection> {
        let master = self.master.lock().clone();
        let master = master.ok_or_else(|| {
            RedisError::from((ErrorKind::IoError, "no master known: no sentinel answered"))
        })?;
        let conn = master.get_connection_with_timeout(within)?;
        conn.set_read_timeout(Some(self.config.timeout))?;
        conn.set_write_timeout(Some(self.config.timeout))?;
        Ok(conn)
    }

    /// Counts a failed call and marks Redis down, logging the change once.
    fn fail(&self, e: &RedisError, doing: &str) {
        self.stats.cluster_errors.fetch_add(1, Ordering::Relaxed);
        // Every pooled connection goes: after a failover or a restart they all lead nowhere.
        let dead = std::mem::take(&mut *self.pool.lock());
        drop(dead);
        if self.up.swap(false, Ordering::SeqCst) {
            log::warn!(
                "cluster: Redis {} is down ({doing}: {e}); on_error = {} decides until it \
                 answers again",
                self.shown,
                self.config.on_error
            );
        }
    }

    /// One probe: find the master (with sentinels), PING it and load the script, leaving the
    /// connection in the pool.
    fn probe(&self) -> RedisResult<()> {
        if !self.config.sentinels.is_empty() {
            let master = self.discover()?;
            *self.master.lock() = Some(master);
        }
        let mut conn = self.connect(self.config.timeout)?;
        redis::cmd("PING").query::<String>(&mut conn)?;
        self.admit.prepare_invoke().load(&mut conn)?;
        self.pool.lock().push(conn);
        Ok(())
    }

    /// The master's client, from the first sentinel that names one that says it is master.
    fn discover(&self) -> RedisResult<Client> {
        let mut last = None;
        for sentinel in &self.config.sentinels {
            match self.ask_sentinel(sentinel) {
                Ok(client) => return Ok(client),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| RedisError::from((ErrorKind::IoError, "no sentinel"))))
    }

    fn ask_sentinel(&self, sentinel: &str) -> RedisResult<Client> {
        let timeout = self.config.timeout;
        // Validated as host:port with a port.
        let (host, port) = sentinel.rsplit_once(':').unwrap_or((sentinel, "26379"));
        let port = port.parse().unwrap_or(26379);
        let info = ConnectionInfo {
            addr: ConnectionAddr::Tcp(host.trim_matches(['[', ']']).to_string(), port),
            redis: Default::default(),
        };
        let mut conn = Client::open(info)?.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        let name = self.config.sentinel_master.as_deref().unwrap_or_default();
        let found: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(name)
            .query(&mut conn)?;
        let (ip, port) = found.ok_or_else(|| {
            RedisError::from((
                ErrorKind::ResponseError,
                "the sentinel knows no such master",
                format!("{sentinel}: {name}"),
            ))
        })?;
        let mut info = self.base.clone();
        info.addr = match info.addr {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: ip,
                port,
                insecure,
                tls_params,
            },
            _ => ConnectionAddr::Tcp(ip, port),
        };
        let client = Client::open(info)?;
        // A sentinel that has not yet seen a failover names the old master: ask it.
        let mut master = client.get_connection_with_timeout(timeout)?;
        master.set_read_timeout(Some(timeout))?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut master)?;
        let role: String = role
            .first()
            .map(redis::from_redis_value)
            .transpose()?
            .unwrap_or_default();
        if role != "master" {
            return Err(RedisError::from((
                ErrorKind::ReadOnly,
                "the sentinel's master is not master (yet)",
                format!("{sentinel} named a {role}"),
            )));
        }
        Ok(client)
    }

    /// Writes every live lease again with a fresh expiry: one TIME, then one pipeline.
    fn refresh(&self) -> RedisResult<()> {
        let leases: Vec<LeaseKey> = self.live.lock().values().cloned().collect();
        if leases.is_empty() {
            return Ok(());
        }
        let ttl = millis(self.config.lease_ttl);
        self.call(|conn| {
            let (secs, micros): (u64, u64) = redis::cmd("TIME").query(conn)?;
            let expiry = secs.saturating_mul(1000) + micros / 1000 + ttl;
            let mut pipe = redis::pipe();
            let mut keys = HashSet::new();
            for lease in &leases {
                pipe.cmd("ZADD")
                    .arg(&lease.key)
                    .arg(expiry)
                    .arg(&lease.member)
                    .ignore();
                keys.insert(lease.key.as_str());
            }
            for key in keys {
                pipe.cmd("PEXPIRE").arg(key).arg(ttl).ignore();
            }
            pipe.query::<()>(conn)
        })
    }

    /// Removes the leases of ended connections, in one pipeline.
    fn remove(&self, removals: &[LeaseKey]) -> RedisResult<()> {
        if removals.is_empty() {
            return Ok(());
        }
        self.call(|conn| {
            let mut pipe = redis::pipe();
            for r in removals {
                pipe.cmd("ZREM").arg(&r.key).arg(&r.member).ignore();
            }
            pipe.query::<()>(conn)
        })
    }
}

/// Where `config`'s Redis is, for logs: its URL with the password hidden, or the sentinels'
/// master.
fn shown(config: &ClusterConfig) -> String {
    match (&config.sentinel_master, &config.redis) {
        (Some(name), _) => format!("(master {name:?} of sentinels {:?})", config.sentinels),
        (None, Some(url)) => redacted(url),
        (None, None) => String::new(),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The lease thread: removes the leases of ended connections, refreshes the live ones every
/// `lease_ttl / 3` while Redis is up, probes it every second while it is down. Ends when the
/// cluster is gone (its last lease ended after a reload replaced it, or the server stopped),
/// once the removals it was sent are done.
fn lease_thread(inner: &Inner, jobs: &Receiver<LeaseKey>) {
    let every = inner.config.lease_ttl / 3;
    let later = |d: Duration| Instant::now().checked_add(d).unwrap_or_else(Instant::now);
    let mut next_refresh = later(every);
    let mut next_probe = later(PROBE_INTERVAL);
    let mut pending: Vec<LeaseKey> = Vec::new();
    loop {
        let up = inner.up.load(Ordering::SeqCst);
        let wake = if up { next_refresh } else { next_probe };
        let ended = match jobs.recv_timeout(wake.saturating_duration_since(Instant::now())) {
            Ok(removal) => {
                pending.push(removal);
                pending.extend(jobs.try_iter());
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if pending.len() > MAX_PENDING_REMOVALS {
            let extra = pending.len() - MAX_PENDING_REMOVALS;
            pending.drain(..extra);
        }
        if inner.up.load(Ordering::SeqCst) && !pending.is_empty() {
            match inner.remove(&pending) {
                Ok(()) => pending.clear(),
                Err(e) => inner.fail(&e, "lease removal"),
            }
        }
        if ended {
            return;
        }
        let now = Instant::now();
        if inner.up.load(Ordering::SeqCst) {
            if now >= next_refresh {
                next_refresh = later(every);
                if let Err(e) = inner.refresh() {
                    inner.fail(&e, "lease refresh");
                }
            }
        } else if now >= next_probe {
            next_probe = later(PROBE_INTERVAL);
            // Failed probes are not counted: Redis is known to be down.
            if inner.probe().is_ok() {
                inner.up.store(true, Ordering::SeqCst);
                log::info!(
                    "cluster: Redis {} answers again; per-client limits are shared again",
                    inner.shown
                );
                // The leases of connections admitted meanwhile, and those a restarted Redis
                // forgot, are written now rather than a third of lease_ttl later.
                next_refresh = later(every);
                if let Err(e) = inner.refresh() {
                    inner.fail(&e, "lease refresh");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::mpsc;

    use super::*;
    use crate::config::RateLimit;

    fn config(redis: String, on_error: OnError) -> ClusterConfig {
        ClusterConfig {
            redis: Some(redis),
            key_prefix: "t:".into(),
            timeout: Duration::from_millis(100),
            on_error,
            lease_ttl: Duration::from_secs(1),
            sentinels: Vec::new(),
            sentinel_master: None,
            ca_cert: None,
            client_cert: None,
        }
    }

    const CAPPED: ClientLimits = ClientLimits {
        rate: RateLimit {
            rate: 1.0,
            burst: 1,
        },
        max_concurrent: 1,
    };

    /// A cluster whose Redis refuses every connection (a port nothing listens on).
    fn unreachable(on_error: OnError) -> (Arc<Cluster>, Arc<Stats>) {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let stats = Arc::new(Stats::default());
        let wanted = config(format!("redis://127.0.0.1:{port}/0"), on_error);
        let cluster = Cluster::replace(None, Some(&wanted), &stats)
            .unwrap()
            .unwrap();
        (cluster, stats)
    }

    #[test]
    fn an_unreachable_redis_starts_down_and_on_error_decides_without_asking_it() {
        for (mode, want) in [
            (OnError::Local, "Local"),
            (OnError::Allow, "Allow"),
            (OnError::Deny, "cluster_unavailable"),
        ] {
            let (cluster, stats) = unreachable(mode);
            assert!(!cluster.is_up());
            for _ in 0..3 {
                let got = match cluster.admit("c", CAPPED) {
                    Shared::Refused(r) => r.reason.to_string(),
                    other => format!("{other:?}"),
                };
                assert_eq!(got, want, "on_error = {mode}");
            }
            assert_eq!(
                stats.cluster_errors.load(Ordering::Relaxed),
                1,
                "the start-up probe only: admissions do not try a Redis known down"
            );
        }
    }

    #[test]
    fn a_redis_that_never_answers_costs_the_start_no_more_than_its_timeouts() {
        // Accepted by the kernel's backlog, never read: every reply times out.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}/0", silent.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let stats = Arc::new(Stats::default());
            let c = Cluster::replace(None, Some(&config(url, OnError::Local)), &stats);
            let _ = tx.send(c.map(|c| c.map(|c| c.is_up())));
        });
        let up = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the start-up probe is bounded by timeout");
        assert_eq!(up.unwrap(), Some(false));
    }

    #[test]
    fn a_lease_of_a_connection_admitted_while_down_is_kept_until_the_connection_ends() {
        let (cluster, _) = unreachable(OnError::Local);
        let lease = cluster
            .unshared_lease("c", CAPPED)
            .expect("capped: a lease");
        assert!(
            cluster
                .unshared_lease("c", ClientLimits::default())
                .is_none(),
            "no cap, no lease"
        );
        let kept: Vec<LeaseKey> = cluster.inner.live.lock().values().cloned().collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].key, "t:{c}:leases");
        assert!(kept[0].member.starts_with(&cluster.inner.instance));
        drop(lease);
        assert!(cluster.inner.live.lock().is_empty());
    }

    #[test]
    fn the_same_settings_keep_the_running_cluster_and_others_replace_it() {
        let (cluster, stats) = unreachable(OnError::Local);
        let same = cluster.config().clone();
        let kept = Cluster::replace(Some(Arc::clone(&cluster)), Some(&same), &stats)
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&kept, &cluster));
        let other = ClusterConfig {
            on_error: OnError::Deny,
            ..same
        };
        let new = Cluster::replace(Some(Arc::clone(&cluster)), Some(&other), &stats)
            .unwrap()
            .unwrap();
        assert!(!Arc::ptr_eq(&new, &cluster));
        assert!(Cluster::replace(Some(cluster), None, &stats)
            .unwrap()
            .is_none());
    }
}
