//! Loading cubins, looking up kernels, their attributes, and launching them on the caller's stream.

use std::ffi::{CString, c_void};

use cudarc::driver::sys;

use super::driver::{CUfunction, CUmodule, check, driver};
use super::stream::Stream;
use ep_core::error::Result;

/// A module loaded into a context. Handles are plain values: the JIT cache keeps modules loaded
/// for the life of the process, so nothing unloads them implicitly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Module {
    raw: CUmodule,
}

// SAFETY: a module handle is an opaque driver token, not memory; the driver accepts it from any
// thread (what it needs is its context current, which every call here documents).
unsafe impl Send for Module {}
// SAFETY: as for `Send`: shared references only copy the token.
unsafe impl Sync for Module {}

impl Module {
    /// `cuModuleLoadData` of a cubin (or fatbin/PTX) image into the current context.
    pub fn load(image: &[u8]) -> Result<Self> {
        driver()?;
        ep_core::ensure_arg!(!image.is_empty(), "empty module image");
        // The loader reads the ELF in place; give it 8-byte alignment, and a NUL in case it is PTX.
        let mut aligned = vec![0u64; image.len().div_ceil(8) + 1];
        // SAFETY: `aligned` holds at least `image.len()` + 1 bytes, is a fresh allocation (no
        // overlap) and any bytes are valid u64s.
        unsafe { std::ptr::copy_nonoverlapping(image.as_ptr(), aligned.as_mut_ptr().cast::<u8>(), image.len()) };
        let mut raw: CUmodule = std::ptr::null_mut();
        check(
            // SAFETY: the driver is loaded; the image is a live, aligned buffer with a NUL after
            // it, which the driver only reads during the call (it validates the contents); it
            // writes one handle to a live local.
            unsafe { sys::cuModuleLoadData(&mut raw, aligned.as_ptr().cast()) },
            format_args!("cuModuleLoadData({} bytes)", image.len()),
        )?;
        Ok(Self { raw })
    }

    pub fn raw(&self) -> CUmodule {
        self.raw
    }

    /// `cuModuleGetFunction` of an `extern "C"` kernel.
    pub fn function(&self, name: &str) -> Result<Function> {
        let c = CString::new(name).map_err(|_| ep_core::invalid_arg!("kernel name {name:?} contains NUL"))?;
        let mut raw: CUfunction = std::ptr::null_mut();
        check(
            // SAFETY: `raw` is a loaded module (only `load` makes one and only the unsafe `unload`
            // ends it); the name is a live NUL-terminated string; the output a live local.
            unsafe { sys::cuModuleGetFunction(&mut raw, self.raw, c.as_ptr()) },
            format_args!("cuModuleGetFunction({name})"),
        )?;
        Ok(Function { raw })
    }

    /// `cuModuleUnload`.
    ///
    /// # Safety
    /// Neither the module (no copy of it) nor any function of it may be used afterwards, and its
    /// context must be current.
    pub unsafe fn unload(self) -> Result<()> {
        // SAFETY: the caller's contract; the module exists, so the driver was loaded.
        check(unsafe { sys::cuModuleUnload(self.raw) }, "cuModuleUnload")
    }
}

/// A kernel handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    raw: CUfunction,
}

// SAFETY: as for Module: an opaque driver token the driver accepts from any thread.
unsafe impl Send for Function {}
// SAFETY: as for Module.
unsafe impl Sync for Function {}

/// Grid or block dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl From<u32> for Dim3 {
    fn from(x: u32) -> Self {
        Self { x, y: 1, z: 1 }
    }
}

impl From<(u32, u32, u32)> for Dim3 {
    fn from((x, y, z): (u32, u32, u32)) -> Self {
        Self { x, y, z }
    }
}

impl Function {
    pub fn raw(&self) -> CUfunction {
        self.raw
    }

    /// Any `cuFuncGetAttribute` value.
    pub fn attribute(&self, attr: sys::CUfunction_attribute) -> Result<i32> {
        let mut v = 0;
        check(
            // SAFETY: `raw` is a function of a module that is still loaded (modules are unloaded
            // only through the unsafe `unload`); the output is a live local.
            unsafe { sys::cuFuncGetAttribute(&mut v, attr, self.raw) },
            format_args!("cuFuncGetAttribute({attr:?})"),
        )?;
        Ok(v)
    }

