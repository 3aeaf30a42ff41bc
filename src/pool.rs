//! A pool of parked OS threads, reused across connections.
//!
//! lclb keeps its shape (a thread runs each connection's handshake and routing; two more copy
//! its two directions) but does not pay for creating and destroying threads per connection: a finished job's thread parks on a channel and takes
//! the next job. A job arriving when no thread is parked gets a new thread; a thread parked for
//! `keep_alive` with nothing to do ends, so an idle balancer holds few threads.
//!
//! Accounting: `idle` counts parked threads minus jobs already promised to them. A submitter
//! that finds `idle > 0` decrements it and sends; a parked thread that times out leaves only if
//! it can decrement `idle` itself. So every job sent has a thread that will take it.
//!
//! A [`Reservation`] makes the same promise ahead of time: it claims parked threads (by
//! decrementing `idle`) and starts new ones that wait for their first job without counting as
//! idle, so the jobs it later runs cannot fail for want of a thread. A reservation dropped with
//! threads unused gives them back to `idle`. A caller that needs several threads for one unit
//! of work (a connection's two copy directions) reserves them before committing to it.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Inner {
    name: String,
    stack_size: usize,
    keep_alive: Duration,
    idle: AtomicUsize,
    threads: AtomicUsize,
    jobs: Sender<Job>,
    queue: Receiver<Job>,
}

impl Inner {
    /// Promises the next job to a parked thread, if one is not promised yet.
    fn claim_parked(&self) -> bool {
        let mut idle = self.idle.load(Ordering::SeqCst);
        while idle > 0 {
            match self
                .idle
                .compare_exchange(idle, idle - 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(now) => idle = now,
            }
        }
        false
    }

    /// Hands a job to the threads waiting for it; only after a promise was made for it.
    fn send(&self, job: Job) {
        // The receiver lives in `self`, which the caller holds: the send cannot fail.
        let _ = self.jobs.send(job);
    }

    /// Starts a thread that runs `first`, or, with `None`, waits for a job promised to it.
    fn spawn(self: &Arc<Self>, first: Option<Job>) -> io::Result<()> {
        let inner = Arc::clone(self);
        self.threads.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name(self.name.clone())
            .stack_size(self.stack_size)
            .spawn(move || work(&inner, first));
        match spawned {
            Ok(_) => Ok(()),
            Err(e) => {
                self.threads.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }
}

/// A pool of threads of one stack size and name.
#[derive(Clone)]
pub struct ThreadPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("name", &self.inner.name)
            .field("threads", &self.threads())
            .field("idle", &self.inner.idle.load(Ordering::Relaxed))
            .finish()
    }
}

impl ThreadPool {
    /// An empty pool whose threads are called `name`, have `stack_size` bytes of stack, and
    /// end after `keep_alive` without work.
    pub fn new(name: &str, stack_size: usize, keep_alive: Duration) -> ThreadPool {
        let (jobs, queue) = crossbeam_channel::unbounded();
        ThreadPool {
            inner: Arc::new(Inner {
                name: name.to_string(),
                stack_size,
                keep_alive,
                idle: AtomicUsize::new(0),
                threads: AtomicUsize::new(0),
                jobs,
                queue,
            }),
        }
    }

    /// Runs `job` on a parked thread, or on a new one if none is parked. Fails only if a new
    /// thread was needed and could not be created (the job is dropped, unrun).
    pub fn execute(&self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        if self.inner.claim_parked() {
            self.inner.send(job);
            return Ok(());
        }
        self.inner.spawn(Some(job))
    }

    /// Secures `n` threads for jobs to come: parked ones first, then new ones, which wait for
    /// their first job. Fails if a new thread could not be created; the threads secured until
    /// then go back to the pool.
    pub fn reserve(&self, n: usize) -> io::Result<Reservation> {
        let mut reservation = Reservation {
            inner: Arc::clone(&self.inner),
            left: 0,
        };
        while reservation.left < n && self.inner.claim_parked() {
            reservation.left += 1;
        }
        while reservation.left < n {
            // On failure, dropping `reservation` returns what it holds.
            self.inner.spawn(None)?;
            reservation.left += 1;
        }
        Ok(reservation)
    }

    /// Threads alive in the pool, busy or parked.
    pub fn threads(&self) -> usize {
        self.inner.threads.load(Ordering::SeqCst)
    }
}

/// Threads of a [`ThreadPool`] set aside for jobs to come ([`ThreadPool::reserve`]). Dropping
/// it parks the threads it did not use, for anyone's next job.
pub struct Reservation {
    inner: Arc<Inner>,
    left: usize,
}

