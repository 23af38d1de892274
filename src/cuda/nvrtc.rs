//! NVRTC: CUDA C++ source to CUBIN, in process.
//!
//! # How libnvrtc is found
//! cudarc (`dynamic-loading`) `dlopen`s the first name that opens from
//! `cudarc::get_lib_name_candidates("nvrtc")`, which with our `cuda-13000` binding feature is:
//! `libnvrtc.so`, ten Windows-style `libnvrtc64*.so` names, then **`libnvrtc.so.13`**,
//! `libnvrtc.so.12`, `.11`, `.10`, `.9`, `.1` (the test `nvrtc_library_names` prints the list).
//! Bare names, so the normal `dlopen` search applies: `LD_LIBRARY_PATH` (as it was when the
//! process started), the caller's RUNPATH, `ld.so.cache`, `/lib`, `/usr/lib`.
//!
//! The PyPI wheel `nvidia-cuda-nvrtc` (CUDA 13) ships `nvidia/cu13/lib/libnvrtc.so.13` (soname
//! `libnvrtc.so.13`) next to `libnvrtc-builtins.so.13.x`, which it finds through its RPATH
//! `$ORIGIN`. So putting that `lib` directory on `LD_LIBRARY_PATH` is enough; no symlink is needed.
//! Caveat: an unversioned `libnvrtc.so` anywhere on the search path (a toolkit install, e.g.
//! `/usr/local/cuda/.../libnvrtc.so` in `ld.so.cache`, as on the GPU image) wins over it because
//! it comes first in the list; harmless when both are CUDA 13.
//!
//! Alternatively `NCCL_EP_NVRTC_LIB=/full/path/libnvrtc.so.13` makes this module `dlopen` that
//! file first (`RTLD_GLOBAL`); glibc then answers cudarc's `dlopen("libnvrtc.so.13")` with the
//! already loaded object, matched by soname (verified). That works without touching
//! `LD_LIBRARY_PATH`, but, for the same reason as above, not where a `libnvrtc.so` is findable.
//!
//! As with the driver, cudarc panics on a missing library or symbol, so [`nvrtc_available`]
//! checks both before anything is called.

use std::ffi::{CStr, CString, c_char};
use std::sync::OnceLock;

use cudarc::nvrtc::sys;

use ep_core::error::{Error, ErrorKind, Result};

/// Every NVRTC entry point used here; all exist since CUDA 11.1.
const SYMBOLS: &[&str] = &[
    "nvrtcVersion",
    "nvrtcGetErrorString",
    "nvrtcGetNumSupportedArchs",
    "nvrtcGetSupportedArchs",
    "nvrtcCreateProgram",
    "nvrtcDestroyProgram",
    "nvrtcCompileProgram",
    "nvrtcGetProgramLogSize",
    "nvrtcGetProgramLog",
    "nvrtcGetCUBINSize",
    "nvrtcGetCUBIN",
];

/// Env var naming an NVRTC library file to load before the normal search.
pub const NVRTC_LIB_ENV: &str = "NCCL_EP_NVRTC_LIB";

struct Nvrtc {
    version: (i32, i32),
}

fn nvrtc() -> Result<&'static Nvrtc> {
    static N: OnceLock<std::result::Result<Nvrtc, Error>> = OnceLock::new();
    N.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> std::result::Result<Nvrtc, Error> {
    if let Some(path) = std::env::var_os(NVRTC_LIB_ENV).filter(|p| !p.is_empty()) {
        preload(&path)?;
    }
    // SAFETY: only dlopens and dlcloses cudarc's candidate names for libnvrtc, whose
    // initialisers have no preconditions on us.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::new(
            ErrorKind::System,
            format!(
                "libnvrtc could not be loaded (tried libnvrtc.so, libnvrtc.so.13, libnvrtc.so.12, ...): put the \
                 directory holding libnvrtc.so.13 (e.g. the nvidia-cuda-nvrtc wheel's nvidia/cu13/lib) on \
                 LD_LIBRARY_PATH, or set {NVRTC_LIB_ENV} to the file"
            ),
        ));
    }
    // SAFETY: as for is_culib_present: it opens the same library, and keeps it open.
    let lib = std::panic::catch_unwind(|| unsafe { sys::culib() })
        .map_err(|_| Error::new(ErrorKind::System, "libnvrtc could not be loaded"))?;
    for name in SYMBOLS {
        // SAFETY: the symbol is only looked up, as a plain address; nothing reads or calls it.
        if unsafe { lib.get::<*const std::ffi::c_void>(name.as_bytes()) }.is_err() {
            return Err(Error::new(
                ErrorKind::System,
                format!("libnvrtc does not export {name}"),
            ));
        }
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: every symbol we call exists (checked above); it writes two ints to live locals.
    check(unsafe { sys::nvrtcVersion(&mut major, &mut minor) }, "nvrtcVersion")?;
    Ok(Nvrtc {
        version: (major, minor),
    })
}

