//! The least-connection table: active connection counts per upstream, and the choice of the
//! least-loaded one.
//!
//! One `parking_lot` mutex guards the counts, the health flags and the tie-breaking cursor, so
//! that a choice and the count it takes are one atomic step: two connections arriving together
//! cannot both see the same upstream as emptiest. The lock is held for a scan of the allowed
//! upstreams and nothing else; never across I/O.
//!
//! A count is taken by [`ConnTable::acquire`] and released when the returned [`ConnGuard`] drops,
//! on every path: normal end, error, or a panic unwinding the connection's thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Index of an upstream in the config's upstream list (and in this table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpstreamId(pub usize);

#[derive(Debug, Clone, Copy)]
struct Slot {
    active: u64,
    weight: u32,
    up: bool,
    /// When this slot was last chosen (a tick of `Inner::picks`); ties go to the oldest, so
    /// they rotate whatever mix of clients and allowed sets the choices come from.
    last_pick: u64,
    /// Ramp time after coming back UP (zero: none).
    slow_start: Duration,
    /// When the slot last came back UP, while its ramp is running.
    up_since: Option<Instant>,
}

/// Weight scale: effective weights are in thousandths, so a ramp can start at a tenth of a
/// weight of 1 without fractions.
const SCALE: u64 = 1000;

impl Slot {
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
}

#[derive(Debug)]
struct Inner {
    slots: Vec<Slot>,
    /// Choices made so far: the clock of `Slot::last_pick`.
    picks: u64,
}

/// Active connection counts and health of every upstream.
#[derive(Debug)]
pub struct ConnTable {
    inner: Mutex<Inner>,
}

/// A count held on one upstream; dropping it releases the count.
#[derive(Debug)]
pub struct ConnGuard {
    table: Arc<ConnTable>,
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
        let slot = &mut inner.slots[self.id.0];
        // A guard is only made by acquire, which incremented this very slot, and the slot list
        // never shrinks, so the count is at least one here.
        slot.active = slot.active.saturating_sub(1);
    }
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

impl ConnTable {
    /// A table for upstreams with the given weights (ids are the indices), all UP, no
    /// connections. A zero weight is treated as 1.
    pub fn new(weights: &[u32]) -> Arc<ConnTable> {
        let slots = weights
            .iter()
            .map(|&w| Slot {
                active: 0,
                weight: w.max(1),
                up: true,
                last_pick: 0,
                slow_start: Duration::ZERO,
                up_since: None,
            })
            .collect();
        Arc::new(ConnTable {
            inner: Mutex::new(Inner { slots, picks: 0 }),
        })
    }

