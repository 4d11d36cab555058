//! Where the CPU kernels' tasks run.
//!
//! On torch's own OpenMP team when torch uses libgomp (`crate::cpu::omp`: its threads are usually
//! still spinning from the last torch op, so a call's work starts at once and never competes
//! with them for cores), otherwise — or with `HLORA_POOL=rayon`, or in a forked child — on a
//! rayon pool made safe across `fork()`.
//!
//! A forked child (a DataLoader worker) inherits the parent's rayon pool object but none of its
//! threads: handing work to it would wait forever. So the pool is tagged with the pid that
//! built it and rebuilt in a child; the parent's pool is leaked there (dropping it would
//! signal threads that do not exist). The thread count follows torch's `get_num_threads()`,
//! which DataLoader sets to 1 in its workers; the calling thread is one of them, so the pool
//! holds the others (an idle extra worker would only spin on the cores the work needs).

use crate::error::{Error, Result};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

struct Tagged {
    pid: u32,
    helpers: usize,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<Tagged>> = Mutex::new(None);

/// Threads a kernel call runs on, the calling thread included.
pub fn wanted_threads() -> usize {
    if let Some(n) = std::env::var("HLORA_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    match torch_threads() {
        Some(n) if n > 0 => n as usize,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// torch's intra-op thread count (`torch.get_num_threads()`), read from the libtorch already
/// loaded in the process: `at::get_num_threads()` has had this C++ name in every torch release,
/// so no build of ours is tied to one.
fn torch_threads() -> Option<i32> {
    type GetNumThreads = unsafe extern "C" fn() -> i32;
    static LOOKUP: std::sync::OnceLock<Option<GetNumThreads>> = std::sync::OnceLock::new();
    let f = LOOKUP.get_or_init(|| {
        // SAFETY: RTLD_NOLOAD only returns a library already loaded (torch's); the symbol is
        // `int at::get_num_threads()`, which takes nothing and only reads torch's setting.
        unsafe {
            let lib = libloading::os::unix::Library::open(
                Some("libtorch_cpu.so"),
                libc::RTLD_NOLOAD | libc::RTLD_LAZY,
            )
            .ok()?;
            let f = *lib
                .get::<GetNumThreads>(b"_ZN2at15get_num_threadsEv\0")
                .ok()?;
            std::mem::forget(lib); // torch stays loaded for the life of the process
            Some(f)
        }
    });
    // SAFETY: see above.
    f.map(|f| unsafe { f() })
}

/// The pool of `helpers` workers for this process, built on first use (and again after a fork
/// or a change of torch's thread count).
fn pool(helpers: usize) -> Result<Arc<ThreadPool>> {
    let pid = std::process::id();
    let mut guard = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(tagged) = guard.as_ref() {
        if tagged.pid == pid && tagged.helpers == helpers {
            return Ok(tagged.pool.clone());
        }
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(helpers)
        .thread_name(|i| format!("hlora-{i}"))
        .build()
        .map_err(|e| Error::Runtime(format!("could not start hlora's thread pool: {e}")))?;
    let pool = Arc::new(pool);
    let fresh = Tagged {
        pid,
        helpers,
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

/// The threads [`run_items`] uses in this process now: "openmp" (torch's team) or "rayon".
pub fn threading() -> &'static str {
    if crate::cpu::omp::team().is_some() {
        "openmp"
    } else {
        "rayon"
    }
}

/// Runs `work(index, item)` for every item and returns the results in item order.
///
/// The calling thread works from the first moment, beside `threads - 1` others: torch's OpenMP
/// workers when available, else our rayon pool's. (Handing everything to sleeping rayon workers
/// instead put their wake-up on the critical path: after a few idle milliseconds that cost
/// 0.1–0.25 ms per call on our 2-core VM, as much as a whole kernel at SmolLM2's shapes.)
///
/// Thread t first runs the t-th contiguous block of items, in order — the split torch's
/// element-wise ops make of a range among the same team — then takes what is left at the end of
/// the others' blocks. So a thread works on the same rows call after call and finds them in its
/// own core's cache rather than in the other's (taking items from one shared queue, who ran
/// which changed from call to call: ω update 192 × 576 on two threads 75.3 → 72.2 µs, 10th
/// percentile, and 4.1–4.2× → 4.4–4.6× against the reference in `hlora bench`). Results
/// depend only on the items, never on who ran them.
pub fn run_items<I: Send, R: Send>(
    items: Vec<I>,
    work: impl Fn(usize, I) -> R + Sync,
) -> Result<Vec<R>> {
    run_items_on(crate::cpu::omp::team(), items, work)
}

fn run_items_on<I: Send, R: Send>(
    team: Option<&crate::cpu::omp::Team>,
    items: Vec<I>,
    work: impl Fn(usize, I) -> R + Sync,
) -> Result<Vec<R>> {
    run_items_with_on(team, items, || (), |_, i, item| work(i, item))
}

/// [`run_items`] with state each thread makes for itself (`init`, before its first item) and
/// hands to `work` for each of its items: data every task reads, kept in that thread's cache.
pub fn run_items_with<I: Send, R: Send, St>(
    items: Vec<I>,
    init: impl Fn() -> St + Sync,
    work: impl Fn(&St, usize, I) -> R + Sync,
) -> Result<Vec<R>> {
    run_items_with_on(crate::cpu::omp::team(), items, init, work)
}

fn run_items_with_on<I: Send, R: Send, St>(
    team: Option<&crate::cpu::omp::Team>,
    items: Vec<I>,
    init: impl Fn() -> St + Sync,
    work: impl Fn(&St, usize, I) -> R + Sync,
) -> Result<Vec<R>> {
    let n = items.len();
    let helpers = wanted_threads().saturating_sub(1);
    let spawned = helpers.min(n.saturating_sub(1));
    let threads = spawned + 1;
    let mut items = items.into_iter().enumerate();
    let blocks: Vec<Mutex<VecDeque<(usize, I)>>> = (0..threads)
        .map(|t| {
            let len = (t + 1) * n / threads - t * n / threads;
            Mutex::new(items.by_ref().take(len).collect())
        })
        .collect();
    let done = Mutex::new(Vec::with_capacity(n));
    let drain = |me: usize| {
        let mut mine = Vec::new();
        let mut state = None;
        // Its own block from the front, then the others' from the back (a thread that did not
        // come — a smaller OpenMP team — leaves its block to them).
        for k in 0..threads {
            let block = &blocks[(me + k) % threads];
            loop {
                let next = {
                    let mut queue = block
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    if k == 0 {
                        queue.pop_front()
                    } else {
                        queue.pop_back()
                    }
                };
                let Some((i, item)) = next else { break };
                let state = state.get_or_insert_with(&init);
                mine.push((i, work(state, i, item)));
            }
        }
        done.lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend(mine);
    };
    if spawned == 0 {
        drain(0);
    } else if let Some(team) = team {
        let body = || drain(team.thread_num() % threads);
        if !team.run(threads, &body) {
            // Re-raised on the calling thread, as rayon does (a panic must not cross C frames).
            panic!("a CPU kernel task panicked");
        }
    } else {
        pool(helpers)?.in_place_scope(|scope| {
            for w in 0..spawned {
                let drain = &drain;
                scope.spawn(move |_| drain(w + 1));
            }
            drain(0);
        });
    }
    let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_unstable_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both places tasks can run: torch's OpenMP team (found in cargo test too: tch links
    /// libtorch_cpu) and the rayon pool.
    fn both() -> [Option<&'static crate::cpu::omp::Team>; 2] {
        let team = crate::cpu::omp::team();
        assert!(team.is_some(), "torch's libgomp was not found");
        [team, None]
    }

    #[test]
    fn items_run_once_each_and_come_back_in_order() {
        for team in both() {
            let items: Vec<u64> = (0..1000).collect();
            let out = run_items_on(team, items, |i, x| (i as u64) * 1000 + x).unwrap();
            assert_eq!(out.len(), 1000);
            assert!(out.iter().enumerate().all(|(i, &v)| v == i as u64 * 1001));
            assert!(run_items_on(team, Vec::<u8>::new(), |_, x| x)
                .unwrap()
                .is_empty());
        }
    }

    #[test]
    fn items_are_shared_among_threads() {
        for team in both() {
            let threads = run_items_on(team, (0..64).collect::<Vec<u32>>(), |_, _| {
                std::thread::sleep(std::time::Duration::from_millis(2));
                std::thread::current().id()
            })
            .unwrap();
            let distinct: std::collections::HashSet<_> = threads.into_iter().collect();
            assert_eq!(
                distinct.len(),
                wanted_threads().min(64),
                "{}",
                team.is_some()
            );
        }
    }

    #[test]
    fn each_thread_starts_on_its_own_contiguous_block() {
        let threads = wanted_threads().min(64);
        for team in both() {
            let caller = std::thread::current().id();
            // Each item first waits (for 5 s at most in all) until every thread has come, so no
            // thread can run ahead while another is still waking up (or busy with a test running
            // beside this one).
            let arrived = Mutex::new(std::collections::HashSet::new());
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let ran_on = run_items_on(team, (0..64).collect::<Vec<u32>>(), |_, _| {
                let me = std::thread::current().id();
                arrived.lock().unwrap().insert(me);
                while arrived.lock().unwrap().len() < threads
                    && std::time::Instant::now() < deadline
                {
                    std::thread::yield_now();
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                me
            })
            .unwrap();
            // Block 0 is the caller's; each block's first half is run by one thread, its own
            // (the others take from its end, once they are done with theirs).
            assert_eq!(ran_on[0], caller, "{}", team.is_some());
            let mut owners = std::collections::HashSet::new();
            for t in 0..threads {
                let (start, end) = (t * 64 / threads, (t + 1) * 64 / threads);
                let half = &ran_on[start..start + (end - start) / 2];
                assert!(half.iter().all(|id| *id == half[0]), "{}", team.is_some());
                owners.insert(half[0]);
            }
            assert_eq!(owners.len(), threads, "{}", team.is_some());
        }
    }

    #[test]
    fn each_thread_makes_its_state_once_and_uses_it_for_its_items() {
        for team in both() {
            let made = std::sync::atomic::AtomicUsize::new(0);
            let init = || {
                made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::current().id()
            };
            let own = run_items_with_on(team, (0..64).collect::<Vec<u32>>(), init, |st, _, _| {
                std::thread::sleep(std::time::Duration::from_millis(1));
                *st == std::thread::current().id()
            })
            .unwrap();
            assert!(own.iter().all(|&x| x), "{}", team.is_some());
            let made = made.into_inner();
            assert!((1..=wanted_threads()).contains(&made), "{made}");
        }
    }

    #[test]
    fn a_panicking_item_reaches_the_caller() {
        for team in both() {
            let caught = std::panic::catch_unwind(|| {
                run_items_on(team, (0..64).collect::<Vec<u32>>(), |_, x| {
                    assert!(x != 40, "item 40 fails");
                    x
                })
            });
            assert!(caught.is_err());
            // The threads still work afterwards.
            assert_eq!(
                run_items_on(team, vec![1u8, 2, 3], |_, x| x * 2).unwrap(),
                vec![2, 4, 6]
            );
        }
    }

    #[test]
    fn many_short_batches_in_a_row() {
        for team in both() {
            for round in 0..2000u64 {
                let out = run_items_on(team, vec![round; 3], |i, x| x + i as u64).unwrap();
                assert_eq!(out, vec![round, round + 1, round + 2]);
            }
        }
    }

    #[test]
    fn pool_is_reused_within_a_process() {
        // The size run_items asks for, so a test running beside this one keeps the same pool.
        let helpers = wanted_threads().saturating_sub(1).max(1);
        let a = pool(helpers).unwrap();
        let b = pool(helpers).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.current_num_threads(), helpers);
    }
}
