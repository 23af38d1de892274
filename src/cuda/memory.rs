//! Device memory, pinned host memory, copies and fills on the caller's stream, stream and event
//! helpers, and CUDA IPC handles.
//!
//! Raw functions work in the calling thread's current context (enter a [`CtxGuard`] first); the
//! owning types [`DeviceMem`] and [`PinnedHostMem`] remember their device and enter its primary
//! context themselves, including when they free.

use std::ffi::c_void;

use cudarc::driver::sys;

use super::context::CtxGuard;
use super::driver::{CUdeviceptr, CUevent, check, driver};
pub use super::stream::{Stream, stream_from_raw};
use ep_core::error::Result;

/// `cuMemAlloc` in the current context.
pub fn mem_alloc(bytes: usize) -> Result<CUdeviceptr> {
    driver()?;
    ep_core::ensure_arg!(bytes > 0, "device allocation of 0 bytes");
    let mut p: CUdeviceptr = 0;
    check(
        // SAFETY: the driver is loaded; it writes one address to a live local (no context
        // current is an error, not UB).
        unsafe { sys::cuMemAlloc_v2(&mut p, bytes) },
        format_args!("cuMemAlloc({bytes} bytes)"),
    )?;
    Ok(p)
}

/// `cuMemFree`.
///
/// # Safety
/// `ptr` must come from [`mem_alloc`] and not be in use by queued work.
pub unsafe fn mem_free(ptr: CUdeviceptr) -> Result<()> {
    driver()?;
    // SAFETY: the driver is loaded; `ptr` is an allocation nothing uses any more (contract).
    check(unsafe { sys::cuMemFree_v2(ptr) }, format_args!("cuMemFree({ptr:#x})"))
}

/// Fills `count` bytes with `value`, queued on `stream`.
///
/// # Safety
/// `[dst, dst + count)` must be device memory valid until the stream reaches the fill.
pub unsafe fn memset_d8_async(dst: CUdeviceptr, value: u8, count: usize, stream: Stream) -> Result<()> {
    driver()?;
    check(
        // SAFETY: the driver is loaded; the range stays valid until the stream reaches it and
        // `stream` is valid (this function's contract).
        unsafe { sys::cuMemsetD8Async(dst, value, count, stream.raw()) },
        format_args!("cuMemsetD8Async({dst:#x}, {count})"),
    )
}

/// Fills `count` 32-bit words with `value`, queued on `stream`. `dst` must be 4-byte aligned.
///
/// # Safety
/// As [`memset_d8_async`], for `4 * count` bytes.
pub unsafe fn memset_d32_async(dst: CUdeviceptr, value: u32, count: usize, stream: Stream) -> Result<()> {
    driver()?;
    ep_core::ensure_arg!(
        dst.is_multiple_of(4),
        "cuMemsetD32Async destination {dst:#x} is not 4-byte aligned"
    );
    check(
        // SAFETY: as in memset_d8_async, for the `4 * count` bytes of the contract.
        unsafe { sys::cuMemsetD32Async(dst, value, count, stream.raw()) },
        format_args!("cuMemsetD32Async({dst:#x}, {count} words)"),
    )
}

/// Host to device, queued on `stream`.
///
/// # Safety
/// Both ranges must stay valid until the copy ran; `src` should be pinned for true asynchrony.
pub unsafe fn memcpy_htod_async(dst: CUdeviceptr, src: *const c_void, bytes: usize, stream: Stream) -> Result<()> {
    driver()?;
    check(
        // SAFETY: the driver is loaded; both ranges of `bytes` stay valid until the copy ran and
        // `stream` is valid (this function's contract).
        unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src, bytes, stream.raw()) },
        format_args!("cuMemcpyHtoDAsync({bytes} bytes)"),
    )
}

/// Device to host, queued on `stream`.
///
/// # Safety
/// As [`memcpy_htod_async`].
pub unsafe fn memcpy_dtoh_async(dst: *mut c_void, src: CUdeviceptr, bytes: usize, stream: Stream) -> Result<()> {
    driver()?;
    check(
        // SAFETY: as in memcpy_htod_async.
        unsafe { sys::cuMemcpyDtoHAsync_v2(dst, src, bytes, stream.raw()) },
        format_args!("cuMemcpyDtoHAsync({bytes} bytes)"),
    )
}