impl Reservation {
    /// Runs `job` on one of the reserved threads; this cannot fail while any is left. Past
    /// them, it behaves as [`ThreadPool::execute`] and fails if no thread can be had (the job
    /// is dropped, unrun).
    pub fn run(&mut self, job: impl FnOnce() + Send + 'static) -> io::Result<()> {
        let job: Job = Box::new(job);
        if self.left > 0 {
            self.left -= 1;
            self.inner.send(job);
            return Ok(());
        }
        if self.inner.claim_parked() {
            self.inner.send(job);
            return Ok(());
        }
        self.inner.spawn(Some(job))
    }

    /// Reserved threads not used yet.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.left
    }

    /// Whether every reserved thread has been used.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.left == 0
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // The threads were promised jobs that will never come: they are simply parked again.
        self.inner.idle.fetch_add(self.left, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("pool", &self.inner.name)
            .field("left", &self.left)
            .finish()
    }
}

fn run(inner: &Inner, job: Job) {
    if catch_unwind(AssertUnwindSafe(job)).is_err() {
        // The job's own guards have released what it held while unwinding.
        log::error!("a {} thread's job panicked; the thread goes on", inner.name);
    }
}

/// A pool thread's life: its first job if it was given one (a reserved thread waits for its
/// first, already promised, so it does not count itself idle), then parked between jobs.
fn work(inner: &Arc<Inner>, first: Option<Job>) {
    if let Some(job) = first {
        run(inner, job);
        inner.idle.fetch_add(1, Ordering::SeqCst);
    }
    loop {
        match inner.queue.recv_timeout(inner.keep_alive) {
            Ok(job) => {
                run(inner, job);
                inner.idle.fetch_add(1, Ordering::SeqCst);
            }
            Err(RecvTimeoutError::Timeout) => {
                // Leave only by taking our own unit of `idle`. None left means every waiting
                // thread is promised a job (sent, or held by a reservation): wait again; a
                // reservation dropped meanwhile gives its units back, and then we can leave.
                if inner.claim_parked() {
                    break;
                }
            }
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    inner.threads.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::wait_for;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_job_runs_and_threads_are_reused() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_secs(10));
        let done = Arc::new(AtomicU64::new(0));
        for i in 0..200 {
            let d = done.clone();
            pool.execute(move || {
                d.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
            // Sequential jobs: each finds the previous job's thread parked, or nearly.
            assert!(wait_for(|| done.load(Ordering::SeqCst) > i));
        }
        assert!(wait_for(|| done.load(Ordering::SeqCst) == 200));
        assert!(
            pool.threads() < 20,
            "{} threads for 200 sequential jobs",
            pool.threads()
        );
    }

    #[test]
    fn concurrent_jobs_get_threads_of_their_own() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_secs(10));
        let barrier = Arc::new(std::sync::Barrier::new(9));
        for _ in 0..8 {
            let b = barrier.clone();
            pool.execute(move || {
                b.wait();
            })
            .unwrap();
        }
        // Blocks forever (test timeout) unless all eight run at once.
        barrier.wait();
    }

    #[test]
    fn parked_threads_end_after_keep_alive_and_the_pool_still_works() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_millis(20));
        let done = Arc::new(AtomicU64::new(0));
        for _ in 0..4 {
            let d = done.clone();
            pool.execute(move || {
                d.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        }
        assert!(wait_for(|| pool.threads() == 0));
        let d = done.clone();
        pool.execute(move || {
            d.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        assert!(wait_for(|| done.load(Ordering::SeqCst) == 5));
    }

    #[test]
    fn a_panicking_job_does_not_lose_the_thread_or_later_jobs() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_secs(10));
        pool.execute(|| panic!("job fails")).unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let d = done.clone();
        pool.execute(move || {
            d.fetch_add(1, Ordering::SeqCst);
        })
        .unwrap();
        assert!(wait_for(|| done.load(Ordering::SeqCst) == 1));
    }

    #[test]
    fn submitters_racing_parked_threads_never_strand_a_job() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_millis(1));
        let done = Arc::new(AtomicU64::new(0));
        let submitters: Vec<_> = (0..4)
            .map(|_| {
                let (pool, done) = (pool.clone(), done.clone());
                std::thread::spawn(move || {
                    for i in 0..500 {
                        let d = done.clone();
                        pool.execute(move || {
                            d.fetch_add(1, Ordering::SeqCst);
                        })
                        .unwrap();
                        if i % 50 == 0 {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                })
            })
            .collect();
        for s in submitters {
            s.join().unwrap();
        }
        assert!(wait_for(|| done.load(Ordering::SeqCst) == 2000));
    }

    fn idle(pool: &ThreadPool) -> usize {
        pool.inner.idle.load(Ordering::SeqCst)
    }

    #[test]
    fn a_reservation_runs_its_jobs_on_the_threads_it_secured() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_secs(10));
        let mut reserved = pool.reserve(4).unwrap();
        assert_eq!((pool.threads(), idle(&pool), reserved.len()), (4, 0, 4));
        let barrier = Arc::new(std::sync::Barrier::new(5));
        for _ in 0..4 {
            let b = barrier.clone();
            reserved
                .run(move || {
                    b.wait();
                })
                .unwrap();
        }
        assert!(reserved.is_empty());
        // Blocks forever (test timeout) unless all four run at once.
        barrier.wait();
        assert_eq!(pool.threads(), 4, "no thread beyond the reserved ones");
    }

    #[test]
    fn a_reservation_takes_parked_threads_before_starting_new_ones() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_secs(10));
        let reserved = pool.reserve(2).unwrap();
        drop(reserved);
        assert_eq!((pool.threads(), idle(&pool)), (2, 2));
        let reserved = pool.reserve(3).unwrap();
        assert_eq!(pool.threads(), 3, "two parked, one new");
        assert_eq!(idle(&pool), 0);
        drop(reserved);
    }

    #[test]
    fn an_unused_reservation_dropped_parks_its_threads_for_anyone() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_secs(10));
        drop(pool.reserve(3).unwrap());
        assert_eq!((pool.threads(), idle(&pool)), (3, 3));
        let barrier = Arc::new(std::sync::Barrier::new(4));
        for _ in 0..3 {
            let b = barrier.clone();
            pool.execute(move || {
                b.wait();
            })
            .unwrap();
        }
        barrier.wait();
        assert_eq!(pool.threads(), 3, "the jobs went to the parked threads");
    }

    #[test]
    fn a_partly_used_reservation_gives_back_only_what_is_left() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_secs(10));
        let mut reserved = pool.reserve(3).unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let d = done.clone();
        reserved
            .run(move || {
                d.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        drop(reserved);
        assert!(wait_for(|| done.load(Ordering::SeqCst) == 1));
        // Two given back, and the thread that ran the job parks again: all three idle.
        assert!(wait_for(|| idle(&pool) == 3));
        assert_eq!(pool.threads(), 3);
    }

    #[test]
    fn threads_of_a_dropped_reservation_still_end_after_keep_alive() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_millis(20));
        let reserved = pool.reserve(3).unwrap();
        // Waiting for jobs promised to them, they may not leave yet.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(pool.threads(), 3);
        drop(reserved);
        assert!(wait_for(|| pool.threads() == 0));
        assert_eq!(idle(&pool), 0, "each thread took its own unit with it");
    }

    #[test]
    fn past_its_threads_a_reservation_runs_jobs_as_execute_does() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_secs(10));
        let mut reserved = pool.reserve(0).unwrap();
        let done = Arc::new(AtomicU64::new(0));
        let d = done.clone();
        reserved
            .run(move || {
                d.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        assert!(wait_for(|| done.load(Ordering::SeqCst) == 1));
    }

    #[test]
    fn a_reservation_that_cannot_start_its_threads_fails_and_holds_nothing() {
        // A stack larger than the address space: no thread can be created.
        let pool = ThreadPool::new("test-pool", 1 << 50, Duration::from_secs(10));
        assert!(pool.reserve(2).is_err());
        assert_eq!((pool.threads(), idle(&pool)), (0, 0));
    }

    #[test]
    fn a_failed_reservation_gives_back_the_parked_threads_it_had_claimed() {
        let pool = ThreadPool::new("test-pool", 64 * 1024, Duration::from_secs(10));
        drop(pool.reserve(1).unwrap());
        assert_eq!(idle(&pool), 1);
        // The same pool's queue and counts, with threads that cannot be created.
        let impossible = ThreadPool {
            inner: Arc::new(Inner {
                name: "test-pool".into(),
                stack_size: 1 << 50,
                keep_alive: Duration::from_secs(10),
                idle: AtomicUsize::new(idle(&pool)),
                threads: AtomicUsize::new(pool.threads()),
                jobs: pool.inner.jobs.clone(),
                queue: pool.inner.queue.clone(),
            }),
        };
        assert!(impossible.reserve(2).is_err());
        assert_eq!(
            idle(&impossible),
            1,
            "the claimed parked thread is parked again"
        );
    }
}
