//! The fused CUDA kernels (`kernels.cu`): compiled at first use by NVRTC (and kept on disk, see
//! `cache`), loaded per device, launched through the driver API on torch's current stream, on
//! the tensors' own memory.
//!
//! Everything CUDA is loaded dynamically (cudarc's `dynamic-loading`): building and importing
//! hlora needs no CUDA, and a machine without a driver or NVRTC gets an `Err` here, which the
//! dispatcher turns into one warning and the tch path. cudarc panics when asked for a library
//! that is missing, so presence is checked first and every entry point catches panics.

mod cache;
mod ops;
mod tables;

pub use ops::{finalize_many, omega_many, penalty_many, FinalizeMat, OmegaMat, PenaltyMat};

use crate::error::{Error, Result};
use cudarc::driver::{result as drv, sys as dsys};
use cudarc::nvrtc::{result as nvrtc, sys as nsys};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

/// The kernels' source; the host defines the table sizes so a layout mismatch fails to compile.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Every kernel `kernels.cu` exports (looked up once per device).
const KERNELS: &[&str] = &[
    "omega_f32_f32",
    "omega_f64_f32",
    "omega_bf16_f32",
    "omega_f16_f32",
    "omega_f32_f64",
    "omega_f64_f64",
    "omega_bf16_f64",
    "omega_f16_f64",
    "finalize_f32_f32",
    "finalize_f64_f32",
    "finalize_bf16_f32",
    "finalize_f16_f32",
    "finalize_f32_f64",
    "finalize_f64_f64",
    "finalize_bf16_f64",
    "finalize_f16_f64",
    "penalty_f32_f32",
    "penalty_f64_f32",
    "penalty_bf16_f32",
    "penalty_f16_f32",
    "penalty_f32_f64",
    "penalty_f64_f64",
    "penalty_bf16_f64",
    "penalty_f16_f64",
    "penalty_f32_bf16",
    "penalty_f64_bf16",
    "penalty_bf16_bf16",
    "penalty_f16_bf16",
    "penalty_f32_f16",
    "penalty_f64_f16",
    "penalty_bf16_f16",
    "penalty_f16_f16",
    "penalty_sums_f32_f32",
    "penalty_sums_f64_f32",
    "penalty_sums_bf16_f32",
    "penalty_sums_f16_f32",
    "penalty_sums_f32_f64",
    "penalty_sums_f64_f64",
    "penalty_sums_bf16_f64",
    "penalty_sums_f16_f64",
    "penalty_sums_f32_bf16",
    "penalty_sums_f64_bf16",
    "penalty_sums_bf16_bf16",
    "penalty_sums_f16_bf16",
    "penalty_sums_f32_f16",
    "penalty_sums_f64_f16",
    "penalty_sums_bf16_f16",
    "penalty_sums_f16_f16",
    "penalty_grads_f32",
    "penalty_grads_f64",
    "segment_sums_f64",
];

fn runtime_err(msg: impl Into<String>) -> Error {
    Error::Runtime(msg.into())
}

/// Runs `f`, turning a panic inside cudarc (a missing symbol) into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(runtime_err(format!("{what}: the CUDA library panicked"))))
}

fn nvrtc_present() -> bool {
    // SAFETY: only probes for the library file.
    unsafe { nsys::is_culib_present() }
}

/// NVRTC's version, or why it cannot be loaded.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(runtime_err(
            "NVRTC (libnvrtc.so) was not found; hlora preloads it from torch's nvidia/cu13/lib",
        ));
    }
    guarded("nvrtcVersion", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: plain out-parameters.
        unsafe { nsys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| runtime_err(format!("nvrtcVersion failed: {e:?}")))?;
        Ok((major, minor))
    })
}

fn compile_options(arch: &str) -> Result<Vec<String>> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        format!("-DHL_MAX_MATS={}", tables::MAX_MATS),
    ];
    opts.extend(tables::size_defines());
    opts.extend(extra_defines(
        std::env::var("HLORA_CUDA_DEFINES").ok().as_deref(),
    )?);
    Ok(opts)
}