/// Device to device (also peer to peer under unified addressing), queued on `stream`.
///
/// # Safety
/// As [`memcpy_htod_async`].
pub unsafe fn memcpy_dtod_async(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize, stream: Stream) -> Result<()> {
    driver()?;
    check(
        // SAFETY: as in memcpy_htod_async.
        unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream.raw()) },
        format_args!("cuMemcpyDtoDAsync({bytes} bytes)"),
    )
}

/// Host to device, returning when done (ordered after the legacy default stream).
///
/// # Safety
/// `dst` must be device memory of at least `src.len()` elements.
pub unsafe fn memcpy_htod<T: Copy>(dst: CUdeviceptr, src: &[T]) -> Result<()> {
    driver()?;
    let bytes = std::mem::size_of_val(src);
    check(
        // SAFETY: the driver is loaded; `src` is a live slice of exactly `bytes` bytes and `dst`
        // holds as many (contract); the call returns only when the copy is done.
        unsafe { sys::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), bytes) },
        format_args!("cuMemcpyHtoD({bytes} bytes)"),
    )
}

/// Device to host, returning when done (ordered after the legacy default stream).
///
/// # Safety
/// `src` must be device memory of at least `dst.len()` elements, and every bit pattern a valid `T`.
pub unsafe fn memcpy_dtoh<T: Copy>(dst: &mut [T], src: CUdeviceptr) -> Result<()> {
    driver()?;
    let bytes = std::mem::size_of_val(dst);
    check(
        // SAFETY: the driver is loaded; `dst` is a live, exclusively borrowed slice of exactly
        // `bytes` bytes, `src` holds as many and any bit pattern is a valid `T` (contract); the
        // call returns only when the copy is done.
        unsafe { sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, bytes) },
        format_args!("cuMemcpyDtoH({bytes} bytes)"),
    )
}

/// Device to device, returning when done.
///
/// # Safety
/// Both must be device ranges of `bytes`.
pub unsafe fn memcpy_dtod(dst: CUdeviceptr, src: CUdeviceptr, bytes: usize) -> Result<()> {
    driver()?;
    check(
        // SAFETY: the driver is loaded; both are device ranges of `bytes` (contract).
        unsafe { sys::cuMemcpyDtoD_v2(dst, src, bytes) },
        format_args!("cuMemcpyDtoD({bytes} bytes)"),
    )
}

/// Waits for all work queued on `stream`.
pub fn stream_synchronize(stream: Stream) -> Result<()> {
    driver()?;
    check(
        // SAFETY: the driver is loaded; `stream` is valid or a special handle (Stream::from_raw's
        // contract).
        unsafe { sys::cuStreamSynchronize(stream.raw()) },
        format_args!("cuStreamSynchronize({:p})", stream.raw()),
    )
}

/// Where a stream stands with CUDA graph capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureStatus {
    None,
    Active,
    /// Capture was started but has been invalidated by an error; ending it will fail.
    Invalidated,
}

/// `cuStreamIsCapturing`.
pub fn stream_capture_status(stream: Stream) -> Result<CaptureStatus> {
    driver()?;
    let mut s = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    check(
        // SAFETY: as in stream_synchronize; the output is a live local of the enum's type.
        unsafe { sys::cuStreamIsCapturing(stream.raw(), &mut s) },
        format_args!("cuStreamIsCapturing({:p})", stream.raw()),
    )?;
    Ok(match s {
        sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => CaptureStatus::None,
        sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE => CaptureStatus::Active,
        _ => CaptureStatus::Invalidated,
    })
}

/// True while `stream` is being captured into a CUDA graph (active or invalidated), i.e. when
/// nothing may synchronise on it.
pub fn stream_is_capturing(stream: Stream) -> Result<bool> {
    Ok(stream_capture_status(stream)? != CaptureStatus::None)
}