    /// Picks the UP upstream among `allowed`, minus `exclude`, with the lowest active/weight and
    /// takes a count on it. Ties go to the tied upstream chosen least recently, so sequential
    /// short connections spread over all tied upstreams. `None` when no candidate is UP.
    pub fn acquire(
        self: &Arc<Self>,
        allowed: &[UpstreamId],
        exclude: &[UpstreamId],
    ) -> Option<ConnGuard> {
        let now = Instant::now();
        let mut inner = self.inner.lock();
        let mut best: Option<Candidate> = None;
        for &id in allowed {
            let Some(slot) = inner.slots.get_mut(id.0) else {
                continue;
            };
            if !slot.up || exclude.contains(&id) {
                continue;
            }
            let c = Candidate {
                id,
                active: slot.active,
                weight: slot.effective_weight(now),
                last_pick: slot.last_pick,
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
        let slot = &mut inner.slots[id.0];
        slot.active += 1;
        slot.last_pick = tick;
        Some(ConnGuard {
            table: Arc::clone(self),
            id,
        })
    }

    /// Marks an upstream UP or DOWN; returns whether that changed its state. Coming back UP
    /// starts its slow-start ramp, if it has one.
    pub fn set_up(&self, id: UpstreamId, up: bool) -> bool {
        let mut inner = self.inner.lock();
        match inner.slots.get_mut(id.0) {
            Some(slot) if slot.up != up => {
                slot.up = up;
                slot.up_since = (up && !slot.slow_start.is_zero()).then(Instant::now);
                true
            }
            _ => false,
        }
    }

    /// Sets the time over which an upstream's weight ramps up after it comes back UP.
    pub fn set_slow_start(&self, id: UpstreamId, ramp: Duration) {
        if let Some(slot) = self.inner.lock().slots.get_mut(id.0) {
            slot.slow_start = ramp;
        }
    }

    /// Adds an upstream (UP, no connections) and returns its id. Slots are never removed, so
    /// the ids held by connections in flight stay valid across config reloads.
    pub fn add(&self, weight: u32, slow_start: Duration) -> UpstreamId {
        let mut inner = self.inner.lock();
        inner.slots.push(Slot {
            active: 0,
            weight: weight.max(1),
            up: true,
            last_pick: 0,
            slow_start,
            up_since: None,
        });
        UpstreamId(inner.slots.len() - 1)
    }

    /// Changes an upstream's weight and slow-start ramp (a reload), keeping its counts.
    pub fn reconfigure(&self, id: UpstreamId, weight: u32, slow_start: Duration) {
        if let Some(slot) = self.inner.lock().slots.get_mut(id.0) {
            slot.weight = weight.max(1);
            slot.slow_start = slow_start;
        }
    }

    /// Whether an upstream is UP (eligible for new connections).
    pub fn is_up(&self, id: UpstreamId) -> bool {
        self.inner.lock().slots.get(id.0).is_some_and(|s| s.up)
    }

    /// Active connections on an upstream.
    pub fn active(&self, id: UpstreamId) -> u64 {
        self.inner.lock().slots.get(id.0).map_or(0, |s| s.active)
    }

    /// Active connections across all upstreams.
    pub fn total_active(&self) -> u64 {
        self.inner.lock().slots.iter().map(|s| s.active).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<UpstreamId> {
        (0..n).map(UpstreamId).collect()
    }

    #[test]
    fn it_picks_the_upstream_with_the_fewest_active_connections() {
        let t = ConnTable::new(&[1, 1, 1]);
        let all = ids(3);
        let _a = t.acquire(&[UpstreamId(0)], &[]).unwrap();
        let _b = t.acquire(&[UpstreamId(0)], &[]).unwrap();
        let _c = t.acquire(&[UpstreamId(2)], &[]).unwrap();
        assert_eq!(t.acquire(&all, &[]).unwrap().id(), UpstreamId(1));
    }

    #[test]
    fn ties_rotate_so_sequential_connections_spread_over_all_upstreams() {
        let t = ConnTable::new(&[1, 1, 1]);
        let all = ids(3);
        let picked: Vec<usize> = (0..6)
            .map(|_| t.acquire(&all, &[]).unwrap().id().0)
            .collect();
        for u in 0..3 {
            assert_eq!(picked.iter().filter(|&&p| p == u).count(), 2, "{picked:?}");
        }
    }

    #[test]
    fn interleaved_clients_with_different_allowed_sets_still_spread_the_picks_evenly() {
        let t = ConnTable::new(&[1, 1, 1]);
        let mut picks = [0; 3];
        for _ in 0..6 {
            picks[t.acquire(&ids(3), &[]).unwrap().id().0] += 1;
            picks[t.acquire(&[UpstreamId(2)], &[]).unwrap().id().0] += 1;
        }
        // Upstream 2 takes every pick of the narrow client; the broad client's picks go to the
        // upstreams picked less recently, which is as even as this mix allows.
        assert_eq!(picks, [3, 3, 6]);
    }

    #[test]
    fn held_connections_fill_every_upstream_evenly() {
        let t = ConnTable::new(&[1, 1, 1]);
        let all = ids(3);
        let held: Vec<ConnGuard> = (0..30).map(|_| t.acquire(&all, &[]).unwrap()).collect();
        for u in all {
            assert_eq!(t.active(u), 10);
        }
        drop(held);
        assert_eq!(t.total_active(), 0);
    }

    #[test]
    fn weights_scale_the_share_of_connections() {
        let t = ConnTable::new(&[3, 1]);
        let all = ids(2);
        let _held: Vec<ConnGuard> = (0..40).map(|_| t.acquire(&all, &[]).unwrap()).collect();
        assert_eq!(t.active(UpstreamId(0)), 30);
        assert_eq!(t.active(UpstreamId(1)), 10);
    }

    #[test]
    fn a_recovered_upstream_in_slow_start_takes_a_small_share_at_first() {
        let t = ConnTable::new(&[1, 1]);
        let all = ids(2);
        t.set_slow_start(UpstreamId(1), Duration::from_secs(3600));
        t.set_up(UpstreamId(1), false);
        let mut held: Vec<ConnGuard> = (0..20).map(|_| t.acquire(&all, &[]).unwrap()).collect();
        assert_eq!(t.active(UpstreamId(0)), 20);
        t.set_up(UpstreamId(1), true);
        held.extend((0..22).map(|_| t.acquire(&all, &[]).unwrap()));
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
        let t = ConnTable::new(&[1, 1]);
        let all = ids(2);
        t.set_up(UpstreamId(1), false);
        let mut held: Vec<ConnGuard> = (0..20).map(|_| t.acquire(&all, &[]).unwrap()).collect();
        t.set_up(UpstreamId(1), true);
        held.extend((0..20).map(|_| t.acquire(&all, &[]).unwrap()));
        assert_eq!(t.active(UpstreamId(1)), 20);
    }

    #[test]
    fn only_allowed_upstreams_are_chosen() {
        let t = ConnTable::new(&[1, 1, 1]);
        for _ in 0..10 {
            assert_eq!(
                t.acquire(&[UpstreamId(2)], &[]).unwrap().id(),
                UpstreamId(2)
            );
        }
    }

    #[test]
    fn down_and_excluded_upstreams_are_skipped() {
        let t = ConnTable::new(&[1, 1, 1]);
        let all = ids(3);
        assert!(t.set_up(UpstreamId(0), false));
        assert!(!t.set_up(UpstreamId(0), false), "no change the second time");
        for _ in 0..10 {
            assert_eq!(
                t.acquire(&all, &[UpstreamId(1)]).unwrap().id(),
                UpstreamId(2)
            );
        }
        t.set_up(UpstreamId(2), false);
        assert!(t.acquire(&all, &[UpstreamId(1)]).is_none());
    }

    #[test]
    fn nothing_allowed_means_nothing_chosen() {
        let t = ConnTable::new(&[1]);
        assert!(t.acquire(&[], &[]).is_none());
        assert!(
            t.acquire(&[UpstreamId(7)], &[]).is_none(),
            "an id outside the table"
        );
    }

    #[test]
    fn a_panicking_thread_still_releases_its_count() {
        let t = ConnTable::new(&[1]);
        let t2 = t.clone();
        let r = std::thread::spawn(move || {
            let _g = t2.acquire(&[UpstreamId(0)], &[]).unwrap();
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
        let t = ConnTable::new(&[1, 2, 3, 4]);
        let all = ids(4);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (t, all) = (t.clone(), all.clone());
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        let g = t.acquire(&all, &[]).unwrap();
                        let h = t.acquire(&all, &[g.id()]).unwrap();
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