/// The kernels' tuning knobs from `HLORA_CUDA_DEFINES` (space-separated `-DNAME=VALUE`, e.g.
/// `-DHL_OMEGA_MIN_BLOCKS=4`), for timing variants on a GPU without a rebuild. They are part of
/// the options, so of the disk cache's key. Anything but a `-D` option is refused.
fn extra_defines(value: Option<&str>) -> Result<Vec<String>> {
    let words = value.unwrap_or("").split_whitespace();
    words
        .map(|w| {
            let name = w.strip_prefix("-D").unwrap_or("");
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_=".contains(c)) {
                Err(Error::value(format!(
                    "HLORA_CUDA_DEFINES holds -DNAME=VALUE options only (letters, digits, _), got {w:?}"
                )))
            } else {
                Ok(w.to_string())
            }
        })
        .collect()
}

fn check_arch(arch: &str) -> Result<()> {
    if !arch.starts_with("sm_") || arch.len() < 5 || !arch[3..].chars().all(|c| c.is_ascii_digit())
    {
        return Err(Error::value(format!(
            "arch must look like \"sm_90\", got {arch:?}"
        )));
    }
    Ok(())
}

/// Compiles `kernels.cu` for `arch` (e.g. "sm_90") into a cubin. Needs NVRTC only, no GPU.
pub fn compile(arch: &str) -> Result<Vec<u8>> {
    check_arch(arch)?;
    nvrtc_version()?;
    let opts = compile_options(arch)?;
    guarded("NVRTC compilation", || {
        let src = CString::new(SOURCE).map_err(|_| runtime_err("kernel source contains NUL"))?;
        let name = CString::new("hlora_kernels.cu").map_err(|_| runtime_err("bad name"))?;
        let prog = nvrtc::create_program(&src, Some(&name))
            .map_err(|e| runtime_err(format!("nvrtcCreateProgram: {e:?}")))?;
        // SAFETY: `prog` is live until destroyed below; the options are plain strings.
        let compiled = unsafe { nvrtc::compile_program(prog, &opts) };
        let result = match compiled {
            Ok(()) => cubin_of(prog),
            Err(e) => {
                // SAFETY: `prog` is live.
                let log = unsafe { nvrtc::get_program_log(prog) }
                    .map(|raw| {
                        raw.iter()
                            .take_while(|&&c| c != 0)
                            .map(|&c| c as u8 as char)
                            .collect::<String>()
                    })
                    .unwrap_or_default();
                Err(runtime_err(format!(
                    "NVRTC could not compile the kernels for {arch} ({e:?}):\n{log}"
                )))
            }
        };
        // SAFETY: created above, destroyed once.
        let _ = unsafe { nvrtc::destroy_program(prog) };
        result
    })
}

fn cubin_of(prog: nsys::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully; the buffer has the size NVRTC reports.
    unsafe {
        nsys::nvrtcGetCUBINSize(prog, &mut size)
            .result()
            .map_err(|e| runtime_err(format!("nvrtcGetCUBINSize: {e:?}")))?;
        let mut buf = vec![0u8; size];
        nsys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char)
            .result()
            .map_err(|e| runtime_err(format!("nvrtcGetCUBIN: {e:?}")))?;
        Ok(buf)
    }
}

/// Where launches go: a GPU, or the CPU emulator of the same source (tests without a GPU).
enum Backend {
    Device {
        context: dsys::CUcontext,
        functions: HashMap<&'static str, dsys::CUfunction>,
    },
    Emulator(libloading::Library),
}

/// The kernels loaded on one device.
pub struct Kernels {
    pub device: i32,
    pub arch: String,
    backend: Backend,
}

type EmulateFn = unsafe extern "C" fn(*const std::ffi::c_char, u32, *mut *mut c_void) -> i32;

// SAFETY: CUDA driver handles may be used from any thread once the context is current there
// (`Kernels::enter` makes it so before every launch); the module is never unloaded.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

impl Kernels {
    /// Makes the device's primary context (torch's) current on this thread.
    pub fn enter(&self) -> Result<()> {
        match &self.backend {
            // SAFETY: the context was retained in `load` and is never released.
            Backend::Device { context, .. } => unsafe { drv::ctx::set_current(*context) }
                .map_err(|e| runtime_err(format!("cuCtxSetCurrent: {e:?}"))),
            Backend::Emulator(_) => Ok(()),
        }
    }

