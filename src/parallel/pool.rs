//! Helper threads that live for the whole process, so that a kernel split among threads
//! ([`for_each_part`]) pays about a microsecond to start its helpers, not a thread
//! start each call.
//!
//! Measured at batch 1 (one training worker whose products use both cores), a scoped
//! thread per call started about 110 µs late (median), and a third of the time on the
//! caller's own core, where it ran only after the caller's part: the second core
//! barely helped. Helpers here live for the process and spin for [`SPIN`] after each
//! part before they sleep, so the next call finds them running (where they run is the
//! scheduler's choice); and parts are claimed, not assigned: the caller takes every
//! part no helper has taken by the time it is free, so a late helper never delays a call
//! beyond running its parts in turn.

use std::any::Any;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a helper keeps looking for work after its last part before it sleeps: a
/// kernel's parts come between short single-threaded ops (at batch 1, tens of µs).
const SPIN: Duration = Duration::from_micros(200);

/// The most helper threads the pool starts (callers asking for more threads share them).
const MAX_HELPERS: usize = 63;

/// `f(part)` for each part in `0..parts`, on this thread and up to `threads - 1` of the
/// pool's helpers, each claiming the next part not yet taken. Returns when every part
/// is done; a panic in any part is resumed here, after all of them have finished.
pub fn for_each_part(parts: usize, threads: usize, f: impl Fn(usize) + Sync) {
    let helpers = threads.min(parts).saturating_sub(1).min(MAX_HELPERS);
    if helpers == 0 {
        return (0..parts).for_each(f);
    }
    let f: &(dyn Fn(usize) + Sync) = &f;
    // SAFETY: the job's closure is called only for claimed parts, and this function
    // returns (or unwinds) only once every claimed part has finished (`wait` below):
    // no helper calls it after `f` goes out of scope.
    let f: &'static (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(f) };
    let job = Arc::new(Job {
        f,
        parts,
        helpers,
        next: AtomicUsize::new(0),
        joined: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        panic: Mutex::new(None),
    });
    let pool = pool(helpers);
    pool.publish(&job);
    job.run_parts();
    pool.withdraw(&job);
    job.wait();
    let panic = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(payload) = panic {
        std::panic::resume_unwind(payload);
    }
}

/// One call of [`for_each_part`]: its parts, claimed in order by whoever is free.
struct Job {
    f: &'static (dyn Fn(usize) + Sync),
    parts: usize,
    /// Helpers that may join (the caller is the first thread).
    helpers: usize,
    /// The next part to claim (past `parts`: none left).
    next: AtomicUsize,
    /// Helpers that joined.
    joined: AtomicUsize,
    /// Parts finished (or panicked).
    done: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Job {
    /// Runs parts until none is left to claim.
    fn run_parts(&self) {
        loop {
            let part = self.next.fetch_add(1, Ordering::Relaxed);
            if part >= self.parts {
                return;
            }
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.f)(part)));
            if let Err(payload) = run {
                let mut slot = self.panic.lock().unwrap_or_else(|e| e.into_inner());
                slot.get_or_insert(payload);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }

