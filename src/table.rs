//! The upstream table: one record per upstream (name, addresses, weight, slow start, health
//! state, active count, counters), and the least-connection choice over them.
//!
//! One `parking_lot` mutex guards every record and the tie-breaking clock, so that a choice and
//! the count it takes are one atomic step: two connections arriving together cannot both see
//! the same upstream as emptiest. The lock is held for a scan of the allowed upstreams, a flip
//! of a health flag, or a copy of a few fields; never across I/O.
//!
//! Health lives here too: the rise/fall state machine ([`UpstreamTable::observe`]) updates the
//! same record the choice reads, so the UP flag exists once. Who produces the checks (the
//! prober thread, a failed connect) and what a flip sets off (closing sessions) is decided by
//! the callers.
//!
//! Records are never removed, so an [`UpstreamId`] held by a connection in flight stays valid
//! across reloads; an upstream that a reload dropped is marked retired and is never chosen or
//! probed again (unless a later reload brings its name back).
//!
//! A count is taken by [`UpstreamTable::acquire`] and released when the returned [`ConnGuard`]
//! drops, on every path: normal end, error, or a panic unwinding the connection's thread.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;

use crate::config::{DEFAULT_FALL, DEFAULT_RISE};
use crate::stats::UpstreamStats;
use crate::upstream::TlsPeer;

/// Index of an upstream's record in the table; stable for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId(pub usize);

/// What a configuration says of one upstream: the input of [`UpstreamTable::update`].
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Unique name, used in logs and metrics, and what identifies it across reloads.
    pub name: String,
    /// Addresses tried in order on connect.
    pub addrs: Vec<SocketAddr>,
    /// Relative capacity for the least-connection choice; 0 is taken as 1.
    pub weight: u32,
    /// After coming back UP, the time over which its weight ramps up to full (zero: at once).
    pub slow_start: Duration,
    /// TLS toward it, when its group has `[group.tls]`; `None` (the default): plaintext.
    pub tls: Option<Arc<TlsPeer>>,
    /// Its group (`""` when it is not from a config), which live enforcement checks a
    /// connection's identity may still reach.
    pub group: Arc<str>,
    /// Its group's name, when the group's `[[group]]` has `proxy_protocol = "v2"`: each
    /// connection starts with a PROXY v2 header (naming the group) and each probe with a
    /// LOCAL one. `None` (the default): no header.
    pub proxy_group: Option<Arc<str>>,
}

impl Upstream {
    /// An upstream with weight 1 at one address.
    pub fn new(name: impl Into<String>, addr: SocketAddr) -> Upstream {
        Upstream {
            name: name.into(),
            addrs: vec![addr],
            weight: 1,
            slow_start: Duration::ZERO,
            tls: None,
            group: Arc::from(""),
            proxy_group: None,
        }
    }
}

/// What a connection needs of the upstream it was given: copied out of the record under the
/// lock, used outside it.
#[derive(Debug, Clone)]
pub struct Target {
    /// The upstream's name.
    pub name: Arc<str>,
    /// Its addresses, tried in order.
    pub addrs: Arc<[SocketAddr]>,
    /// Its counters.
    pub stats: Arc<UpstreamStats>,
    /// TLS toward it; `None`: plaintext.
    pub tls: Option<Arc<TlsPeer>>,
    /// Its group.
    pub group: Arc<str>,
    /// Its group, when connections to it start with a PROXY v2 header; `None`: no header.
    pub proxy_group: Option<Arc<str>>,
}

/// What the prober checks of one upstream: its id, its addresses, its TLS (`None`:
/// plaintext), and whether a probe starts with a PROXY v2 LOCAL header.
pub type ProbeTarget = (UpstreamId, Arc<[SocketAddr]>, Option<Arc<TlsPeer>>, bool);

/// One upstream as metrics and tests see it at a moment.
#[derive(Debug, Clone)]
pub struct UpstreamView {
    /// Its id.
    pub id: UpstreamId,
    /// Its name.
    pub name: Arc<str>,
    /// Whether it is UP.
    pub up: bool,
    /// Connections being forwarded to it now.
    pub active: u64,
    /// Its counters.
    pub stats: Arc<UpstreamStats>,
    /// Its configured weight.
    pub weight: u32,
    /// The share of its weight the choice gives it now: below 1 while its slow start ramps
    /// (from 0.1 up), 1 otherwise.
    pub slow_start_factor: f64,
    /// Its last flip between UP and DOWN; `None` while it is in the state it started in (UP).
    pub last_change: Option<StateChange>,
    /// TLS toward it; `None`: plaintext.
    pub tls: Option<Arc<TlsPeer>>,
}