    /// The CPU emulator built from `emulator.cpp` at `path`: launches run synchronously on
    /// host memory, so CPU tensors go through exactly the code CUDA tensors take.
    pub fn emulator(path: &str) -> Result<Kernels> {
        // SAFETY: a library built from emulator.cpp; its initializers only set up statics.
        let library = unsafe { libloading::Library::new(path) }
            .map_err(|e| Error::value(format!("emulator {path:?} cannot be loaded: {e}")))?;
        // SAFETY: the symbol's type is hl_emulate's in emulator.cpp.
        unsafe { library.get::<EmulateFn>(b"hl_emulate") }
            .map_err(|e| Error::value(format!("{path:?} is not the kernel emulator: {e}")))?;
        Ok(Kernels {
            device: -1,
            arch: "emulator".into(),
            backend: Backend::Emulator(library),
        })
    }

    /// Launches `name` with `params` (pointers to each argument) on `stream`, checking the
    /// launch; with HLORA_CUDA_SYNC=1 also waits and checks the kernel's execution.
    pub fn launch(
        &self,
        name: &str,
        blocks: u32,
        stream: u64,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        if blocks == 0 {
            return Ok(());
        }
        let functions = match &self.backend {
            Backend::Device { functions, .. } => functions,
            Backend::Emulator(library) => return emulate(library, name, blocks, params),
        };
        let f = functions
            .get(name)
            .copied()
            .ok_or_else(|| runtime_err(format!("kernel {name} is missing")))?;
        let stream = stream as dsys::CUstream;
        // SAFETY: `f` comes from our module; `params` point at values laid out as the kernel
        // declares them (tables.rs mirrors kernels.cu, checked at compile time).
        unsafe {
            drv::launch_kernel(
                f,
                (blocks, 1, 1),
                (tables::THREADS, 1, 1),
                0,
                stream,
                params,
            )
        }
        .map_err(|e| runtime_err(format!("launching {name}: {e:?}")))?;
        if sync_after_launch() {
            // SAFETY: a live stream handle from torch.
            unsafe { drv::stream::synchronize(stream) }
                .map_err(|e| runtime_err(format!("{name} failed: {e:?}")))?;
        }
        Ok(())
    }
}

fn emulate(
    library: &libloading::Library,
    name: &str,
    blocks: u32,
    params: &mut [*mut c_void],
) -> Result<()> {
    let cname = CString::new(name).map_err(|_| runtime_err("bad kernel name"))?;
    // SAFETY: checked in `Kernels::emulator`; params as for a GPU launch, on host memory.
    let status = unsafe {
        let f = library
            .get::<EmulateFn>(b"hl_emulate")
            .map_err(|e| runtime_err(format!("emulator: {e}")))?;
        f(cname.as_ptr(), blocks, params.as_mut_ptr())
    };
    match status {
        0 => Ok(()),
        _ => Err(runtime_err(format!("the emulator has no kernel {name}"))),
    }
}

fn sync_after_launch() -> bool {
    static SYNC: OnceLock<bool> = OnceLock::new();
    *SYNC.get_or_init(|| std::env::var("HLORA_CUDA_SYNC").is_ok_and(|v| v == "1"))
}

fn driver_present() -> bool {
    // SAFETY: only probes for the library file.
    unsafe { dsys::is_culib_present() }
}