/// A CUDA event created in the current context (timing disabled unless asked).
#[derive(Debug)]
pub struct Event {
    raw: CUevent,
}

// SAFETY: an event handle is an opaque driver token owned by this value; the driver accepts
// it from any thread, and destroying it on another thread is allowed.
unsafe impl Send for Event {}
// SAFETY: `&Event` only records, queries, waits on or reads the token, all thread-safe driver
// calls.
unsafe impl Sync for Event {}

impl Event {
    pub fn new(timing: bool) -> Result<Self> {
        driver()?;
        let flags = if timing {
            0
        } else {
            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
        };
        let mut raw: CUevent = std::ptr::null_mut();
        // SAFETY: the driver is loaded; it writes one handle to a live local.
        check(unsafe { sys::cuEventCreate(&mut raw, flags) }, "cuEventCreate")?;
        Ok(Self { raw })
    }

    pub fn raw(&self) -> CUevent {
        self.raw
    }

    pub fn record(&self, stream: Stream) -> Result<()> {
        // SAFETY: `raw` is a live event of ours (created by `new`, which loaded the driver);
        // `stream` is valid (Stream::from_raw's contract).
        check(unsafe { sys::cuEventRecord(self.raw, stream.raw()) }, "cuEventRecord")
    }

    /// True once all work before the last record has finished.
    pub fn query(&self) -> Result<bool> {
        // SAFETY: `raw` is a live event of ours.
        let r = unsafe { sys::cuEventQuery(self.raw) };
        if r == sys::CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(r, "cuEventQuery").map(|_| true)
    }

    pub fn synchronize(&self) -> Result<()> {
        // SAFETY: `raw` is a live event of ours.
        check(unsafe { sys::cuEventSynchronize(self.raw) }, "cuEventSynchronize")
    }

    /// Makes `stream` wait for this event on the device (`cuStreamWaitEvent`).
    pub fn wait_on(&self, stream: Stream) -> Result<()> {
        check(
            // SAFETY: `raw` is a live event of ours, `stream` is valid (Stream::from_raw's
            // contract), flags 0.
            unsafe { sys::cuStreamWaitEvent(stream.raw(), self.raw, 0) },
            "cuStreamWaitEvent",
        )
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: `raw` is our live event and is destroyed once; queued records of it complete
        // anyway (cuEventDestroy allows that).
        let _ = unsafe { sys::cuEventDestroy_v2(self.raw) };
    }
}

/// Device memory owned by this crate, freed on drop in its device's primary context.
#[derive(Debug)]
pub struct DeviceMem {
    ptr: CUdeviceptr,
    bytes: usize,
    device: i32,
}

impl DeviceMem {
    /// Allocates `bytes` (not cleared) on `device`.
    pub fn alloc(device: i32, bytes: usize) -> Result<Self> {
        let _g = CtxGuard::enter(device)?;
        Ok(Self {
            ptr: mem_alloc(bytes)?,
            bytes,
            device,
        })
    }
    /// Allocates `bytes` (not cleared) on `device`, ordered on `stream` (`cuMemAllocAsync`, the
    /// device's default pool). Unlike `cuMemAlloc` this does not keep kernels of other streams
    /// queued before it from running concurrently with those queued after it (CUDA's implicit
    /// synchronisation), which ranks of a local group that wait for each other need. Freed on
    /// drop with `cuMemFree`, which waits for the device.
    pub fn alloc_async(device: i32, bytes: usize, stream: Stream) -> Result<Self> {
        driver()?;
        ep_core::ensure_arg!(bytes > 0, "device allocation of 0 bytes");
        let _g = CtxGuard::enter(device)?;
        let mut p: CUdeviceptr = 0;
        check(
            // SAFETY: the driver is loaded and the device's context current; `stream` is valid
            // (Stream::from_raw's contract); it writes one address to a live local.
            unsafe { sys::cuMemAllocAsync(&mut p, bytes, stream.raw()) },
            format_args!("cuMemAllocAsync({bytes} bytes)"),
        )?;
        Ok(Self { ptr: p, bytes, device })
    }
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.bytes
    }
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
    pub fn device(&self) -> i32 {
        self.device
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        if let Ok(_g) = CtxGuard::enter(self.device) {
            // SAFETY: `ptr` is this value's own allocation in this device's primary context (now
            // current), freed only here; cuMemFree waits for the device before it releases it,
            // so queued work that still uses it completes first.
            let _ = unsafe { mem_free(self.ptr) };
        }
    }
}