/// A flip of an upstream between UP and DOWN, as `/status` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// When.
    pub at: SystemTime,
    /// Why: the failed check's error, or the successful checks that brought it back.
    pub reason: Arc<str>,
}

#[derive(Debug)]
struct Record {
    name: Arc<str>,
    addrs: Arc<[SocketAddr]>,
    weight: u32,
    /// Ramp time after coming back UP (zero: none).
    slow_start: Duration,
    /// When the record last came back UP, while its ramp is running.
    up_since: Option<Instant>,
    up: bool,
    /// Consecutive checks that disagreed with `up`.
    streak: u32,
    active: u64,
    /// When this record was last chosen (a tick of `Inner::picks`); ties go to the oldest, so
    /// they rotate whatever mix of clients and allowed sets the choices come from.
    last_pick: u64,
    /// Whether the running configuration has this upstream; a retired one only serves the
    /// connections it already has.
    configured: bool,
    stats: Arc<UpstreamStats>,
    tls: Option<Arc<TlsPeer>>,
    group: Arc<str>,
    proxy_group: Option<Arc<str>>,
    last_change: Option<StateChange>,
}

/// Weight scale: effective weights are in thousandths, so a ramp can start at a tenth of a
/// weight of 1 without fractions.
const SCALE: u64 = 1000;

impl Record {
    fn new(spec: Upstream) -> Record {
        Record {
            name: spec.name.into(),
            addrs: spec.addrs.into(),
            weight: spec.weight.max(1),
            slow_start: spec.slow_start,
            up_since: None,
            up: true,
            streak: 0,
            active: 0,
            last_pick: 0,
            configured: true,
            stats: Arc::default(),
            tls: spec.tls,
            group: spec.group,
            proxy_group: spec.proxy_group,
            last_change: None,
        }
    }

    /// What [`Record::effective_weight`] scales the weight by now, without ending the ramp.
    fn slow_start_factor(&self, now: Instant) -> f64 {
        match self.up_since {
            Some(since) if now.saturating_duration_since(since) < self.slow_start => {
                let elapsed = now.saturating_duration_since(since);
                0.1 + 0.9 * (elapsed.as_secs_f64() / self.slow_start.as_secs_f64())
            }
            _ => 1.0,
        }
    }

    /// The weight the choice uses now, in thousandths: during slow start it ramps linearly
    /// from a tenth to the full weight.
    fn effective_weight(&mut self, now: Instant) -> u64 {
        let full = u64::from(self.weight) * SCALE;
        let Some(since) = self.up_since else {
            return full;
        };
        let elapsed = now.saturating_duration_since(since);
        if elapsed >= self.slow_start {
            self.up_since = None;
            return full;
        }
        let fraction = elapsed.as_secs_f64() / self.slow_start.as_secs_f64();
        ((full as f64) * (0.1 + 0.9 * fraction)).max(1.0) as u64
    }

    fn target(&self) -> Target {
        Target {
            name: self.name.clone(),
            addrs: self.addrs.clone(),
            stats: self.stats.clone(),
            tls: self.tls.clone(),
            group: self.group.clone(),
            proxy_group: self.proxy_group.clone(),
        }
    }
}

#[derive(Debug)]
struct Inner {
    records: Vec<Record>,
    /// Choices made so far: the clock of `Record::last_pick`.
    picks: u64,
    rise: u32,
    fall: u32,
}

/// Every upstream's record.
#[derive(Debug)]
pub struct UpstreamTable {
    inner: Mutex<Inner>,
}

/// A count held on one upstream; dropping it releases the count.
#[derive(Debug)]
pub struct ConnGuard {
    table: Arc<UpstreamTable>,
    id: UpstreamId,
}

impl ConnGuard {
    /// The upstream this count is held on.
    pub fn id(&self) -> UpstreamId {
        self.id
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut inner = self.table.inner.lock();
        // A guard is only made by acquire, which incremented this very record, and records
        // are never removed, so the index is valid and the count at least one.
        if let Some(r) = inner.records.get_mut(self.id.0) {
            r.active = r.active.saturating_sub(1);
        }
    }
}

