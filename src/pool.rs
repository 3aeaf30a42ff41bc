//! A pool of parked OS threads, reused across connections.
//!
//! lclb keeps its shape (a thread runs each connection's handshake and then one direction of
//! its copy; a second thread runs the other direction) but does not pay for creating and
//! destroying two threads per connection: a finished job's thread parks on a channel and takes
//! the next job. A job arriving when no thread is parked gets a new thread; a thread parked for
//! `keep_alive` with nothing to do ends, so an idle balancer holds few threads.
//!
//! Accounting: `idle` counts parked threads minus jobs already promised to them. A submitter
//! that finds `idle > 0` decrements it and sends; a parked thread that times out leaves only if
//! it can decrement `idle` itself. So every job sent has a thread that will take it.

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
        let mut idle = self.inner.idle.load(Ordering::SeqCst);
        while idle > 0 {
            match self.inner.idle.compare_exchange(
                idle,
                idle - 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => {
                    // The receiver lives in `inner`, which we hold: the send cannot fail.
                    let _ = self.inner.jobs.send(job);
                    return Ok(());
                }
                Err(now) => idle = now,
            }
        }
        let inner = self.inner.clone();
        self.inner.threads.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new()
            .name(self.inner.name.clone())
            .stack_size(self.inner.stack_size)
            .spawn(move || work(&inner, job));
        match spawned {
            Ok(_) => Ok(()),
            Err(e) => {
                self.inner.threads.fetch_sub(1, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    /// Threads alive in the pool, busy or parked.
    pub fn threads(&self) -> usize {
        self.inner.threads.load(Ordering::SeqCst)
    }
}

fn run(inner: &Inner, job: Job) {
    if catch_unwind(AssertUnwindSafe(job)).is_err() {
        // The job's own guards have released what it held while unwinding.
        log::error!("a {} thread's job panicked; the thread goes on", inner.name);
    }
}

fn work(inner: &Arc<Inner>, first: Job) {
    run(inner, first);
    'parked: loop {
        inner.idle.fetch_add(1, Ordering::SeqCst);
        match inner.queue.recv_timeout(inner.keep_alive) {
            Ok(job) => run(inner, job),
            Err(RecvTimeoutError::Timeout) => {
                let mut idle = inner.idle.load(Ordering::SeqCst);
                loop {
                    if idle == 0 {
                        // A job was promised against our count: take it.
                        match inner.queue.recv() {
                            Ok(job) => {
                                run(inner, job);
                                continue 'parked;
                            }
                            Err(_) => break 'parked,
                        }
                    }
                    match inner.idle.compare_exchange(
                        idle,
                        idle - 1,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    ) {
                        Ok(_) => break 'parked,
                        Err(now) => idle = now,
                    }
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
    use std::sync::atomic::AtomicU64;
    use std::time::Instant;

    fn wait_for(what: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

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
}
