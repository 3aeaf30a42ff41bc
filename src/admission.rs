//! Admission: every decision to let a client connection in, or to refuse it and say why.
//!
//! A connection passes two gates. Before its handshake, when only its source address is known
//! ([`Admission::before_handshake`]): the per-address rate, the per-address cap on handshakes in
//! progress, the cap on open connections and the cap on handshakes in progress. After its
//! handshake ([`Admission::after_handshake`]): the peer check of the TLS context (a resumed
//! session verified again, stale CRLs), the identity, its authorization, its rate and its cap
//! on concurrent connections. Each gate returns either a permit, which holds an RAII guard for
//! every count it took (so every path, a panic included, gives the counts back), or a typed
//! [`Refused`]. This module only decides; the server turns every refusal into one counter and
//! one log line, and the balancer only picks, connects and forwards.
//!
//! Source addresses are grouped before they are counted: an IPv4-mapped IPv6 address is its
//! IPv4 address, and an IPv6 address counts as its `per_ip_ipv6_prefix` (a /64 by default),
//! since one host usually holds a whole /64.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use rustls::ServerConnection;

use crate::authz::{Authorizer, Unmatched};
use crate::balancer::BalanceError;
use crate::cluster::{Cluster, Lease, Shared};
use crate::config::{ClientLimits, Limits, RateLimit};
use crate::identity::{CertNames, Identity, IdentityError};
use crate::ratelimit::RateLimiter;
use crate::stats::{Refusal, Stats};
use crate::table::UpstreamId;
use crate::tls::TlsContext;

pub use crate::stats::Refused;

impl From<BalanceError> for Refused {
    fn from(e: BalanceError) -> Refused {
        let reason = match e {
            BalanceError::NoUpstream => Refusal::NoUpstream,
            BalanceError::UpstreamConnect(_) => Refusal::UpstreamConnect,
            BalanceError::Capacity(_) => Refusal::Capacity,
        };
        Refused::new(reason, e)
    }
}

