//! Connection rate limiting: one token bucket per key (a client identity after the handshake,
//! a source IP before it).
//!
//! A bucket holds up to `burst` tokens and refills at `rate` tokens per second; each new
//! connection takes one. The clock is injected ([`Clock`]) so tests step time by hand. Buckets
//! that have refilled completely carry no information (a new bucket would be identical), so they
//! are swept out periodically: the table holds only keys seen recently. The table also has a
//! hard bound: when it is full of busy keys, a new key is admitted without being tracked
//! (fail-open), so spoofed or countless sources cannot grow memory, nor lock legitimate new
//! sources out.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::RateLimit;

/// A monotonic clock, as time elapsed since some fixed start.
pub trait Clock: Send + Sync {
    /// Time elapsed since the clock's start; never decreases.
    fn now(&self) -> Duration;
}

/// The real monotonic clock.
#[derive(Debug)]
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Duration,
    limit: RateLimit,
}

impl Bucket {
    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.rate).min(f64::from(self.limit.burst));
        self.updated = now;
    }

    fn is_full(&self) -> bool {
        self.tokens >= f64::from(self.limit.burst)
    }
}

/// How often (in admitted or refused checks) the table is swept of full buckets.
const SWEEP_EVERY: u64 = 1024;

struct State<K> {
    buckets: HashMap<K, Bucket>,
    checks: u64,
}

/// Default bound on the number of keys tracked at once.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// Token buckets keyed by client identity (or any other key, such as a source address).
pub struct RateLimiter<K = String> {
    clock: Box<dyn Clock>,
    max_keys: usize,
    /// Checks admitted without a bucket because the table was full.
    untracked: AtomicU64,
    state: Mutex<State<K>>,
}

impl<K> std::fmt::Debug for RateLimiter<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("clients", &self.state.lock().buckets.len())
            .finish()
    }
}

impl<K: Hash + Eq> Default for RateLimiter<K> {
    fn default() -> Self {
        RateLimiter::new(Box::<SystemClock>::default())
    }
}

impl<K: Hash + Eq> RateLimiter<K> {
    /// An empty limiter reading time from `clock`, tracking at most `DEFAULT_MAX_KEYS` keys.
    pub fn new(clock: Box<dyn Clock>) -> RateLimiter<K> {
        RateLimiter::with_max_keys(clock, DEFAULT_MAX_KEYS)
    }

    /// An empty limiter tracking at most `max_keys` keys at once.
    pub fn with_max_keys(clock: Box<dyn Clock>, max_keys: usize) -> RateLimiter<K> {
        RateLimiter {
            clock,
            max_keys: max_keys.max(1),
            untracked: AtomicU64::new(0),
            state: Mutex::new(State {
                buckets: HashMap::new(),
                checks: 0,
            }),
        }
    }

