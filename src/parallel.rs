//! Work on every core under a memory budget: per-module weight reads, SVDs and merges
//! run in parallel, read-only, before a pass edits the graph in order; kernels split
//! their work among a pool of helper threads ([`for_each_part`]).

mod pool;

pub use pool::for_each_part;

/// How much memory layers being initialised at once may hold (see
/// [`crate::passes::variants::Variant::working_set`]); a layer needing more runs alone.
pub const PARALLEL_MEMORY_BUDGET: usize = 512 << 20;

/// `f` on every item, on every core (items are handed out in order), with at most
/// `budget` bytes of `cost` in flight; the results in item order. Reading weights and
/// SVDs are independent per module, so a large model is grafted in parallel while the
/// graph itself is only edited afterwards, in order.
pub fn par_map<T: Sync, R: Send>(
    items: &[T],
    cost: impl Fn(&T) -> usize + Sync,
    budget: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    par_map_then(items, cost, budget, f, |_, r| r)
}

/// [`par_map`], with `then` run on each result on the calling thread, in item order, as
/// soon as the results before it are in (writing them out while later items are still
/// computed); an item's `cost` stays in flight until `then` is done with it.
pub fn par_map_then<T: Sync, R: Send, S>(
    items: &[T],
    cost: impl Fn(&T) -> usize + Sync,
    budget: usize,
    f: impl Fn(&T) -> R + Sync,
    mut then: impl FnMut(usize, R) -> S,
) -> Vec<S> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Condvar, Mutex};
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(items.len());
    if threads <= 1 {
        return items
            .iter()
            .enumerate()
            .map(|(i, t)| then(i, f(t)))
            .collect();
    }
    let next = AtomicUsize::new(0);
    // Items `then` is done with: the first of the others (the head) may always start,
    // so that items waiting in order for it never hold it back from the budget.
    let done = AtomicUsize::new(0);
    let in_flight = Mutex::new(0usize);
    let freed = Condvar::new();
    // Set when a worker panicked: the others stop taking items (and waiting for bytes
    // that its unfinished item would never give back).
    let failed = AtomicBool::new(false);
    let release = |c: usize| {
        let mut used = in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *used -= c;
        done.fetch_add(1, Ordering::Relaxed);
        drop(used);
        freed.notify_all();
    };
    /// Marks the run failed if its worker unwinds.
    struct Guard<'a>(&'a AtomicBool, &'a Condvar);
    impl Drop for Guard<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.store(true, Ordering::Relaxed);
                self.1.notify_all();
            }
        }
    }
    let (send, receive) = mpsc::channel::<(usize, R, usize)>();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let send = send.clone();
                let (next, done, in_flight, freed, failed, f, cost) =
                    (&next, &done, &in_flight, &freed, &failed, &f, &cost);
                scope.spawn(move || {
                    let _guard = Guard(failed, freed);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        let c = cost(item);
                        let mut used = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                        while *used > 0
                            && *used + c > budget
                            && done.load(Ordering::Relaxed) != i
                            && !failed.load(Ordering::Relaxed)
                        {
                            used = freed.wait(used).unwrap_or_else(|e| e.into_inner());
                        }
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        *used += c;
                        drop(used);
                        if send.send((i, f(item), c)).is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        drop(send);
        let _guard = Guard(&failed, &freed);
        // In order: results that arrive early wait here until those before them are in.
        let mut early = std::collections::BTreeMap::new();
        let mut out = Vec::with_capacity(items.len());
        for (i, r, c) in receive.iter() {
            early.insert(i, (r, c));
            while let Some((r, c)) = early.remove(&out.len()) {
                out.push(then(out.len(), r));
                release(c);
            }
        }
        for w in workers {
            w.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
        assert_eq!(out.len(), items.len(), "every item mapped");
        out
    })
}

thread_local! {
    /// Threads the products run on this thread may use (see [`set_product_threads`]).
    static PRODUCT_THREADS: std::cell::Cell<usize> = const { std::cell::Cell::new(1) };
}

/// Lets the matrix products run on this thread use `n` threads: a data-parallel worker
/// gets its share of the cores (`--threads` over the workers), so a batch too small to
/// split (batch 1) still runs its products on every core.
pub fn set_product_threads(n: usize) {
    PRODUCT_THREADS.with(|t| t.set(n.max(1)));
}

/// The threads this thread's products may use (1 unless [`set_product_threads`] said).
pub fn product_threads() -> usize {
    PRODUCT_THREADS.with(|t| t.get())
}

/// `f(p, range)` for each part `p` of `parts` contiguous, near-equal ranges covering
/// `0..n`, on this thread and the pool's helpers ([`for_each_part`]); `parts` is
/// capped at `n`.
pub fn split_range(n: usize, parts: usize, f: impl Fn(usize, std::ops::Range<usize>) + Sync) {
    let parts = parts.clamp(1, n.max(1));
    for_each_part(parts, parts, |p| f(p, p * n / parts..(p + 1) * n / parts));
}

/// `f(i, item)` for each of `items`, on up to `threads` threads (this one and the
/// pool's helpers): for handing out disjoint mutable chunks of an output.
pub fn for_each_item<T: Send>(items: Vec<T>, threads: usize, f: impl Fn(usize, T) + Sync) {
    let slots: Vec<std::sync::Mutex<Option<T>>> = items
        .into_iter()
        .map(|item| std::sync::Mutex::new(Some(item)))
        .collect();
    for_each_part(slots.len(), threads, |i| {
        let item = slots[i].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(item) = item {
            f(i, item);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Items of uneven cost and duration: `then` sees every result once, in item order,
    /// while the bytes in flight (computing, or computed and waiting for `then`) stay
    /// within the budget plus the head item's; an item over the budget alone still runs.
    #[test]
    fn then_runs_in_order_within_the_budget() {
        let costs: Vec<usize> = (0..40).map(|i| [30, 5, 60, 10, 120][i % 5]).collect();
        let budget = 100;
        let (in_flight, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let seen = Mutex::new(Vec::new());
        let out = par_map_then(
            &costs,
            |&c| c,
            budget,
            |&c| {
                let now = in_flight.fetch_add(c, Ordering::SeqCst) + c;
                peak.fetch_max(now, Ordering::SeqCst);
                // Later items often finish first: the short ones.
                std::thread::sleep(std::time::Duration::from_micros(20 * c as u64));
                c
            },
            |i, c| {
                seen.lock().unwrap().push(i);
                in_flight.fetch_sub(c, Ordering::SeqCst);
                2 * c
            },
        );
        assert_eq!(out, costs.iter().map(|c| 2 * c).collect::<Vec<_>>());
        assert_eq!(*seen.lock().unwrap(), (0..costs.len()).collect::<Vec<_>>());
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= budget + 120, "{peak} bytes in flight");
    }

    /// A panicking item is re-raised on the caller, and the other workers, waiting for
    /// bytes it never gives back, stop instead of hanging.
    #[test]
    fn a_panicking_item_does_not_hang_the_others() {
        let items: Vec<usize> = (0..16).collect();
        let result = std::panic::catch_unwind(|| {
            par_map_then(
                &items,
                |_| 60,
                100,
                |&i| {
                    assert!(i != 3, "item 3 fails");
                    i
                },
                |_, r| r,
            )
        });
        assert!(result.is_err());
    }
}