/// The key a source address is counted under: itself for IPv4 (IPv4-mapped IPv6 included), its
/// first `v6_prefix` bits for IPv6.
pub fn address_key(ip: IpAddr, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(v6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// Counts and buckets shared by every connection.
pub struct Admission {
    stats: Arc<Stats>,
    /// Handshakes in progress per address key, when `per_ip_max_handshakes` is set. A key is
    /// removed when its count drops to zero, so the map holds at most `max_handshakes` keys.
    ip_handshakes: Mutex<HashMap<IpAddr, u32>>,
    ip_rate: RateLimiter<IpAddr>,
    client_rate: RateLimiter<String>,
    /// Connections open per identity, for `max_concurrent` (HAProxy's `sc_conn_cur`) and
    /// `/status`; an identity leaves the map with its last connection.
    client_open: Mutex<HashMap<String, u32>>,
    /// Open connections the process's thread limit leaves room for (`usize::MAX`: no limit).
    thread_cap: AtomicUsize,
    /// `[cluster]`: the per-client limits shared through Redis, when configured.
    cluster: RwLock<Option<Arc<Cluster>>>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("thread_cap", &self.thread_cap.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// Admission counting into `stats` (its open-connection and handshake gauges).
    pub fn new(stats: Arc<Stats>) -> Admission {
        Admission::with_client_limiter(stats, RateLimiter::default())
    }

    /// As [`Admission::new`], with a given per-identity rate limiter (tests inject a clock).
    pub fn with_client_limiter(stats: Arc<Stats>, client_rate: RateLimiter<String>) -> Admission {
        Admission {
            stats,
            ip_handshakes: Mutex::new(HashMap::new()),
            ip_rate: RateLimiter::default(),
            client_rate,
            client_open: Mutex::new(HashMap::new()),
            thread_cap: AtomicUsize::new(usize::MAX),
            cluster: RwLock::new(None),
        }
    }

    /// Shares the per-client limits through `cluster` from now on (`None`: each instance
    /// limits on its own, the default). Connections admitted before keep their leases.
    pub fn set_cluster(&self, cluster: Option<Arc<Cluster>>) {
        *self.cluster.write() = cluster;
    }

    /// The `[cluster]` in use, if any.
    pub fn cluster(&self) -> Option<Arc<Cluster>> {
        self.cluster.read().clone()
    }

    /// Caps open connections at what the thread limit leaves room for, on top of
    /// `limits.max_connections`.
    pub fn set_thread_cap(&self, cap: usize) {
        self.thread_cap.store(cap.max(1), Ordering::Relaxed);
    }

    /// The gate before the handshake, for a socket from `ip`.
    pub fn before_handshake(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &Limits,
    ) -> Result<Handshaking, Refused> {
        // The address first: a flood from one address is refused as that address's, not as
        // capacity.
        let ip_slot = self.address_gate(ip, limits)?;
        let mut entry = self.capacity_gate(limits)?;
        if let Some(h) = &mut entry.handshake {
            h.ip = ip_slot;
        }
        Ok(entry)
    }

    /// The gate before the handshake for a socket from a trusted PROXY source
    /// (`accept_proxy_from`), whose client address is not known until its header is read:
    /// capacity only. [`Admission::address_known`] applies the per-address limits then.
    pub fn before_proxy_header(self: &Arc<Self>, limits: &Limits) -> Result<Handshaking, Refused> {
        self.capacity_gate(limits)
    }

    /// The per-address limits for a socket admitted by [`Admission::before_proxy_header`],
    /// once its PROXY header has said the client's address `ip`.
    pub fn address_known(
        self: &Arc<Self>,
        entry: &mut Handshaking,
        ip: IpAddr,
        limits: &Limits,
    ) -> Result<(), Refused> {
        let slot = self.address_gate(ip, limits)?;
        if let Some(h) = &mut entry.handshake {
            h.ip = slot;
        }
        Ok(())
    }

    /// The per-address rate and handshake cap for `ip`.
    fn address_gate(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &Limits,
    ) -> Result<Option<IpSlot>, Refused> {
        let key = address_key(ip, limits.per_ip_ipv6_prefix);
        if limits.per_ip_handshake_rate > 0.0 {
            let rate = RateLimit {
                rate: limits.per_ip_handshake_rate,
                burst: limits.per_ip_handshake_burst,
            };
            if !self.ip_rate.try_acquire(&key, rate) {
                return Err(Refused::new(
                    Refusal::IpRateLimited,
                    format_args!("{key} exceeded per_ip_handshake_rate"),
                ));
            }
        }
        if limits.per_ip_max_handshakes == 0 {
            return Ok(None);
        }
        let max = u32::try_from(limits.per_ip_max_handshakes).unwrap_or(u32::MAX);
        let mut open = self.ip_handshakes.lock();
        let n = open.entry(key).or_insert(0);
        if *n >= max {
            return Err(Refused::new(
                Refusal::IpHandshakes,
                format_args!("{key} has {max} handshakes in progress (per_ip_max_handshakes)"),
            ));
        }
        *n += 1;
        Ok(Some(IpSlot {
            admission: Arc::clone(self),
            key,
        }))
    }

    /// The caps on open connections and on handshakes in progress.
    fn capacity_gate(self: &Arc<Self>, limits: &Limits) -> Result<Handshaking, Refused> {
        let max = limits
            .max_connections
            .min(self.thread_cap.load(Ordering::Relaxed)) as u64;
        if self.stats.active_clients.fetch_add(1, Ordering::SeqCst) >= max {
            self.stats.active_clients.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::new(
                Refusal::Capacity,
                format_args!("{max} connections open"),
            ));
        }
        let open = Open(Arc::clone(&self.stats));
        let max = limits.max_handshakes as u64;
        if self.stats.active_handshakes.fetch_add(1, Ordering::SeqCst) >= max {
            self.stats.active_handshakes.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::new(
                Refusal::Capacity,
                format_args!("{max} handshakes in progress"),
            ));
        }
        Ok(Handshaking {
            open,
            handshake: Some(InHandshake {
                stats: Arc::clone(&self.stats),
                ip: None,
            }),
        })
    }

    /// The gate after a completed handshake: the TLS context's peer check, the identity, its
    /// authorization, its rate and its concurrency cap. The caller sends close_notify on a
    /// refusal (the handshake is done, so the client is owed a clean close).
    pub fn after_handshake(
        self: &Arc<Self>,
        mut entry: Handshaking,
        conn: &ServerConnection,
        tls_context: &TlsContext,
        authz: &Authorizer,
    ) -> Result<Permit, Refused> {
        entry.handshake_done();
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.stats.tls_resumptions.fetch_add(1, Ordering::Relaxed);
        }
        let leaf = conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or_else(|| Refused::new(Refusal::Tls, IdentityError::NoCertificate))?;
        let names = CertNames::read(leaf).map_err(|e| Refused::new(Refusal::Tls, e))?;
        let named = |r: Refused| match names.display_name() {
            Some(name) => r.of(name),
            None => r,
        };
        let anchor = tls_context
            .check_peer(conn)
            .map_err(|e| named(Refused::new(Refusal::Tls, e)))?;
        let (identity, policy) = match authz.identify(&names, anchor) {
            Ok(found) => found,
            Err(Unmatched::NoUsableName(why)) => {
                return Err(named(Refused::new(Refusal::Tls, why)));
            }
            Err(Unmatched::NoEntry) => {
                return Err(named(Refused::new(
                    Refusal::Unauthorized,
                    format_args!("no [[client]] entry matches this certificate (CA {anchor:?})"),
                )));
            }
        };
        if policy.allowed.is_empty() {
            return Err(
                Refused::new(Refusal::Unauthorized, "the entry's groups have no upstream")
                    .of(&identity.name),
            );
        }
        let (client_slot, lease) = self
            .client_gate(&identity.name, policy.limits)
            .map_err(|r| r.of(&identity.name))?;
        Ok(Permit {
            identity,
            not_after: names.not_after,
            allowed: policy.allowed.clone(),
            _open: entry.open,
            _client: client_slot,
            _lease: lease,
        })
    }

    /// The identity's rate and concurrency cap: shared through `[cluster]` while its Redis
    /// is up, else as its `on_error` says, else (no `[cluster]`, or `on_error = "local"`)
    /// this instance's own bucket and count. The local count is kept in every case, for
    /// [`Admission::open_connections`].
    fn client_gate(
        self: &Arc<Self>,
        identity: &str,
        limits: ClientLimits,
    ) -> Result<(ClientSlot, Option<Lease>), Refused> {
        let cluster = self.cluster();
        let shared = cluster.as_ref().map(|c| c.admit(identity, limits));
        let (cap, lease) = match shared {
            Some(Shared::Admitted(lease)) => (0, lease),
            Some(Shared::Refused(refused)) => return Err(refused),
            Some(Shared::Allow) => (0, None),
            Some(Shared::Local) | None => {
                if !self.client_rate.try_acquire(identity, limits.rate) {
                    return Err(Refused::new(Refusal::RateLimited, "rate limit exceeded"));
                }
                (limits.max_concurrent, None)
            }
        };
        let slot = self.take_client_slot(identity, cap)?;
        let lease = match (lease, &cluster) {
            (None, Some(c)) => c.unshared_lease(identity, limits),
            (lease, _) => lease,
        };
        Ok((slot, lease))
    }

    /// Counts a connection of `identity`, refused if `max` (0: no cap) are open already.
    /// Counted even without a cap, for [`Admission::open_connections`].
    fn take_client_slot(self: &Arc<Self>, identity: &str, max: u32) -> Result<ClientSlot, Refused> {
        let mut open = self.client_open.lock();
        let n = open.entry(identity.to_string()).or_insert(0);
        if max > 0 && *n >= max {
            return Err(Refused::new(
                Refusal::ConcurrencyLimited,
                format_args!("client already has {max} connections open (max_concurrent)"),
            ));
        }
        *n += 1;
        Ok(ClientSlot {
            admission: Arc::clone(self),
            identity: identity.to_string(),
        })
    }

    /// Connections `identity` has open now (admitted, not yet ended).
    pub fn open_connections(&self, identity: &str) -> u32 {
        self.client_open.lock().get(identity).copied().unwrap_or(0)
    }

    /// The tokens left in `identity`'s rate bucket under `limit`, without taking one: a full
    /// bucket (`limit.burst`) for an identity not seen lately.
    pub fn tokens_left(&self, identity: &str, limit: RateLimit) -> f64 {
        self.client_rate.peek(identity, limit)
    }

    /// Identities with a rate-limit bucket in memory now.
    pub fn tracked_clients(&self) -> usize {
        self.client_rate.tracked_clients()
    }

    /// Connections admitted without a per-address rate bucket because the bucket table was
    /// full (it fails open, so that a flood of sources cannot lock new ones out).
    pub fn ip_rate_untracked(&self) -> u64 {
        self.ip_rate.untracked_admissions()
    }
}