    /// Loads the kernel's code now (`cuFuncLoad`, CUDA 12.4+). Under lazy loading (the default
    /// since CUDA 12.2) a kernel's first launch loads it, and that load may wait until the kernels
    /// running on the device finish: kernels that wait for each other across streams must be
    /// loaded before the first of them starts. A no-op on older drivers.
    pub fn load(&self) -> Result<()> {
        if driver()?.version() < 12040 {
            return Ok(());
        }
        // SAFETY: `raw` is a function of a loaded module (as in `attribute`); the symbol exists
        // from driver 12.4 on, checked just above.
        check(unsafe { sys::cuFuncLoad(self.raw) }, "cuFuncLoad")
    }

    /// Allows launches with up to `bytes` of dynamic shared memory
    /// (`CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`); needed above 48 KiB.
    pub fn set_max_dynamic_smem(&self, bytes: usize) -> Result<()> {
        let v = i32::try_from(bytes).map_err(|_| ep_core::invalid_arg!("{bytes} bytes of shared memory"))?;
        let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        check(
            // SAFETY: `raw` is a function of a loaded module (as in `attribute`).
            unsafe { sys::cuFuncSetAttribute(self.raw, attr, v) },
            format_args!("cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, {bytes})"),
        )
    }

    /// How many blocks of `block_threads` threads using `dynamic_smem` bytes fit on one SM.
    pub fn max_active_blocks_per_sm(&self, block_threads: u32, dynamic_smem: usize) -> Result<i32> {
        let mut n = 0;
        check(
            // SAFETY: `raw` is a function of a loaded module (as in `attribute`); the output is
            // a live local.
            unsafe {
                sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, self.raw, block_threads as i32, dynamic_smem)
            },
            "cuOccupancyMaxActiveBlocksPerMultiprocessor",
        )?;
        Ok(n)
    }
}

/// Launches `f` on `stream` (`cuLaunchKernel`). `args` holds one pointer per kernel parameter,
/// each pointing at the argument's value, as CUDA expects.
///
/// # Safety
/// The argument count and types must match the kernel, and everything the kernel touches must
/// stay valid until it has run.
pub unsafe fn launch(
    f: Function,
    grid: impl Into<Dim3>,
    block: impl Into<Dim3>,
    smem: u32,
    stream: Stream,
    args: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: launch_with's contract is this function's, which the caller upholds.
    unsafe { launch_with(f, grid.into(), block.into(), smem, stream, args, false) }
}

/// As [`launch`], but cooperative (`cuLaunchCooperativeKernel`): all blocks are co-resident, so
/// grid-wide synchronisation is allowed. The grid must fit the device at once.
///
/// # Safety
/// As [`launch`].
pub unsafe fn launch_cooperative(
    f: Function,
    grid: impl Into<Dim3>,
    block: impl Into<Dim3>,
    smem: u32,
    stream: Stream,
    args: &mut [*mut c_void],
) -> Result<()> {
    // SAFETY: launch_with's contract is this function's, which the caller upholds.
    unsafe { launch_with(f, grid.into(), block.into(), smem, stream, args, true) }
}

/// # Safety
/// As [`launch`].
unsafe fn launch_with(
    f: Function,
    g: Dim3,
    b: Dim3,
    smem: u32,
    stream: Stream,
    args: &mut [*mut c_void],
    cooperative: bool,
) -> Result<()> {
    driver()?;
    let params = if args.is_empty() {
        std::ptr::null_mut()
    } else {
        args.as_mut_ptr()
    };
    let (s, name) = (
        stream.raw(),
        if cooperative {
            "cuLaunchCooperativeKernel"
        } else {
            "cuLaunchKernel"
        },
    );
    crate::host_profile::mark("launch args");
    // SAFETY: the driver is loaded; `f` is a function of a loaded module; `params` is null for
    // no arguments or points at `args.len()` live pointers, each to a value of the matching
    // parameter type, and everything the kernel touches stays valid until it ran (the caller's
    // contract); the driver copies the values before returning; `s` is a valid stream
    // (Stream::from_raw's contract); no `extra` array.
    let r = unsafe {
        if cooperative {
            sys::cuLaunchCooperativeKernel(f.raw, g.x, g.y, g.z, b.x, b.y, b.z, smem, s, params)
        } else {
            sys::cuLaunchKernel(
                f.raw,
                g.x,
                g.y,
                g.z,
                b.x,
                b.y,
                b.z,
                smem,
                s,
                params,
                std::ptr::null_mut(),
            )
        }
    };
    crate::host_profile::mark(name);
    check(r, format_args!("{name}(grid {g:?}, block {b:?}, smem {smem})"))
}

/// Builds the `args` array of [`launch`] from references to the argument values:
/// `kernel_args![&out_ptr, &value]`.
#[macro_export]
macro_rules! kernel_args {
    ($($a:expr),* $(,)?) => { [$( ($a) as *const _ as *mut ::std::ffi::c_void ),*] };
}