fn load(device: i32) -> Result<Kernels> {
    if !driver_present() {
        return Err(runtime_err("the CUDA driver (libcuda.so) was not found"));
    }
    guarded("loading the CUDA kernels", || {
        fn err(what: &'static str) -> impl Fn(drv::DriverError) -> Error {
            move |e| runtime_err(format!("{what}: {e:?}"))
        }
        drv::init().map_err(err("cuInit"))?;
        let dev = drv::device::get(device).map_err(err("cuDeviceGet"))?;
        use dsys::CUdevice_attribute::*;
        // SAFETY: `dev` comes from cuDeviceGet.
        let (major, minor) = unsafe {
            (
                drv::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                    .map_err(err("compute capability"))?,
                drv::device::get_attribute(dev, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                    .map_err(err("compute capability"))?,
            )
        };
        if major < 7 {
            return Err(runtime_err(format!(
                "the fused kernels need compute capability 7.0 or newer, device {device} has {major}.{minor}"
            )));
        }
        let arch = format!("sm_{major}{minor}");
        let cubin = cached_cubin(&arch)?;
        // SAFETY: `dev` is valid; the primary context is the one torch uses.
        let context =
            unsafe { drv::primary_ctx::retain(dev) }.map_err(err("cuDevicePrimaryCtxRetain"))?;
        unsafe { drv::ctx::set_current(context) }.map_err(err("cuCtxSetCurrent"))?;
        // SAFETY: a complete cubin from NVRTC for this device's architecture.
        let module = unsafe { drv::module::load_data(cubin.as_ptr() as *const c_void) }
            .map_err(err("cuModuleLoadData"))?;
        let mut functions = HashMap::new();
        for &name in KERNELS {
            let cname = CString::new(name).map_err(|_| runtime_err("bad kernel name"))?;
            // SAFETY: `module` is loaded and never unloaded.
            let f = unsafe { drv::module::get_function(module, cname) }
                .map_err(|e| runtime_err(format!("kernel {name}: {e:?}")))?;
            functions.insert(name, f);
        }
        Ok(Kernels {
            device,
            arch,
            backend: Backend::Device { context, functions },
        })
    })
}

pub fn size_defines() -> Vec<String> {
    tables::size_defines()
}

/// The cubin for `arch` from the disk cache (see `cache`), else compiled and stored there;
/// with where it came from and the cache file (`None` when the cache is off or unwritable).
pub fn cubin(arch: &str) -> Result<(Vec<u8>, &'static str, Option<std::path::PathBuf>)> {
    check_arch(arch)?;
    let key = cache::key(SOURCE, &compile_options(arch)?, nvrtc_version()?);
    let (cubin, origin, file) = cache::load_or_compile(arch, key, || compile(arch))?;
    let origin = match origin {
        cache::Origin::Disk => "disk",
        cache::Origin::Compiled => "compiled",
    };
    Ok((cubin, origin, file))
}

/// One cubin per architecture per process (from the disk cache or NVRTC).
fn cached_cubin(arch: &str) -> Result<Arc<Vec<u8>>> {
    static CUBINS: OnceLock<Mutex<HashMap<String, Arc<Vec<u8>>>>> = OnceLock::new();
    let cache = CUBINS.get_or_init(Default::default);
    if let Some(c) = cache
        .lock()
        .map_err(|_| runtime_err("cubin cache poisoned"))?
        .get(arch)
    {
        return Ok(c.clone());
    }
    let fresh = Arc::new(cubin(arch)?.0);
    cache
        .lock()
        .map_err(|_| runtime_err("cubin cache poisoned"))?
        .insert(arch.to_string(), fresh.clone());
    Ok(fresh)
}

/// The kernels for CUDA device `device`, loaded on first use (a failure is remembered, so the
/// fallback decision is made once per device).
pub fn kernels(device: i32) -> std::result::Result<Arc<Kernels>, String> {
    type Slot = std::result::Result<Arc<Kernels>, String>;
    static LOADED: OnceLock<Mutex<HashMap<i32, Slot>>> = OnceLock::new();
    let map = LOADED.get_or_init(Default::default);
    let mut map = match map.lock() {
        Ok(m) => m,
        Err(_) => return Err("the CUDA kernel cache is poisoned".into()),
    };
    map.entry(device)
        .or_insert_with(|| load(device).map(Arc::new).map_err(|e| e.to_string()))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_list_names_every_entry_point() {
        for name in KERNELS {
            assert!(
                SOURCE.contains(&format!("({name},")) || SOURCE.contains(&format!(" {name}(")),
                "{name} is not defined in kernels.cu"
            );
        }
    }

    #[test]
    fn tuning_defines_are_d_options_only() {
        assert!(extra_defines(None).unwrap().is_empty());
        assert_eq!(
            extra_defines(Some(" -DHL_OMEGA_MIN_BLOCKS=4  -DX ")).unwrap(),
            ["-DHL_OMEGA_MIN_BLOCKS=4", "-DX"]
        );
        for bad in ["-include /etc/passwd", "-D", "--use_fast_math", "-DA=$(x)"] {
            assert!(
                matches!(extra_defines(Some(bad)), Err(Error::Value(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn arch_is_checked_before_nvrtc_is_touched() {
        assert!(matches!(compile("90"), Err(Error::Value(_))));
        assert!(matches!(compile("sm_9x"), Err(Error::Value(_))));
    }
}