/// A health flip: what [`UpstreamTable::observe`] reports when a check changed an upstream's
/// state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flip {
    /// The upstream.
    pub id: UpstreamId,
    /// Its name, for logs.
    pub name: Arc<str>,
    /// Its new state: true is UP.
    pub up: bool,
}

/// A candidate during a choice: its id, load and effective weight.
#[derive(Clone, Copy)]
struct Candidate {
    id: UpstreamId,
    active: u64,
    weight: u64,
    last_pick: u64,
}

/// Does `a` carry less load than `b`? Compares active/weight without division.
fn lighter(a: &Candidate, b: &Candidate) -> bool {
    u128::from(a.active) * u128::from(b.weight) < u128::from(b.active) * u128::from(a.weight)
}

impl UpstreamTable {
    /// A table of `upstreams` (ids are their indices), all UP, no connections, with the
    /// default health thresholds (rise 2, fall 3).
    pub fn new(upstreams: Vec<Upstream>) -> Arc<UpstreamTable> {
        Arc::new(UpstreamTable {
            inner: Mutex::new(Inner {
                records: upstreams.into_iter().map(Record::new).collect(),
                picks: 0,
                rise: DEFAULT_RISE,
                fall: DEFAULT_FALL,
            }),
        })
    }

    /// Replaces the configured set. An upstream whose name is already known keeps its id,
    /// counts, health and counters (its addresses, weight, slow start and TLS are updated); a new
    /// name gets a new record, UP; a known name missing from `upstreams` is retired: never
    /// chosen again, while its connections in flight go on. Returns the ids of `upstreams`, in
    /// order. One lock: no choice sees half of an update.
    pub fn update(&self, upstreams: Vec<Upstream>) -> Vec<UpstreamId> {
        let mut inner = self.inner.lock();
        for r in &mut inner.records {
            r.configured = false;
        }
        let mut ids = Vec::with_capacity(upstreams.len());
        for spec in upstreams {
            let found = inner.records.iter().position(|r| *r.name == *spec.name);
            let id = match found {
                Some(i) => {
                    let r = &mut inner.records[i];
                    r.addrs = spec.addrs.into();
                    r.weight = spec.weight.max(1);
                    r.slow_start = spec.slow_start;
                    r.tls = spec.tls;
                    r.group = spec.group;
                    r.proxy_group = spec.proxy_group;
                    r.configured = true;
                    i
                }
                None => {
                    inner.records.push(Record::new(spec));
                    inner.records.len() - 1
                }
            };
            ids.push(UpstreamId(id));
        }
        ids
    }

    /// Sets the consecutive successes (`rise`) and failures (`fall`) that flip an upstream;
    /// zero is taken as 1.
    pub fn set_thresholds(&self, rise: u32, fall: u32) {
        let mut inner = self.inner.lock();
        inner.rise = rise.max(1);
        inner.fall = fall.max(1);
    }

