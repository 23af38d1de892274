//! Loading the CUDA driver, turning `CUresult` into [`Error`], and device queries.
//!
//! Every public function here (and in the sibling modules) starts with [`driver()`], so on a machine
//! without `libcuda.so.1` it returns an error instead of reaching cudarc's loader, which panics.

use std::ffi::CStr;
use std::sync::OnceLock;

use cudarc::driver::sys;

use ep_core::error::{Error, ErrorKind, Result};

pub use sys::{CUcontext, CUdevice, CUdeviceptr, CUevent, CUfunction, CUmodule, CUresult, CUstream};

/// Every driver entry point this crate calls. [`driver()`] checks that each is exported before any
/// is used, because cudarc's lazy loader panics on a missing symbol. Add new ones here.
const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDeviceCanAccessPeer",
    "cuDevicePrimaryCtxRetain",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxGetDevice",
    "cuCtxEnablePeerAccess",
    "cuStreamGetCtx",
    "cuStreamSynchronize",
    "cuStreamIsCapturing",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemsetD8Async",
    "cuMemsetD32Async",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuMemcpyDtoD_v2",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemHostAlloc",
    "cuMemHostGetDevicePointer_v2",
    "cuMemFreeHost",
    "cuIpcGetMemHandle",
    "cuIpcOpenMemHandle_v2",
    "cuIpcCloseMemHandle",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuFuncSetAttribute",
    "cuFuncGetAttribute",
    "cuOccupancyMaxActiveBlocksPerMultiprocessor",
    "cuLaunchKernel",
    "cuLaunchCooperativeKernel",
    "cuCtxSynchronize",
    "cuMemAllocAsync",
    // Not checked: cuFuncLoad (CUDA 12.4), called only when the driver reports 12.4 or newer.
];

/// The loaded and initialised driver.
#[derive(Debug)]
pub struct Driver {
    version: i32,
}

impl Driver {
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub fn version(&self) -> i32 {
        self.version
    }
}

/// Loads `libcuda` and calls `cuInit(0)` once per process. The outcome, success or failure, is
/// remembered: a machine without a driver answers the same error every time, cheaply.
pub fn driver() -> Result<&'static Driver> {
    static DRIVER: OnceLock<std::result::Result<Driver, Error>> = OnceLock::new();
    DRIVER.get_or_init(load_driver).as_ref().map_err(Clone::clone)
}

/// True when the driver is loaded and initialised.
pub fn driver_available() -> bool {
    driver().is_ok()
}

fn load_driver() -> std::result::Result<Driver, Error> {
    // SAFETY: is_culib_present only dlopens and dlcloses cudarc's candidate names for libcuda;
    // the driver's initialisers have no preconditions on us.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::new(
            ErrorKind::System,
            "the CUDA driver library (libcuda.so.1) could not be loaded: no NVIDIA driver on this machine?",
        ));
    }
    // culib() cannot panic now that a candidate opened, unless the library vanished in between.
    // SAFETY: as for is_culib_present: it opens the same library, and keeps it open.
    let lib = std::panic::catch_unwind(|| unsafe { sys::culib() })
        .map_err(|_| Error::new(ErrorKind::System, "the CUDA driver library could not be loaded"))?;
    for name in SYMBOLS {
        // SAFETY: the symbol is only looked up, as a plain address; nothing reads or calls it.
        if unsafe { lib.get::<*const std::ffi::c_void>(name.as_bytes()) }.is_err() {
            return Err(Error::new(
                ErrorKind::System,
                format!("the CUDA driver is too old: it does not export {name}"),
            ));
        }
    }
    // SAFETY: every symbol we call exists (checked above); cuInit takes flags 0 and nothing else.
    check(unsafe { sys::cuInit(0) }, "cuInit")?;
    let mut version = 0;
    // SAFETY: the driver is loaded; it writes one int to a live local.
    check(unsafe { sys::cuDriverGetVersion(&mut version) }, "cuDriverGetVersion")?;
    Ok(Driver { version })
}

/// The symbolic name and description of a driver error, e.g.
/// `CUDA_ERROR_OUT_OF_MEMORY (out of memory)`. Only call with the driver loaded.
pub(crate) fn error_text(r: CUresult) -> String {
    let mut name: *const std::ffi::c_char = std::ptr::null();
    let mut desc: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver is loaded (this function's precondition); both functions only write a
    // pointer to a static string into a live local, or fail (for an unknown code) and leave it.
    let (rn, rd) = unsafe { (sys::cuGetErrorName(r, &mut name), sys::cuGetErrorString(r, &mut desc)) };
    let code = r as u32;
    let name = if rn == CUresult::CUDA_SUCCESS && !name.is_null() {
        // SAFETY: on success `name` points to a NUL-terminated static string of the driver.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    } else {
        format!("CUDA error {code}")
    };
    if rd == CUresult::CUDA_SUCCESS && !desc.is_null() {
        // SAFETY: as for `name`.
        format!("{name} ({})", unsafe { CStr::from_ptr(desc) }.to_string_lossy())
    } else {
        name
    }
}

/// `Ok(())` for `CUDA_SUCCESS`, otherwise an [`ErrorKind::Cuda`] error naming the call.
pub(crate) fn check(r: CUresult, what: impl std::fmt::Display) -> Result<()> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(cuda_error(r, what))
    }
}