/// Page-locked host memory mapped into the device address space (`cuMemHostAlloc` with
/// `DEVICEMAP | PORTABLE`), zeroed. Suited to host-visible flags and counters.
#[derive(Debug)]
pub struct PinnedHostMem {
    host: *mut c_void,
    dev: CUdeviceptr,
    bytes: usize,
    device: i32,
}

// SAFETY: the allocation is plain (portable, pinned) memory owned by this value, freed once on
// drop from whichever thread; nothing in it is tied to a thread.
unsafe impl Send for PinnedHostMem {}
// SAFETY: `&PinnedHostMem` only touches the memory through atomics (the flag) or hands out raw
// pointers, whose use is the caller's unsafe business.
unsafe impl Sync for PinnedHostMem {}

impl PinnedHostMem {
    pub fn alloc(device: i32, bytes: usize) -> Result<Self> {
        ep_core::ensure_arg!(bytes > 0, "pinned host allocation of 0 bytes");
        let _g = CtxGuard::enter(device)?;
        let mut host: *mut c_void = std::ptr::null_mut();
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE;
        check(
            // SAFETY: the driver is loaded and the device's context current; it writes one
            // pointer to a live local.
            unsafe { sys::cuMemHostAlloc(&mut host, bytes, flags) },
            format_args!("cuMemHostAlloc({bytes} bytes)"),
        )?;
        // Built before the next call so that an error below still frees the allocation.
        let mut m = Self {
            host,
            dev: 0,
            bytes,
            device,
        };
        check(
            // SAFETY: `host` is the mapped allocation just made; flags must be 0; it writes one
            // address into `m`.
            unsafe { sys::cuMemHostGetDevicePointer_v2(&mut m.dev, host, 0) },
            "cuMemHostGetDevicePointer",
        )?;
        // SAFETY: `host` is a fresh host allocation of at least `bytes` bytes that nothing else
        // uses yet.
        unsafe { std::ptr::write_bytes(host.cast::<u8>(), 0, bytes) };
        Ok(m)
    }
    pub fn host_ptr(&self) -> *mut c_void {
        self.host
    }
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.dev
    }
    /// Reads the i32 flag at the start of the allocation (kernels raise it with atomics).
    pub fn flag_raised(&self) -> bool {
        // SAFETY: cuMemHostAlloc hands out whole, page-aligned pages, so the first 4 bytes are
        // mapped and aligned for an AtomicI32 even when fewer were asked for; the memory lives
        // as long as `self`, and host and device only touch the flag atomically.
        unsafe { (*(self.host as *const std::sync::atomic::AtomicI32)).load(std::sync::atomic::Ordering::Acquire) != 0 }
    }
    /// Raises the flag `flag_raised` reads, from the host (as a kernel would).
    pub fn raise_flag(&self) {
        // SAFETY: as in `flag_raised`.
        unsafe { (*(self.host as *const std::sync::atomic::AtomicI32)).store(1, std::sync::atomic::Ordering::Release) }
    }
    /// Clears the flag `flag_raised` reads.
    pub fn clear_flag(&self) {
        // SAFETY: as in `flag_raised`.
        unsafe { (*(self.host as *const std::sync::atomic::AtomicI32)).store(0, std::sync::atomic::Ordering::Release) }
    }
    pub fn len(&self) -> usize {
        self.bytes
    }
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

impl Drop for PinnedHostMem {
    fn drop(&mut self) {
        if let Ok(_g) = CtxGuard::enter(self.device) {
            // SAFETY: `host` is this value's own cuMemHostAlloc allocation, freed only here.
            let _ = unsafe { sys::cuMemFreeHost(self.host) };
        }
    }
}

