//! The rayon pool the CPU kernels run on, made safe across `fork()`.
//!
//! A forked child (a DataLoader worker) inherits the parent's pool object but none of its
//! threads: handing work to it would wait forever. So the pool is tagged with the pid that
//! built it and rebuilt in a child; the parent's pool is leaked there (dropping it would
//! signal threads that do not exist). The size follows torch's `get_num_threads()`, which
//! DataLoader sets to 1 in its workers.

use crate::error::{Error, Result};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::sync::{Arc, Mutex};

struct Tagged {
    pid: u32,
    threads: usize,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<Tagged>> = Mutex::new(None);

fn wanted_threads() -> usize {
    if let Some(n) = std::env::var("HLORA_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    let torch_threads = tch::get_num_threads();
    if torch_threads > 0 {
        torch_threads as usize
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// The pool for this process, built on first use (and again after a fork or a change of
/// torch's thread count).
pub fn pool() -> Result<Arc<ThreadPool>> {
    let pid = std::process::id();
    let threads = wanted_threads();
    let mut guard = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(tagged) = guard.as_ref() {
        if tagged.pid == pid && tagged.threads == threads {
            return Ok(tagged.pool.clone());
        }
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("hlora-{i}"))
        .build()
        .map_err(|e| Error::Runtime(format!("could not start hlora's thread pool: {e}")))?;
    let pool = Arc::new(pool);
    let fresh = Tagged {
        pid,
        threads,
        pool: pool.clone(),
    };
    if let Some(old) = guard.replace(fresh) {
        if old.pid != pid {
            // Inherited through fork(): its threads live only in the parent.
            std::mem::forget(old);
        }
    }
    Ok(pool)
}

/// Runs `work(index, item)` for every item and returns the results in item order.
///
/// The calling thread works from the first moment, beside `threads - 1` pool workers that
/// take items from the same queue in order. Handing everything to the pool instead puts the
/// workers' wake-up on the critical path: after a few idle milliseconds (any torch op between
/// two calls) that cost 0.1–0.25 ms per call on our 2-core VM, as much as a whole kernel at
/// SmolLM2's shapes. Results depend only on the items, never on who ran them.
pub fn run_items<I: Send, R: Send>(
    items: Vec<I>,
    work: impl Fn(usize, I) -> R + Sync,
) -> Result<Vec<R>> {
    let n = items.len();
    let queue = Mutex::new(items.into_iter().enumerate());
    let done = Mutex::new(Vec::with_capacity(n));
    let drain = || {
        let mut mine = Vec::new();
        loop {
            let next = queue
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .next();
            let Some((i, item)) = next else { break };
            mine.push((i, work(i, item)));
        }
        done.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(mine);
    };
    let helpers = wanted_threads().saturating_sub(1).min(n.saturating_sub(1));
    if helpers == 0 {
        drain();
    } else {
        pool()?.in_place_scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(|_| drain());
            }
            drain();
        });
    }
    let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_unstable_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_run_once_each_and_come_back_in_order() {
        let items: Vec<u64> = (0..1000).collect();
        let out = run_items(items, |i, x| (i as u64) * 1000 + x).unwrap();
        assert_eq!(out.len(), 1000);
        assert!(out.iter().enumerate().all(|(i, &v)| v == i as u64 * 1001));
        assert!(run_items(Vec::<u8>::new(), |_, x| x).unwrap().is_empty());
    }

    #[test]
    fn a_panicking_item_reaches_the_caller() {
        let caught = std::panic::catch_unwind(|| {
            run_items((0..64).collect::<Vec<u32>>(), |_, x| {
                assert!(x != 40, "item 40 fails");
                x
            })
        });
        assert!(caught.is_err());
        // The pool still works afterwards.
        assert_eq!(
            run_items(vec![1u8, 2, 3], |_, x| x * 2).unwrap(),
            vec![2, 4, 6]
        );
    }

    #[test]
    fn many_short_batches_in_a_row() {
        for round in 0..2000u64 {
            let out = run_items(vec![round; 3], |i, x| x + i as u64).unwrap();
            assert_eq!(out, vec![round, round + 1, round + 2]);
        }
    }

    #[test]
    fn pool_is_reused_within_a_process() {
        let a = pool().unwrap();
        let b = pool().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}