    /// Picks the UP, configured upstream among `allowed`, minus `exclude`, with the lowest
    /// active/weight and takes a count on it. Ties go to the tied upstream chosen least
    /// recently, so sequential short connections spread over all tied upstreams. `None` when
    /// no candidate is UP.
    pub fn acquire(
        self: &Arc<Self>,
        allowed: &[UpstreamId],
        exclude: &[UpstreamId],
    ) -> Option<(ConnGuard, Target)> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let mut best: Option<Candidate> = None;
        for &id in allowed {
            let Some(r) = inner.records.get_mut(id.0) else {
                continue;
            };
            if !r.up || !r.configured || exclude.contains(&id) {
                continue;
            }
            let c = Candidate {
                id,
                active: r.active,
                weight: r.effective_weight(now),
                last_pick: r.last_pick,
            };
            let better = best
                .is_none_or(|b| lighter(&c, &b) || (!lighter(&b, &c) && c.last_pick < b.last_pick));
            if better {
                best = Some(c);
            }
        }
        let id = best?.id;
        inner.picks += 1;
        let tick = inner.picks;
        let r = &mut inner.records[id.0];
        r.active += 1;
        r.last_pick = tick;
        let target = r.target();
        Some((
            ConnGuard {
                table: Arc::clone(self),
                id,
            },
            target,
        ))
    }

    /// Records one health check of `id`: `ok` or a failure described by `detail`. Returns the
    /// flip when this check changed the upstream's state (after `rise` consecutive successes
    /// or `fall` consecutive failures), and logs it once; the caller acts on it outside the
    /// lock.
    pub fn observe(&self, id: UpstreamId, ok: bool, detail: &str) -> Option<Flip> {
        let (name, needed) = {
            let mut inner = self.inner.lock();
            let (rise, fall) = (inner.rise, inner.fall);
            let r = inner.records.get_mut(id.0)?;
            if ok == r.up {
                r.streak = 0;
                return None;
            }
            r.streak += 1;
            let needed = if r.up { fall } else { rise };
            if r.streak < needed {
                return None;
            }
            r.up = ok;
            r.streak = 0;
            r.up_since = (ok && !r.slow_start.is_zero()).then(Instant::now);
            let reason = if ok {
                format!("{needed}/{needed} checks succeeded")
            } else {
                format!("{detail} ({needed}/{needed} checks failed)")
            };
            r.last_change = Some(StateChange {
                at: SystemTime::now(),
                reason: reason.into(),
            });
            (r.name.clone(), needed)
        };
        if ok {
            log::info!("upstream {name} is UP ({needed}/{needed} checks succeeded)");
        } else {
            log::warn!("upstream {name} is DOWN: {detail} ({needed}/{needed} checks failed)");
        }
        Some(Flip { id, name, up: ok })
    }

    /// The configured upstreams' ids, addresses, TLS and PROXY header: what the prober checks.
    pub fn probe_targets(&self) -> Vec<ProbeTarget> {
        let inner = self.inner.lock();
        inner
            .records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.configured)
            .map(|(i, r)| {
                let proxy = r.proxy_group.is_some();
                (UpstreamId(i), r.addrs.clone(), r.tls.clone(), proxy)
            })
            .collect()
    }

    /// The configured upstreams as they are now, in record order.
    pub fn snapshot(&self) -> Vec<UpstreamView> {
        let now = Instant::now();
        let inner = self.inner.lock();
        inner
            .records
            .iter()
            .enumerate()
            .filter(|(_, r)| r.configured)
            .map(|(i, r)| UpstreamView {
                id: UpstreamId(i),
                name: r.name.clone(),
                up: r.up,
                active: r.active,
                stats: r.stats.clone(),
                weight: r.weight,
                slow_start_factor: r.slow_start_factor(now),
                last_change: r.last_change.clone(),
                tls: r.tls.clone(),
            })
            .collect()
    }

    /// The name of an upstream, for logs.
    pub fn name(&self, id: UpstreamId) -> Arc<str> {
        let inner = self.inner.lock();
        match inner.records.get(id.0) {
            Some(r) => r.name.clone(),
            None => format!("#{}", id.0).into(),
        }
    }

    /// Whether an upstream is UP (eligible for new connections, if configured).
    pub fn is_up(&self, id: UpstreamId) -> bool {
        self.inner.lock().records.get(id.0).is_some_and(|r| r.up)
    }

    /// Active connections on an upstream.
    pub fn active(&self, id: UpstreamId) -> u64 {
        self.inner.lock().records.get(id.0).map_or(0, |r| r.active)
    }

    /// Active connections across all upstreams, retired ones included.
    pub fn total_active(&self) -> u64 {
        self.inner.lock().records.iter().map(|r| r.active).sum()
    }

    /// Connections ever forwarded, across all upstreams (health probes excluded).
    pub fn total_forwarded(&self) -> u64 {
        use std::sync::atomic::Ordering;
        let inner = self.inner.lock();
        inner
            .records
            .iter()
            .map(|r| r.stats.connections_total.load(Ordering::Relaxed))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(weights: &[u32]) -> Arc<UpstreamTable> {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        UpstreamTable::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, &w)| Upstream {
                    weight: w,
                    ..Upstream::new(format!("u{i}"), addr)
                })
                .collect(),
        )
    }

    fn ids(n: usize) -> Vec<UpstreamId> {
        (0..n).map(UpstreamId).collect()
    }

    fn pick(t: &Arc<UpstreamTable>, allowed: &[UpstreamId], exclude: &[UpstreamId]) -> ConnGuard {
        t.acquire(allowed, exclude).unwrap().0
    }

    /// Flips an upstream by hand (thresholds of 1).
    fn set_up(t: &UpstreamTable, id: UpstreamId, up: bool) -> bool {
        t.set_thresholds(1, 1);
        t.observe(id, up, "test").is_some()
    }

    #[test]
    fn it_picks_the_upstream_with_the_fewest_active_connections() {
        let t = table(&[1, 1, 1]);
        let all = ids(3);
        let _a = pick(&t, &[UpstreamId(0)], &[]);
        let _b = pick(&t, &[UpstreamId(0)], &[]);
        let _c = pick(&t, &[UpstreamId(2)], &[]);
        assert_eq!(pick(&t, &all, &[]).id(), UpstreamId(1));
    }

    #[test]
    fn ties_rotate_so_sequential_connections_spread_over_all_upstreams() {
        let t = table(&[1, 1, 1]);
        let all = ids(3);
        let picked: Vec<usize> = (0..6).map(|_| pick(&t, &all, &[]).id().0).collect();
        for u in 0..3 {
            assert_eq!(picked.iter().filter(|&&p| p == u).count(), 2, "{picked:?}");
        }
    }

    #[test]
    fn interleaved_clients_with_different_allowed_sets_still_spread_the_picks_evenly() {
        let t = table(&[1, 1, 1]);
        let mut picks = [0; 3];
        for _ in 0..6 {
            picks[pick(&t, &ids(3), &[]).id().0] += 1;
            picks[pick(&t, &[UpstreamId(2)], &[]).id().0] += 1;
        }
        // Upstream 2 takes every pick of the narrow client; the broad client's picks go to the
        // upstreams picked less recently, which is as even as this mix allows.
        assert_eq!(picks, [3, 3, 6]);
    }

    #[test]
    fn held_connections_fill_every_upstream_evenly() {
        let t = table(&[1, 1, 1]);
        let all = ids(3);
        let held: Vec<ConnGuard> = (0..30).map(|_| pick(&t, &all, &[])).collect();
        for u in all {
            assert_eq!(t.active(u), 10);
        }
        drop(held);
        assert_eq!(t.total_active(), 0);
    }

    #[test]
    fn weights_scale_the_share_of_connections() {
        let t = table(&[3, 1]);
        let all = ids(2);
        let _held: Vec<ConnGuard> = (0..40).map(|_| pick(&t, &all, &[])).collect();
        assert_eq!(t.active(UpstreamId(0)), 30);
        assert_eq!(t.active(UpstreamId(1)), 10);
    }

    #[test]
    fn a_recovered_upstream_in_slow_start_takes_a_small_share_at_first() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t = UpstreamTable::new(vec![
            Upstream::new("u0", addr),
            Upstream {
                slow_start: Duration::from_secs(3600),
                ..Upstream::new("u1", addr)
            },
        ]);
        let all = ids(2);
        set_up(&t, UpstreamId(1), false);
        let mut held: Vec<ConnGuard> = (0..20).map(|_| pick(&t, &all, &[])).collect();
        assert_eq!(t.active(UpstreamId(0)), 20);
        set_up(&t, UpstreamId(1), true);
        held.extend((0..22).map(|_| pick(&t, &all, &[])));
        // At a tenth of its weight, the empty upstream fills to a tenth of the other's load
        // instead of taking all 22 new connections.
        let recovered = t.active(UpstreamId(1));
        assert!(
            (2..=5).contains(&recovered),
            "recovered upstream got {recovered}"
        );
    }

    #[test]
    fn without_slow_start_a_recovered_upstream_takes_the_new_connections() {
        let t = table(&[1, 1]);
        let all = ids(2);
        set_up(&t, UpstreamId(1), false);
        let mut held: Vec<ConnGuard> = (0..20).map(|_| pick(&t, &all, &[])).collect();
        set_up(&t, UpstreamId(1), true);
        held.extend((0..20).map(|_| pick(&t, &all, &[])));
        assert_eq!(t.active(UpstreamId(1)), 20);
    }

    #[test]
    fn only_allowed_upstreams_are_chosen() {
        let t = table(&[1, 1, 1]);
        for _ in 0..10 {
            assert_eq!(pick(&t, &[UpstreamId(2)], &[]).id(), UpstreamId(2));
        }
    }

    #[test]
    fn down_and_excluded_upstreams_are_skipped() {
        let t = table(&[1, 1, 1]);
        let all = ids(3);
        assert!(set_up(&t, UpstreamId(0), false));
        assert!(
            !set_up(&t, UpstreamId(0), false),
            "no change the second time"
        );
        for _ in 0..10 {
            assert_eq!(pick(&t, &all, &[UpstreamId(1)]).id(), UpstreamId(2));
        }
        set_up(&t, UpstreamId(2), false);
        assert!(t.acquire(&all, &[UpstreamId(1)]).is_none());
    }

    #[test]
    fn nothing_allowed_means_nothing_chosen() {
        let t = table(&[1]);
        assert!(t.acquire(&[], &[]).is_none());
        assert!(
            t.acquire(&[UpstreamId(7)], &[]).is_none(),
            "an id outside the table"
        );
    }

    #[test]
    fn an_upstream_dropped_by_an_update_is_never_chosen_but_keeps_its_connections() {
        let t = table(&[1, 1]);
        let held = pick(&t, &[UpstreamId(1)], &[]);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let ids = t.update(vec![Upstream::new("u0", addr), Upstream::new("u2", addr)]);
        assert_eq!(ids, vec![UpstreamId(0), UpstreamId(2)], "u0 keeps its id");
        // A connection that still holds the old allowed set asks for u1: it gets nothing.
        assert!(t.acquire(&[UpstreamId(1)], &[]).is_none());
        assert_eq!(t.active(UpstreamId(1)), 1);
        assert_eq!(
            t.probe_targets()
                .iter()
                .map(|(id, _, _, _)| *id)
                .collect::<Vec<_>>(),
            ids,
            "a retired upstream is not probed"
        );
        drop(held);
        assert_eq!(t.total_active(), 0);
        let back = t.update(vec![Upstream::new("u1", addr)]);
        assert_eq!(
            back,
            vec![UpstreamId(1)],
            "a name that comes back keeps its id"
        );
        assert_eq!(pick(&t, &back, &[]).id(), UpstreamId(1));
    }

    #[test]
    fn an_upstream_goes_down_only_after_fall_consecutive_failures() {
        let t = table(&[1]);
        t.set_thresholds(2, 3);
        let id = UpstreamId(0);
        assert_eq!(t.observe(id, false, "x"), None);
        assert_eq!(t.observe(id, false, "x"), None);
        assert_eq!(t.observe(id, true, ""), None, "a success resets the streak");
        assert_eq!(t.observe(id, false, "x"), None);
        assert_eq!(t.observe(id, false, "x"), None);
        assert!(t.is_up(id));
        let flip = t.observe(id, false, "x").unwrap();
        assert_eq!((flip.id, &*flip.name, flip.up), (id, "u0", false));
        assert!(!t.is_up(id));
        assert!(
            t.acquire(&[id], &[]).is_none(),
            "a DOWN upstream is not chosen"
        );
    }

    #[test]
    fn a_down_upstream_comes_back_after_rise_consecutive_successes() {
        let t = table(&[1]);
        t.set_thresholds(2, 1);
        let id = UpstreamId(0);
        assert!(t.observe(id, false, "x").is_some_and(|f| !f.up));
        assert_eq!(t.observe(id, true, ""), None);
        assert_eq!(
            t.observe(id, false, "x"),
            None,
            "a failure resets the streak"
        );
        assert_eq!(t.observe(id, true, ""), None);
        assert!(t.observe(id, true, "").is_some_and(|f| f.up));
        assert!(t.is_up(id));
    }

    #[test]
    fn the_snapshot_shows_the_last_flip_and_its_reason() {
        let t = table(&[3]);
        t.set_thresholds(2, 1);
        let id = UpstreamId(0);
        let view = |t: &UpstreamTable| t.snapshot().remove(0);
        assert_eq!(view(&t).last_change, None, "no flip yet");
        assert_eq!(view(&t).weight, 3);
        t.observe(id, false, "connect failed: refused");
        let down = view(&t).last_change.unwrap();
        assert_eq!(&*down.reason, "connect failed: refused (1/1 checks failed)");
        t.observe(id, true, "");
        t.observe(id, true, "");
        let up = view(&t).last_change.unwrap();
        assert_eq!(&*up.reason, "2/2 checks succeeded");
        assert!(up.at >= down.at);
    }

    #[test]
    fn the_slow_start_factor_ramps_from_a_tenth_and_is_one_outside_a_ramp() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t = UpstreamTable::new(vec![Upstream {
            slow_start: Duration::from_secs(3600),
            ..Upstream::new("u0", addr)
        }]);
        assert_eq!(
            t.snapshot()[0].slow_start_factor,
            1.0,
            "started UP: no ramp"
        );
        set_up(&t, UpstreamId(0), false);
        set_up(&t, UpstreamId(0), true);
        let factor = t.snapshot()[0].slow_start_factor;
        assert!((0.1..0.11).contains(&factor), "just back UP: {factor}");
    }

    #[test]
    fn the_ramp_is_linear_from_a_tenth_and_ends_at_the_full_weight() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut r = Record::new(Upstream {
            weight: 2,
            slow_start: Duration::from_secs(10),
            ..Upstream::new("u0", addr)
        });
        let t0 = Instant::now();
        r.up_since = Some(t0);
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert!((r.slow_start_factor(t0) - 0.1).abs() < 1e-9);
        assert!((r.slow_start_factor(at(5)) - 0.55).abs() < 1e-9);
        assert_eq!(r.slow_start_factor(at(10)), 1.0, "the ramp has ended");
        assert_eq!(r.slow_start_factor(at(20)), 1.0);
        assert_eq!(r.effective_weight(t0), 200);
        assert_eq!(r.effective_weight(at(5)), 1100);
        assert_eq!(r.up_since, Some(t0), "still ramping");
        assert_eq!(r.effective_weight(at(10)), 2000);
        assert_eq!(r.up_since, None, "the ended ramp is forgotten");
        assert_eq!(r.slow_start_factor(at(5)), 1.0);
        assert_eq!(r.effective_weight(at(5)), 2000);
    }

    #[test]
    fn a_down_upstream_has_no_ramp_running() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t = UpstreamTable::new(vec![Upstream {
            slow_start: Duration::from_secs(3600),
            ..Upstream::new("u0", addr)
        }]);
        set_up(&t, UpstreamId(0), false);
        assert_eq!(t.inner.lock().records[0].up_since, None);
        assert_eq!(t.snapshot()[0].slow_start_factor, 1.0);
    }

    #[test]
    fn totals_add_up_every_upstream() {
        use std::sync::atomic::Ordering;
        let t = table(&[1, 1]);
        assert_eq!((t.total_active(), t.total_forwarded()), (0, 0));
        let a = pick(&t, &[UpstreamId(0)], &[]);
        let b = pick(&t, &[UpstreamId(1)], &[]);
        let c = pick(&t, &[UpstreamId(1)], &[]);
        assert_eq!(t.total_active(), 3);
        for (i, n) in [(0, 2), (1, 5)] {
            t.inner.lock().records[i]
                .stats
                .connections_total
                .store(n, Ordering::Relaxed);
        }
        assert_eq!(t.total_forwarded(), 7);
        drop((a, b));
        assert_eq!(t.total_active(), 1);
        drop(c);
        assert_eq!(t.total_active(), 0);
    }

    #[test]
    fn an_unknown_upstream_is_ignored() {
        assert_eq!(table(&[1]).observe(UpstreamId(5), false, "x"), None);
    }

    #[test]
    fn a_panicking_thread_still_releases_its_count() {
        let t = table(&[1]);
        let t2 = t.clone();
        let r = std::thread::spawn(move || {
            let _g = pick(&t2, &[UpstreamId(0)], &[]);
            panic!("connection thread dies");
        })
        .join();
        assert!(r.is_err());
        assert_eq!(t.total_active(), 0);
        assert!(
            t.acquire(&[UpstreamId(0)], &[]).is_some(),
            "the lock is not poisoned"
        );
    }

    #[test]
    fn counts_stay_exact_under_many_threads() {
        let t = table(&[1, 2, 3, 4]);
        let all = ids(4);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (t, all) = (t.clone(), all.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let g = pick(&t, &all, &[]);
                        let h = pick(&t, &all, &[g.id()]);
                        assert_ne!(g.id(), h.id());
                    }
                })
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(t.total_active(), 0);
    }
}
