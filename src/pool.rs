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

/// Runs `f` inside the pool.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> Result<R> {
    Ok(pool()?.install(f))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    #[test]
    fn pool_runs_parallel_work() {
        let total: u64 = install(|| (0..1000u64).into_par_iter().sum()).unwrap();
        assert_eq!(total, 499_500);
    }

    #[test]
    fn pool_is_reused_within_a_process() {
        let a = pool().unwrap();
        let b = pool().unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}