pub(crate) fn cuda_error(r: CUresult, what: impl std::fmt::Display) -> Error {
    Error::new(ErrorKind::Cuda, format!("{what} failed: {}", error_text(r)))
}

/// Number of visible devices (`cuDeviceGetCount`).
pub fn device_count() -> Result<i32> {
    driver()?;
    let mut n = 0;
    // SAFETY: the driver is loaded and initialised (driver() above); it writes one int.
    check(unsafe { sys::cuDeviceGetCount(&mut n) }, "cuDeviceGetCount")?;
    Ok(n)
}

/// The `CUdevice` of an ordinal, with a readable error when it is out of range.
pub fn cu_device(ordinal: i32) -> Result<CUdevice> {
    let n = device_count()?;
    if ordinal < 0 || ordinal >= n {
        return Err(ep_core::invalid_arg!(
            "CUDA device {ordinal} does not exist ({n} visible)"
        ));
    }
    let mut dev = 0;
    check(
        // SAFETY: the driver is loaded (device_count succeeded); the ordinal is in range and the
        // output is a live local.
        unsafe { sys::cuDeviceGet(&mut dev, ordinal) },
        format_args!("cuDeviceGet({ordinal})"),
    )?;
    Ok(dev)
}

/// Any `cuDeviceGetAttribute` value.
pub fn device_attribute(ordinal: i32, attr: sys::CUdevice_attribute) -> Result<i32> {
    let dev = cu_device(ordinal)?;
    let mut v = 0;
    check(
        // SAFETY: the driver is loaded and `dev` is a valid device (cu_device); the attribute is
        // a value of the enum the driver declares; the output is a live local.
        unsafe { sys::cuDeviceGetAttribute(&mut v, attr, dev) },
        format_args!("cuDeviceGetAttribute({attr:?}, device {ordinal})"),
    )?;
    Ok(v)
}

/// Number of streaming multiprocessors.
pub fn sm_count(ordinal: i32) -> Result<i32> {
    device_attribute(
        ordinal,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
    )
}

/// Compute capability `(major, minor)`, e.g. `(9, 0)` for H100/H200.
pub fn compute_capability(ordinal: i32) -> Result<(i32, i32)> {
    use sys::CUdevice_attribute::*;
    Ok((
        device_attribute(ordinal, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
        device_attribute(ordinal, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
    ))
}

/// The largest dynamic shared memory a block may opt into (`..._MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`).
pub fn max_smem_per_block_optin(ordinal: i32) -> Result<i32> {
    device_attribute(
        ordinal,
        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
    )
}

/// Whether device `a` can map memory of device `b` (`cuDeviceCanAccessPeer`). `a == b` is true.
pub fn can_access_peer(a: i32, b: i32) -> Result<bool> {
    let (da, db) = (cu_device(a)?, cu_device(b)?);
    if a == b {
        return Ok(true);
    }
    let mut v = 0;
    check(
        // SAFETY: the driver is loaded and both devices are valid (cu_device); the output is a
        // live local.
        unsafe { sys::cuDeviceCanAccessPeer(&mut v, da, db) },
        format_args!("cuDeviceCanAccessPeer({a}, {b})"),
    )?;
    Ok(v != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds with and without a GPU: the answer is an error or a sane value, never a panic.
    #[test]
    fn queries_never_panic() {
        match driver() {
            Ok(d) => {
                assert!(d.version() > 0);
                let n = device_count().unwrap();
                assert!(cu_device(n).is_err());
                if n > 0 {
                    let (major, _) = compute_capability(0).unwrap();
                    assert!(major >= 3);
                    assert!(sm_count(0).unwrap() > 0);
                    assert!(can_access_peer(0, 0).unwrap());
                }
            }
            Err(e) => {
                // System: no libcuda; Cuda: cuInit failed (a driver without a usable GPU).
                assert!(matches!(e.kind, ErrorKind::System | ErrorKind::Cuda), "{e}");
                assert!(!e.msg.is_empty());
                assert_eq!(driver().unwrap_err(), e, "the failure is remembered");
                assert!(device_count().is_err());
                assert!(compute_capability(0).is_err());
                assert!(can_access_peer(0, 1).is_err());
            }
        }
    }
}