/// What a socket holds from the first gate until its handshake ends: its place among the open
/// connections and, while it handshakes, its handshake slots.
#[derive(Debug)]
pub struct Handshaking {
    open: Open,
    handshake: Option<InHandshake>,
}

impl Handshaking {
    /// Gives back the handshake slots (global and per address); the connection stays counted
    /// as open.
    pub fn handshake_done(&mut self) {
        self.handshake = None;
    }
}

/// What an admitted connection holds for as long as it lives; dropping it gives every count
/// back.
#[derive(Debug)]
pub struct Permit {
    /// The verified identity: its entry's name and the names it was matched by.
    pub identity: Identity,
    /// The client certificate's notAfter, Unix seconds.
    pub not_after: i64,
    /// The upstreams it may reach.
    pub allowed: Arc<[UpstreamId]>,
    _open: Open,
    _client: ClientSlot,
    /// Its `[cluster]` concurrency lease, removed from Redis when the permit drops.
    _lease: Option<Lease>,
}

/// One unit of `active_clients`.
#[derive(Debug)]
struct Open(Arc<Stats>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.active_clients.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One unit of `active_handshakes`, and of the address's handshakes if they are capped.
#[derive(Debug)]
struct InHandshake {
    stats: Arc<Stats>,
    /// Held for its Drop: the address's handshake count.
    ip: Option<IpSlot>,
}

impl Drop for InHandshake {
    fn drop(&mut self) {
        self.stats.active_handshakes.fetch_sub(1, Ordering::SeqCst);
    }
}

struct IpSlot {
    admission: Arc<Admission>,
    key: IpAddr,
}

impl fmt::Debug for IpSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("IpSlot").field(&self.key).finish()
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.admission.ip_handshakes.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

struct ClientSlot {
    admission: Arc<Admission>,
    identity: String,
}

impl fmt::Debug for ClientSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ClientSlot").field(&self.identity).finish()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.admission.client_open.lock();
        if let Some(n) = open.get_mut(&self.identity) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.identity);
            }
        }
    }
}