    /// Waits for the parts other threads claimed: they are running, so it spins, and
    /// yields its core if they take long.
    fn wait(&self) {
        let start = Instant::now();
        while self.done.load(Ordering::Acquire) < self.parts {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// The helpers and the jobs open to them.
struct Pool {
    jobs: Mutex<Vec<Arc<Job>>>,
    /// Bumped on every job published: what spinning helpers watch.
    epoch: AtomicU64,
    /// Helpers asleep, and the condition they sleep on (the epoch moving).
    sleeping: Mutex<usize>,
    wake: Condvar,
    started: AtomicUsize,
    /// Serializes starting helpers.
    start_lock: Mutex<()>,
}

/// The process's pool, with at least `helpers` helper threads started.
fn pool(helpers: usize) -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    let pool = POOL.get_or_init(|| Pool {
        jobs: Mutex::new(Vec::new()),
        epoch: AtomicU64::new(0),
        sleeping: Mutex::new(0),
        wake: Condvar::new(),
        started: AtomicUsize::new(0),
        start_lock: Mutex::new(()),
    });
    if pool.started.load(Ordering::Acquire) < helpers {
        let _guard = pool.start_lock.lock().unwrap_or_else(|e| e.into_inner());
        while pool.started.load(Ordering::Acquire) < helpers {
            let spawned = std::thread::Builder::new()
                .name("lora-graft-helper".into())
                .spawn(move || pool.serve());
            if spawned.is_err() {
                break; // no more threads: the callers run the parts themselves
            }
            pool.started.fetch_add(1, Ordering::Release);
        }
    }
    pool
}

impl Pool {
    /// Opens `job` to the helpers and wakes the sleeping ones.
    fn publish(&self, job: &Arc<Job>) {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(job.clone());
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let sleeping = self.sleeping.lock().unwrap_or_else(|e| e.into_inner());
        if *sleeping > 0 {
            self.wake.notify_all();
        }
    }

    /// Closes `job` to helpers that have not joined it.
    fn withdraw(&self, job: &Arc<Job>) {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|j| !Arc::ptr_eq(j, job));
    }

    /// An open job with parts left and room for one more helper, joined.
    fn join(&self) -> Option<Arc<Job>> {
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.iter()
            .find(|job| {
                job.next.load(Ordering::Relaxed) < job.parts
                    && job.joined.fetch_add(1, Ordering::Relaxed) < job.helpers
            })
            .cloned()
    }

    /// A helper's life: run the parts of open jobs; when there are none, spin for
    /// [`SPIN`] watching for a new one, then sleep until one is published.
    fn serve(&self) {
        loop {
            let seen = self.epoch.load(Ordering::SeqCst);
            if let Some(job) = self.join() {
                job.run_parts();
                continue;
            }
            let idle = Instant::now();
            while self.epoch.load(Ordering::SeqCst) == seen && idle.elapsed() < SPIN {
                std::hint::spin_loop();
            }
            let mut sleeping = self.sleeping.lock().unwrap_or_else(|e| e.into_inner());
            *sleeping += 1;
            while self.epoch.load(Ordering::SeqCst) == seen {
                sleeping = self.wake.wait(sleeping).unwrap_or_else(|e| e.into_inner());
            }
            *sleeping -= 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once_whatever_the_threads() {
        for (parts, threads) in [(0, 4), (1, 4), (7, 1), (7, 2), (64, 3), (5, 70)] {
            let runs: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
            for_each_part(parts, threads, |p| {
                runs[p].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                runs.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                "{parts} parts on {threads} threads"
            );
        }
    }

    #[test]
    fn calls_from_many_threads_at_once_each_finish_their_own_parts() {
        std::thread::scope(|scope| {
            for t in 0..4 {
                scope.spawn(move || {
                    for round in 0..200 {
                        let sum = AtomicUsize::new(0);
                        for_each_part(16, 3, |p| {
                            sum.fetch_add(p + t + round, Ordering::Relaxed);
                        });
                        assert_eq!(sum.into_inner(), 120 + 16 * (t + round));
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_part_is_resumed_after_the_others_finish() {
        let finished = AtomicUsize::new(0);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for_each_part(8, 2, |p| {
                if p == 3 {
                    panic!("part 3 fails");
                }
                std::thread::sleep(Duration::from_millis(2));
                finished.fetch_add(1, Ordering::Relaxed);
            })
        }));
        assert!(caught.is_err());
        assert_eq!(finished.load(Ordering::Relaxed), 7);
        // The pool still serves calls afterwards.
        let sum = AtomicUsize::new(0);
        for_each_part(8, 2, |p| {
            sum.fetch_add(p, Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 28);
    }
}
