//! torch's own OpenMP team, borrowed for our kernels.
//!
//! torch runs its CPU ops on libgomp threads that busy-wait for milliseconds after each op. A
//! kernel called right after a torch op (every training step) would otherwise share the cores
//! with those spinning threads and wake its own sleeping workers; on the same team its work
//! starts on threads that are already running. `GOMP_parallel` is looked up in the libgomp
//! libtorch_cpu links (torch, loaded before hlora, has it in the process), so there is one OpenMP
//! runtime and one set of threads.

use std::ffi::{c_int, c_uint, c_void};
use std::sync::OnceLock;

type Body = unsafe extern "C" fn(*mut c_void);
type ParallelFn = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);
type InParallelFn = unsafe extern "C" fn() -> c_int;
type ThreadNumFn = unsafe extern "C" fn() -> c_int;

pub struct Team {
    parallel: ParallelFn,
    in_parallel: InParallelFn,
    thread_num: ThreadNumFn,
    /// The process that looked the runtime up: libgomp cannot be used after a fork (its
    /// threads stayed in the parent), so a forked child never borrows the team.
    pid: u32,
}

fn lookup() -> Option<Team> {
    if std::env::var("HLORA_POOL").is_ok_and(|v| v == "rayon") {
        return None;
    }
    // SAFETY: RTLD_NOLOAD only returns a library that is already loaded (torch's, imported before
    // hlora); the symbols have libgomp's documented C signatures.
    unsafe {
        let lib = libloading::os::unix::Library::open(
            Some("libtorch_cpu.so"),
            libc::RTLD_NOLOAD | libc::RTLD_LAZY,
        )
        .ok()?;
        let parallel = *lib.get::<ParallelFn>(b"GOMP_parallel\0").ok()?;
        let in_parallel = *lib.get::<InParallelFn>(b"omp_in_parallel\0").ok()?;
        let thread_num = *lib.get::<ThreadNumFn>(b"omp_get_thread_num\0").ok()?;
        // torch stays loaded for the life of the process: keep the handle open.
        std::mem::forget(lib);
        Some(Team {
            parallel,
            in_parallel,
            thread_num,
            pid: std::process::id(),
        })
    }
}

static TEAM: OnceLock<Option<Team>> = OnceLock::new();

/// torch's OpenMP team, when torch uses libgomp and we are in the process that found it and
/// not already inside a parallel region.
pub fn team() -> Option<&'static Team> {
    let team = TEAM.get_or_init(lookup).as_ref()?;
    // SAFETY: omp_in_parallel takes no arguments and only reads thread state.
    (team.pid == std::process::id() && unsafe { (team.in_parallel)() } == 0).then_some(team)
}

struct Call<'a> {
    body: &'a (dyn Fn() + Sync),
    panicked: std::sync::atomic::AtomicBool,
}

unsafe extern "C" fn trampoline(data: *mut c_void) {
    // SAFETY: `data` is the `Call` that `run` keeps alive until GOMP_parallel returns.
    let call = unsafe { &*(data as *const Call) };
    // A panic must not unwind into C: note it, and let the caller re-raise it.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (call.body)())).is_err() {
        call.panicked
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Team {
    /// This thread's number in the running parallel region (0: the caller).
    pub fn thread_num(&self) -> usize {
        // SAFETY: omp_get_thread_num takes no arguments and only reads thread state.
        usize::try_from(unsafe { (self.thread_num)() }).unwrap_or(0)
    }

    /// Runs `body` on `threads` threads (the caller is one of them) and returns when all are
    /// done; false if `body` panicked on any of them.
    pub fn run(&self, threads: usize, body: &(dyn Fn() + Sync)) -> bool {
        let call = Call {
            body,
            panicked: std::sync::atomic::AtomicBool::new(false),
        };
        let threads = c_uint::try_from(threads).unwrap_or(c_uint::MAX);
        // SAFETY: `call` outlives the parallel region, which ends before GOMP_parallel returns.
        unsafe { (self.parallel)(trampoline, &call as *const Call as *mut c_void, threads, 0) };
        !call.panicked.load(std::sync::atomic::Ordering::SeqCst)
    }
}