    /// Takes a token from `key`'s bucket, shaped by `limit`: `true` admits the connection,
    /// `false` refuses it. A first-seen key starts with a full bucket. If `limit` changed since
    /// the bucket was made (a reload), the bucket keeps its tokens, capped to the new burst.
    pub fn try_acquire<Q>(&self, key: &Q, limit: RateLimit) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let now = self.clock.now();
        let mut state = self.state.lock();
        state.checks += 1;
        if state.checks % SWEEP_EVERY == 0 {
            sweep(&mut state.buckets, now);
        }
        if !state.buckets.contains_key(key) && state.buckets.len() >= self.max_keys {
            sweep(&mut state.buckets, now);
            if state.buckets.len() >= self.max_keys {
                self.untracked.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        let bucket = match state.buckets.get_mut(key) {
            Some(b) => b,
            None => state.buckets.entry(key.to_owned()).or_insert(Bucket {
                tokens: f64::from(limit.burst),
                updated: now,
                limit,
            }),
        };
        bucket.limit = limit;
        bucket.refill(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// The tokens `key`'s bucket holds now under `limit`, without taking one: what the next
    /// [`RateLimiter::try_acquire`] would find. A key without a bucket has a full one
    /// (`limit.burst`), as a first-seen key does.
    pub fn peek<Q>(&self, key: &Q, limit: RateLimit) -> f64
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let now = self.clock.now();
        let found = self.state.lock().buckets.get(key).copied();
        let Some(mut bucket) = found else {
            return f64::from(limit.burst);
        };
        bucket.limit = limit;
        bucket.refill(now);
        bucket.tokens
    }

    /// Checks admitted untracked because the table was full (fail-open), so far.
    pub fn untracked_admissions(&self) -> u64 {
        self.untracked.load(Ordering::Relaxed)
    }

    /// How many keys currently have a bucket (for tests and metrics).
    pub fn tracked_clients(&self) -> usize {
        self.state.lock().buckets.len()
    }
}

/// Drops the buckets that have refilled completely: a new bucket would be the same.
fn sweep<K>(buckets: &mut HashMap<K, Bucket>, now: Duration) {
    buckets.retain(|_, b| {
        b.refill(now);
        !b.is_full()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A clock that moves only when the test says so.
    #[derive(Clone, Default)]
    struct ManualClock(Arc<AtomicU64>);

    impl ManualClock {
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    #[test]
    fn a_full_table_admits_new_keys_without_tracking_them() {
        let clock = ManualClock::default();
        let l: RateLimiter<u32> = RateLimiter::with_max_keys(Box::new(clock.clone()), 2);
        let one = RateLimit {
            rate: 0.001,
            burst: 1,
        };
        assert!(l.try_acquire(&1, one));
        assert!(l.try_acquire(&2, one));
        assert!(
            (0..10).all(|_| l.try_acquire(&3, one)),
            "untracked: fail-open"
        );
        assert_eq!(l.tracked_clients(), 2);
        assert_eq!(l.untracked_admissions(), 10, "each fail-open is counted");
        assert!(!l.try_acquire(&1, one), "tracked keys stay limited");
    }

    fn limiter() -> (RateLimiter, ManualClock) {
        let clock = ManualClock::default();
        (RateLimiter::new(Box::new(clock.clone())), clock)
    }

    const LIMIT: RateLimit = RateLimit {
        rate: 2.0,
        burst: 3,
    };

    #[test]
    fn peeking_shows_the_tokens_left_without_taking_one() {
        let (l, clock) = limiter();
        assert_eq!(l.peek("c", LIMIT), 3.0, "no bucket yet: a full one");
        assert!(l.try_acquire("c", LIMIT));
        assert!(l.try_acquire("c", LIMIT));
        assert_eq!(l.peek("c", LIMIT), 1.0);
        assert_eq!(l.peek("c", LIMIT), 1.0, "a peek takes nothing");
        clock.advance(Duration::from_millis(250));
        assert_eq!(l.peek("c", LIMIT), 1.5, "refilled at 2/s");
        clock.advance(Duration::from_secs(60));
        assert_eq!(l.peek("c", LIMIT), 3.0, "never above the burst");
        let smaller = RateLimit {
            rate: 2.0,
            burst: 2,
        };
        assert_eq!(l.peek("c", smaller), 2.0, "capped to a reloaded burst");
        assert!(l.try_acquire("c", LIMIT));
        assert!(l.try_acquire("c", LIMIT));
        assert!(l.try_acquire("c", LIMIT));
        assert!(!l.try_acquire("c", LIMIT), "peeks took no token");
    }

    #[test]
    fn a_new_client_gets_its_whole_burst_then_is_refused() {
        let (l, _) = limiter();
        assert!((0..3).all(|_| l.try_acquire("c", LIMIT)));
        assert!(!l.try_acquire("c", LIMIT));
    }

    #[test]
    fn tokens_come_back_at_the_sustained_rate() {
        let (l, clock) = limiter();
        for _ in 0..3 {
            l.try_acquire("c", LIMIT);
        }
        clock.advance(Duration::from_millis(499));
        assert!(!l.try_acquire("c", LIMIT), "2/s means one token per 500ms");
        clock.advance(Duration::from_millis(1));
        assert!(l.try_acquire("c", LIMIT));
        assert!(!l.try_acquire("c", LIMIT));
    }

    #[test]
    fn a_long_quiet_period_refills_only_up_to_the_burst() {
        let (l, clock) = limiter();
        l.try_acquire("c", LIMIT);
        clock.advance(Duration::from_secs(3600));
        assert_eq!((0..10).filter(|_| l.try_acquire("c", LIMIT)).count(), 3);
    }

    #[test]
    fn clients_do_not_share_buckets() {
        let (l, _) = limiter();
        for _ in 0..3 {
            l.try_acquire("a", LIMIT);
        }
        assert!(!l.try_acquire("a", LIMIT));
        assert!(l.try_acquire("b", LIMIT));
    }

    #[test]
    fn a_per_client_override_applies_to_that_client_only() {
        let (l, _) = limiter();
        let generous = RateLimit {
            rate: 100.0,
            burst: 100,
        };
        assert_eq!(
            (0..200).filter(|_| l.try_acquire("vip", generous)).count(),
            100
        );
        assert_eq!((0..200).filter(|_| l.try_acquire("c", LIMIT)).count(), 3);
    }

    #[test]
    fn a_fractional_rate_works() {
        let (l, clock) = limiter();
        let slow = RateLimit {
            rate: 0.5,
            burst: 1,
        };
        assert!(l.try_acquire("c", slow));
        clock.advance(Duration::from_millis(1999));
        assert!(!l.try_acquire("c", slow));
        clock.advance(Duration::from_millis(1));
        assert!(l.try_acquire("c", slow));
    }

    #[test]
    fn full_buckets_are_swept_so_the_table_does_not_grow_forever() {
        let (l, clock) = limiter();
        for i in 0..(SWEEP_EVERY - 1) {
            l.try_acquire(&format!("client-{i}"), LIMIT);
        }
        assert_eq!(l.tracked_clients(), (SWEEP_EVERY - 1) as usize);
        clock.advance(Duration::from_secs(10));
        l.try_acquire("last", LIMIT);
        assert_eq!(l.tracked_clients(), 1, "only the client just seen is left");
    }

    #[test]
    fn full_buckets_are_kept_between_sweeps() {
        let (l, clock) = limiter();
        l.try_acquire("a", LIMIT);
        clock.advance(Duration::from_secs(10));
        assert_eq!(l.peek("a", LIMIT), 3.0, "a's bucket is full again");
        l.try_acquire("b", LIMIT);
        assert_eq!(
            l.tracked_clients(),
            2,
            "no sweep before check {SWEEP_EVERY}"
        );
    }

    #[test]
    fn the_system_clock_counts_from_its_creation() {
        let clock = SystemClock::default();
        std::thread::sleep(Duration::from_millis(5));
        assert!(clock.now() >= Duration::from_millis(5));
    }

    #[test]
    fn debug_shows_how_many_clients_are_tracked() {
        let (l, _) = limiter();
        l.try_acquire("a", LIMIT);
        assert_eq!(format!("{l:?}"), "RateLimiter { clients: 1 }");
    }

    #[test]
    fn a_refused_client_is_not_forgotten_by_a_sweep() {
        let (l, _) = limiter();
        for _ in 0..3 {
            l.try_acquire("c", LIMIT);
        }
        for i in 0..SWEEP_EVERY {
            l.try_acquire(&format!("other-{i}"), LIMIT);
        }
        assert!(
            !l.try_acquire("c", LIMIT),
            "an empty bucket survives the sweep"
        );
    }

    #[test]
    fn many_threads_never_get_more_than_the_burst() {
        let (l, _) = limiter();
        let l = Arc::new(l);
        let limit = RateLimit {
            rate: 0.001,
            burst: 500,
        };
        let admitted = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (l, admitted) = (l.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        if l.try_acquire("c", limit) {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(admitted.load(Ordering::SeqCst), 500);
    }
}