/// Handshakes in progress per address key; for tests.
#[cfg(test)]
impl Admission {
    fn ip_handshakes_of(&self, key: IpAddr) -> u32 {
        self.ip_handshakes.lock().get(&key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn admission() -> (Arc<Admission>, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        (Arc::new(Admission::new(stats.clone())), stats)
    }

    #[test]
    fn ipv6_sources_are_grouped_by_their_prefix_and_mapped_ipv4_is_unmapped() {
        assert_eq!(
            address_key(ip("2001:db8:1:2:aaaa::1"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            address_key(ip("2001:db8:1:2:aaaa::1"), 48),
            ip("2001:db8:1::")
        );
        assert_eq!(address_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(address_key(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
        assert_ne!(
            address_key(ip("::ffff:192.0.2.7"), 64),
            address_key(ip("::ffff:192.0.2.8"), 64),
            "IPv4 clients of a dual-stack listener do not share one /64"
        );
        assert_eq!(address_key(ip("192.0.2.7"), 1), ip("192.0.2.7"));
    }

    #[test]
    fn one_address_cannot_take_more_than_its_handshake_slots() {
        let (a, stats) = admission();
        let limits = Limits {
            per_ip_max_handshakes: 3,
            ..Limits::default()
        };
        let held: Vec<_> = (0..3)
            .map(|_| a.before_handshake(ip("10.0.0.1"), &limits).unwrap())
            .collect();
        let refused = a.before_handshake(ip("10.0.0.1"), &limits).unwrap_err();
        assert_eq!(refused.reason, Refusal::IpHandshakes);
        assert!(
            a.before_handshake(ip("10.0.0.2"), &limits).is_ok(),
            "another address is served"
        );
        assert_eq!(stats.active_handshakes.load(Ordering::SeqCst), 3);
        drop(held);
        assert_eq!(a.ip_handshakes_of(ip("10.0.0.1")), 0);
        assert_eq!(stats.active_clients.load(Ordering::SeqCst), 0);
        assert!(a.ip_handshakes.lock().is_empty(), "no key is left behind");
    }

    #[test]
    fn behind_a_trusted_proxy_the_address_limits_apply_to_the_address_in_its_header() {
        let (a, stats) = admission();
        let limits = Limits {
            per_ip_max_handshakes: 2,
            ..Limits::default()
        };
        // Many sockets from the balancer in front: no per-address count for its own address.
        let mut from_lb: Vec<_> = (0..5)
            .map(|_| a.before_proxy_header(&limits).unwrap())
            .collect();
        assert!(a.ip_handshakes.lock().is_empty());
        assert_eq!(stats.active_handshakes.load(Ordering::SeqCst), 5);
        // Their headers name the clients: two from one address fit, the third is refused.
        a.address_known(&mut from_lb[0], ip("198.51.100.7"), &limits)
            .unwrap();
        a.address_known(&mut from_lb[1], ip("198.51.100.7"), &limits)
            .unwrap();
        let refused = a
            .address_known(&mut from_lb[2], ip("198.51.100.7"), &limits)
            .unwrap_err();
        assert_eq!(refused.reason, Refusal::IpHandshakes);
        a.address_known(&mut from_lb[3], ip("198.51.100.8"), &limits)
            .unwrap();
        assert_eq!(a.ip_handshakes_of(ip("198.51.100.7")), 2);
        from_lb[0].handshake_done();
        assert_eq!(a.ip_handshakes_of(ip("198.51.100.7")), 1);
        drop(from_lb);
        assert!(a.ip_handshakes.lock().is_empty());
        assert_eq!(stats.active_handshakes.load(Ordering::SeqCst), 0);
        assert_eq!(stats.active_clients.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_finished_handshake_frees_its_address_slot_but_stays_open() {
        let (a, stats) = admission();
        let limits = Limits {
            per_ip_max_handshakes: 1,
            ..Limits::default()
        };
        let mut first = a.before_handshake(ip("10.0.0.1"), &limits).unwrap();
        first.handshake_done();
        let _second = a.before_handshake(ip("10.0.0.1"), &limits).unwrap();
        assert_eq!(stats.active_clients.load(Ordering::SeqCst), 2);
        assert_eq!(stats.active_handshakes.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn zero_turns_the_per_address_handshake_cap_off() {
        let (a, _) = admission();
        let limits = Limits {
            per_ip_max_handshakes: 0,
            ..Limits::default()
        };
        let _held: Vec<_> = (0..100)
            .map(|_| a.before_handshake(ip("10.0.0.1"), &limits).unwrap())
            .collect();
        assert!(a.ip_handshakes.lock().is_empty(), "nothing is tracked");
    }

    #[test]
    fn the_connection_and_handshake_caps_refuse_as_capacity_and_give_back_every_count() {
        let (a, stats) = admission();
        let limits = Limits {
            max_connections: 2,
            per_ip_max_handshakes: 10,
            ..Limits::default()
        };
        let _held: Vec<_> = (0..2)
            .map(|_| a.before_handshake(ip("10.0.0.1"), &limits).unwrap())
            .collect();
        let refused = a.before_handshake(ip("10.0.0.1"), &limits).unwrap_err();
        assert_eq!(refused.reason, Refusal::Capacity);
        assert_eq!(stats.active_clients.load(Ordering::SeqCst), 2);
        assert_eq!(
            a.ip_handshakes_of(ip("10.0.0.1")),
            2,
            "the refused socket's slot was given back"
        );
        a.set_thread_cap(1);
        let limits = Limits {
            max_connections: 100,
            ..limits
        };
        assert_eq!(
            a.before_handshake(ip("10.0.0.3"), &limits)
                .unwrap_err()
                .reason,
            Refusal::Capacity,
            "the thread cap binds below max_connections"
        );
    }

    #[test]
    fn the_per_address_rate_refuses_as_ip_rate_limited_keyed_by_prefix() {
        let (a, _) = admission();
        let limits = Limits {
            per_ip_handshake_rate: 0.001,
            per_ip_handshake_burst: 2,
            ..Limits::default()
        };
        assert!(a.before_handshake(ip("2001:db8::1"), &limits).is_ok());
        assert!(a.before_handshake(ip("2001:db8::2"), &limits).is_ok());
        let refused = a.before_handshake(ip("2001:db8::3"), &limits).unwrap_err();
        assert_eq!(refused.reason, Refusal::IpRateLimited);
        assert!(a.before_handshake(ip("2001:db8:0:1::1"), &limits).is_ok());
    }

    #[test]
    fn a_client_slot_is_capped_and_given_back() {
        let (a, _) = admission();
        let one = a.take_client_slot("c", 1).unwrap();
        assert_eq!(
            a.take_client_slot("c", 1).unwrap_err().reason,
            Refusal::ConcurrencyLimited
        );
        assert!(a.take_client_slot("other", 1).is_ok());
        drop(one);
        assert!(a.take_client_slot("c", 1).is_ok());
        let uncapped: Vec<_> = (0..3)
            .map(|_| a.take_client_slot("c", 0).unwrap())
            .collect();
        assert_eq!(a.open_connections("c"), 3, "0: no cap, still counted");
        drop(uncapped);
        assert_eq!(a.open_connections("c"), 0);
        assert!(
            a.client_open.lock().is_empty(),
            "a name leaves with its last connection"
        );
    }

    fn client_limits(burst: u32, max_concurrent: u32) -> ClientLimits {
        ClientLimits {
            rate: RateLimit { rate: 0.001, burst },
            max_concurrent,
        }
    }

    #[test]
    fn without_a_cluster_the_client_gate_takes_a_local_token_then_a_slot() {
        let (a, _) = admission();
        let limits = client_limits(2, 0);
        assert_eq!(a.tracked_clients(), 0);
        assert_eq!(
            a.tokens_left("c", limits.rate),
            2.0,
            "a new identity: a full bucket"
        );
        let first = a.client_gate("c", limits).unwrap();
        assert!(first.1.is_none(), "no lease without [cluster]");
        assert_eq!(a.tracked_clients(), 1);
        let left = a.tokens_left("c", limits.rate);
        assert!((0.99..1.01).contains(&left), "{left}");
        let _second = a.client_gate("c", limits).unwrap();
        let refused = a.client_gate("c", limits).unwrap_err();
        assert_eq!(refused.reason, Refusal::RateLimited);
        assert_eq!(refused.to_string(), "rate_limited: rate limit exceeded");
        assert_eq!(a.open_connections("c"), 2);
        let capped = client_limits(5, 1);
        let _held = a.client_gate("d", capped).unwrap();
        assert_eq!(
            a.client_gate("d", capped).unwrap_err().reason,
            Refusal::ConcurrencyLimited
        );
        assert_eq!(a.tracked_clients(), 2);
    }

    #[test]
    fn a_full_per_address_table_admits_and_counts_the_untracked() {
        let stats = Arc::new(Stats::default());
        let mut admission = Admission::new(stats);
        admission.ip_rate =
            RateLimiter::with_max_keys(Box::new(crate::ratelimit::SystemClock::default()), 1);
        let a = Arc::new(admission);
        let limits = Limits {
            per_ip_handshake_rate: 0.001,
            per_ip_handshake_burst: 1,
            ..Limits::default()
        };
        assert_eq!(a.ip_rate_untracked(), 0);
        let _first = a.before_handshake(ip("10.0.0.1"), &limits).unwrap();
        let _second = a.before_handshake(ip("10.0.0.2"), &limits).unwrap();
        let _third = a.before_handshake(ip("10.0.0.3"), &limits).unwrap();
        assert_eq!(a.ip_rate_untracked(), 2);
    }

    #[test]
    fn debug_output_names_what_is_held() {
        let (a, _) = admission();
        a.set_thread_cap(7);
        assert_eq!(format!("{a:?}"), "Admission { thread_cap: 7, .. }");
        let limits = Limits {
            per_ip_max_handshakes: 3,
            ..Limits::default()
        };
        let h = a.before_handshake(ip("10.0.0.9"), &limits).unwrap();
        assert!(format!("{h:?}").contains("IpSlot(10.0.0.9)"), "{h:?}");
        let slot = a.take_client_slot("c1", 0).unwrap();
        assert_eq!(format!("{slot:?}"), "ClientSlot(\"c1\")");
    }
}