fn preload(path: &std::ffi::OsStr) -> Result<()> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    use std::os::unix::ffi::OsStrExt;
    if path.as_bytes().contains(&0) {
        return Err(Error::new(ErrorKind::System, format!("{NVRTC_LIB_ENV} contains NUL")));
    }
    // SAFETY: loading the library the user named runs its initialisers, which is what setting
    // the variable asks for; libnvrtc's have no preconditions on us.
    match unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) } {
        Ok(lib) => {
            // Kept loaded for the life of the process: cudarc finds it again by soname.
            let _ = lib.into_raw();
            Ok(())
        }
        Err(e) => {
            let why = match e {
                libloading::Error::DlOpen { source } => source.to_string(),
                libloading::Error::DlOpenUnknown => String::new(),
                other => other.to_string(),
            };
            Err(Error::new(
                ErrorKind::System,
                format!("{NVRTC_LIB_ENV}={}: dlopen failed: {why}", path.to_string_lossy()),
            ))
        }
    }
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        return Ok(());
    }
    // SAFETY: only called once libnvrtc is loaded with its symbols checked (every `r` comes
    // from an NVRTC call); it returns a static string or null for any code.
    let s = unsafe { sys::nvrtcGetErrorString(r) };
    let text = if s.is_null() {
        format!("NVRTC error {}", r as u32)
    } else {
        // SAFETY: non-null, so a NUL-terminated static string of libnvrtc.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    };
    Err(Error::new(ErrorKind::Cuda, format!("{what} failed: {text}")))
}

/// True when libnvrtc loads and exports what we need.
pub fn nvrtc_available() -> bool {
    nvrtc().is_ok()
}

/// Why NVRTC is unusable, or `Ok` when it is.
pub fn ensure_nvrtc() -> Result<()> {
    nvrtc().map(|_| ())
}

/// `nvrtcVersion`, e.g. `(13, 0)`.
pub fn version() -> Result<(i32, i32)> {
    Ok(nvrtc()?.version)
}

/// The numeric `sm_XY` architectures this NVRTC can target, e.g. `[75, 80, ..., 90, 100, ...]`.
pub fn supported_archs() -> Result<Vec<i32>> {
    nvrtc()?;
    let mut n = 0;
    check(
        // SAFETY: libnvrtc is loaded (nvrtc() above); it writes one int to a live local.
        unsafe { sys::nvrtcGetNumSupportedArchs(&mut n) },
        "nvrtcGetNumSupportedArchs",
    )?;
    let mut v = vec![0; n.max(0) as usize];
    if !v.is_empty() {
        check(
            // SAFETY: `v` has room for the `n` ints NVRTC just said it will write.
            unsafe { sys::nvrtcGetSupportedArchs(v.as_mut_ptr()) },
            "nvrtcGetSupportedArchs",
        )?;
    }
    Ok(v)
}

/// A successful compile.
#[derive(Clone, Debug)]
pub struct CompileOutput {
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings); usually empty.
    pub log: String,
}

/// Destroys the program on every path.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by nvrtcCreateProgram (libnvrtc loaded) and is
        // destroyed only here.
        let _ = unsafe { sys::nvrtcDestroyProgram(&mut self.0) };
    }
}

