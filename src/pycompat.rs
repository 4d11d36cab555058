//! `_PyThreadState_UncheckedGet` for Python ≥ 3.13.
//!
//! torch-sys compiles its Python glue against the build interpreter's headers, and pybind11's
//! `gil_scoped_acquire` in it calls CPython's private `_PyThreadState_UncheckedGet` when built for
//! Python ≤ 3.12. Python 3.13 removed that symbol (the public `PyThreadState_GetUnchecked` took its
//! place), so this abi3 extension failed to load there: "undefined symbol". It is defined here and
//! exported. The glue's calls go through the dynamic linker, which searches the interpreter first:
//! a Python that still has its own keeps using it, and on 3.13 and later they reach this one, which
//! forwards to the public function.

use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

type ThreadStateFn = unsafe extern "C" fn() -> *mut c_void;

extern "C" {
    // CPython ≥ 3.4 (not in pyo3-ffi's abi3 set; the torch-sys glue imports them already).
    fn PyGILState_Check() -> c_int;
    fn PyGILState_GetThisThreadState() -> *mut c_void;
}

/// The interpreter's own function, public (3.13+) or private (≤ 3.12) — never this library's.
fn interpreters_unchecked_get() -> Option<ThreadStateFn> {
    static FOUND: OnceLock<Option<ThreadStateFn>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let names: [&CStr; 2] = [
            c"PyThreadState_GetUnchecked",
            c"_PyThreadState_UncheckedGet",
        ];
        names.iter().find_map(|name| {
            // SAFETY: dlsym only looks the NUL-terminated name up in the loaded objects.
            let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            // SAFETY: where found outside this library it is CPython's `PyThreadState *(void)`.
            (!found.is_null() && !in_this_library(found))
                .then(|| unsafe { std::mem::transmute::<*mut c_void, ThreadStateFn>(found) })
        })
    })
}

/// Whether `address` lies in this shared library (found there if it was loaded RTLD_GLOBAL).
/// By the object, not by comparing with `_PyThreadState_UncheckedGet`'s address: taken in
/// Rust, that resolves through the dynamic linker too, to the interpreter's function if it has one.
fn in_this_library(address: *mut c_void) -> bool {
    static MARKER: u8 = 0;
    let object = |p: *const c_void| {
        // SAFETY: dladdr only reads the loader's tables into `info`, zeroed plain C data.
        let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
        (unsafe { libc::dladdr(p, &mut info) } != 0).then_some(info.dli_fbase)
    };
    let here = object(std::ptr::addr_of!(MARKER).cast());
    here.is_some() && here == object(address)
}

/// The calling thread's Python thread state if it holds the GIL, else null: CPython's contract.
///
/// # Safety
/// Called like CPython's own: from a thread of an initialized interpreter.
#[no_mangle]
#[allow(non_snake_case)]
pub unsafe extern "C" fn _PyThreadState_UncheckedGet() -> *mut c_void {
    match interpreters_unchecked_get() {
        // SAFETY: CPython's function, same contract.
        Some(get) => unsafe { get() },
        // Not reached with CPython, which has one of the two.
        // SAFETY: both are callable from any thread of an initialized interpreter.
        None if unsafe { PyGILState_Check() } != 0 => unsafe { PyGILState_GetThisThreadState() },
        None => std::ptr::null_mut(),
    }
}