/// A `CUipcMemHandle` as its 64 opaque bytes, ready to be sent to another process.
pub type IpcMemHandle = [u8; 64];

/// `cuIpcGetMemHandle` for the base of a `cuMemAlloc` allocation.
pub fn ipc_get_mem_handle(ptr: CUdeviceptr) -> Result<IpcMemHandle> {
    driver()?;
    let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
    check(
        // SAFETY: the driver is loaded; it writes the handle to a live local (an address that is
        // no allocation's base is an error, not UB).
        unsafe { sys::cuIpcGetMemHandle(&mut h, ptr) },
        format_args!("cuIpcGetMemHandle({ptr:#x})"),
    )?;
    Ok(h.reserved.map(|c| c as u8))
}

/// `cuIpcOpenMemHandle` (with `CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`) into the current context.
/// Close the mapping with [`ipc_close_mem_handle`].
pub fn ipc_open_mem_handle(handle: &IpcMemHandle) -> Result<CUdeviceptr> {
    driver()?;
    let h = sys::CUipcMemHandle {
        reserved: handle.map(|b| b as std::ffi::c_char),
    };
    let mut p: CUdeviceptr = 0;
    let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
    check(
        // SAFETY: the driver is loaded; the handle is passed by value and checked by the driver
        // (a bad one is an error); it writes one address to a live local.
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut p, h, flags) },
        "cuIpcOpenMemHandle",
    )?;
    Ok(p)
}

/// `cuIpcCloseMemHandle`.
///
/// # Safety
/// `ptr` must come from [`ipc_open_mem_handle`] in the current context, with no work using it.
pub unsafe fn ipc_close_mem_handle(ptr: CUdeviceptr) -> Result<()> {
    driver()?;
    check(
        // SAFETY: the driver is loaded; `ptr` is an open mapping of the current context that
        // nothing uses any more (contract).
        unsafe { sys::cuIpcCloseMemHandle(ptr) },
        format_args!("cuIpcCloseMemHandle({ptr:#x})"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_everything_is_an_error() {
        if super::super::driver::device_count().unwrap_or(0) > 0 {
            return; // covered by the GPU tests
        }
        assert!(DeviceMem::alloc(0, 16).is_err());
        assert!(PinnedHostMem::alloc(0, 16).is_err());
        assert!(stream_synchronize(Stream::LEGACY_DEFAULT).is_err());
        assert!(stream_is_capturing(Stream::LEGACY_DEFAULT).is_err());
        assert!(ipc_get_mem_handle(0).is_err());
        assert!(Event::new(false).is_err());
    }

    #[test]
    fn gpu_round_trip() {
        if super::super::driver::device_count().unwrap_or(0) == 0 {
            return;
        }
        let m = DeviceMem::alloc(0, 1024).unwrap();
        let _g = CtxGuard::enter(0).unwrap();
        let s = Stream::LEGACY_DEFAULT;
        // SAFETY: `m` holds 1024 bytes = 256 words and outlives the synchronised fill.
        unsafe { memset_d32_async(m.ptr(), 0xdead_beef, 256, s) }.unwrap();
        stream_synchronize(s).unwrap();
        let mut back = vec![0u32; 256];
        // SAFETY: `m` holds the 256 u32 `back` receives; any bits are a valid u32.
        unsafe { memcpy_dtoh(&mut back, m.ptr()) }.unwrap();
        assert!(back.iter().all(|&v| v == 0xdead_beef));
        assert!(!stream_is_capturing(s).unwrap());
        let h = PinnedHostMem::alloc(0, 64).unwrap();
        assert_ne!(h.device_ptr(), 0);
        let e = Event::new(false).unwrap();
        e.record(s).unwrap();
        e.synchronize().unwrap();
        assert!(e.query().unwrap());
        let handle = ipc_get_mem_handle(m.ptr()).unwrap();
        assert!(handle.iter().any(|&b| b != 0));
    }
}