impl Program {
    fn log(&self) -> String {
        let mut n = 0usize;
        // SAFETY: a live program; it writes one size to a live local.
        if unsafe { sys::nvrtcGetProgramLogSize(self.0, &mut n) } != sys::nvrtcResult::NVRTC_SUCCESS || n <= 1 {
            return String::new();
        }
        let mut buf = vec![0u8; n];
        // SAFETY: a live program; `buf` holds the `n` bytes (NUL included) NVRTC said the log has.
        if unsafe { sys::nvrtcGetProgramLog(self.0, buf.as_mut_ptr().cast::<c_char>()) }
            != sys::nvrtcResult::NVRTC_SUCCESS
        {
            return String::new();
        }
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).trim_end().to_owned()
    }
}

/// Compiles `source` (no `#include` of CUDA headers; none are given to NVRTC) with `options`
/// (which must include `--gpu-architecture=sm_XY[a]`, a real architecture, for a CUBIN to exist).
/// `program_name` appears in diagnostics. On failure the error carries NVRTC's log.
pub fn compile_to_cubin(source: &str, program_name: &str, options: &[String]) -> Result<CompileOutput> {
    nvrtc()?;
    let src = CString::new(source).map_err(|_| ep_core::invalid_arg!("{program_name}: source contains NUL"))?;
    let name = CString::new(program_name).map_err(|_| ep_core::invalid_arg!("program name contains NUL"))?;
    let opts = options
        .iter()
        .map(|o| CString::new(o.as_str()).map_err(|_| ep_core::invalid_arg!("NVRTC option {o:?} contains NUL")))
        .collect::<Result<Vec<_>>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();

    let mut raw: sys::nvrtcProgram = std::ptr::null_mut();
    check(
        // SAFETY: libnvrtc is loaded (nvrtc() above); source and name are live NUL-terminated
        // strings, copied by NVRTC; no headers (count 0, null arrays); the output a live local.
        unsafe {
            sys::nvrtcCreateProgram(
                &mut raw,
                src.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            )
        },
        "nvrtcCreateProgram",
    )?;
    let prog = Program(raw);
    // SAFETY: a live program; `opt_ptrs` holds `len` pointers to NUL-terminated strings that
    // `opts` keeps alive during the call.
    let r = unsafe { sys::nvrtcCompileProgram(prog.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    let log = prog.log();
    if let Err(e) = check(r, "nvrtcCompileProgram") {
        return Err(e
            .context(format_args!("{program_name} ({})", options.join(" ")))
            .with_log(&log));
    }
    let mut size = 0usize;
    check(
        // SAFETY: a live, compiled program; it writes one size to a live local.
        unsafe { sys::nvrtcGetCUBINSize(prog.0, &mut size) },
        "nvrtcGetCUBINSize",
    )?;
    if size == 0 {
        return Err(Error::new(
            ErrorKind::Cuda,
            format!("{program_name}: NVRTC produced no CUBIN; is --gpu-architecture a real sm_XY?"),
        ));
    }
    let mut cubin = vec![0u8; size];
    check(
        // SAFETY: a live, compiled program; `cubin` holds the `size` bytes NVRTC said it writes.
        unsafe { sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast::<c_char>()) },
        "nvrtcGetCUBIN",
    )?;
    Ok(CompileOutput { cubin, log })
}

trait WithLog {
    fn with_log(self, log: &str) -> Self;
}

impl WithLog for Error {
    fn with_log(mut self, log: &str) -> Self {
        if !log.is_empty() {
            self.msg = format!("{}\n{log}", self.msg);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn preload_failures_are_system_errors() {
        let e = preload(OsStr::new("/nonexistent/libnvrtc.so.13")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::System);
        assert!(
            e.msg.starts_with(
                "NCCL_EP_NVRTC_LIB=/nonexistent/libnvrtc.so.13: dlopen failed: /nonexistent/libnvrtc.so.13"
            ),
            "dlerror's text follows: {}",
            e.msg
        );
        let e = preload(OsStr::from_bytes(b"/x\0y")).unwrap_err();
        assert_eq!(
            (e.kind, e.msg.as_str()),
            (ErrorKind::System, "NCCL_EP_NVRTC_LIB contains NUL")
        );
    }

    /// With or without libnvrtc: a version or a System error, never a panic.
    #[test]
    fn availability_never_panics() {
        match version() {
            Ok((major, _)) => assert!(major >= 11 && nvrtc_available()),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::System, "{e}");
                assert!(!nvrtc_available() && ensure_nvrtc().is_err());
            }
        }
    }
}
