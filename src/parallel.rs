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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex};
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let in_flight = Mutex::new(0usize);
    let freed = Condvar::new();
    /// Gives an item's bytes back when it is done (or panicked).
    struct Release<'a>(&'a Mutex<usize>, &'a Condvar, usize);
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            *self.0.lock().unwrap_or_else(|e| e.into_inner()) -= self.2;
            self.1.notify_all();
        }
    }
    let done: Vec<Vec<(usize, R)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break out };
                        let c = cost(item);
                        let mut used = in_flight.lock().unwrap_or_else(|e| e.into_inner());
                        while *used > 0 && *used + c > budget {
                            used = freed.wait(used).unwrap_or_else(|e| e.into_inner());
                        }
                        *used += c;
                        drop(used);
                        let _release = Release(&in_flight, &freed, c);
                        out.push((i, f(item)));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut slots: Vec<Option<R>> = std::iter::repeat_with(|| None).take(items.len()).collect();
    for (i, r) in done.into_iter().flatten() {
        slots[i] = Some(r);
    }
    slots
        .into_iter()
        .map(|r| r.expect("every item mapped"))
        .collect()
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
