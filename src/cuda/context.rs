//! Primary contexts, the scope guard that makes one current, and finding a stream's device.
//!
//! The library works in each device's **primary context**, the one the CUDA runtime (and so
//! PyTorch) uses. It is retained once per device per process and never released, so nothing this
//! crate does can tear down a context under the caller. [`CtxGuard`] makes it current for a scope
//! and puts the caller's previous context (possibly none) back when dropped.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::OnceLock;

use parking_lot::Mutex;

use cudarc::driver::sys;

use super::driver::{CUcontext, check, cu_device, driver};
use super::stream::Stream;
use ep_core::error::Result;

/// device ordinal -> retained primary context (stored as an address).
fn primaries() -> &'static Mutex<HashMap<i32, usize>> {
    static P: OnceLock<Mutex<HashMap<i32, usize>>> = OnceLock::new();
    P.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The primary context of a device, retained on first use and kept for the life of the process.
pub fn primary_context(device: i32) -> Result<CUcontext> {
    driver()?;
    let mut map = primaries().lock();
    if let Some(&c) = map.get(&device) {
        return Ok(c as CUcontext);
    }
    let dev = cu_device(device)?;
    let mut ctx: CUcontext = std::ptr::null_mut();
    check(
        // SAFETY: the driver is loaded, `dev` is valid (cu_device) and the output a live local.
        unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) },
        format_args!("cuDevicePrimaryCtxRetain(device {device})"),
    )?;
    map.insert(device, ctx as usize);
    Ok(ctx)
}

/// The device of an already retained primary context, without calling the driver.
fn known_primary_device(ctx: CUcontext) -> Option<i32> {
    let map = primaries().lock();
    map.iter().find(|&(_, &c)| c == ctx as usize).map(|(&d, _)| d)
}

/// The context current on the calling thread (null when none).
pub fn current_context() -> Result<CUcontext> {
    driver()?;
    let mut ctx: CUcontext = std::ptr::null_mut();
    // SAFETY: the driver is loaded; it writes one handle (or null) to a live local.
    check(unsafe { sys::cuCtxGetCurrent(&mut ctx) }, "cuCtxGetCurrent")?;
    Ok(ctx)
}

/// The device of the calling thread's current context, or `None` when no context is current.
pub fn current_device() -> Result<Option<i32>> {
    if current_context()?.is_null() {
        return Ok(None);
    }
    let mut dev = 0;
    // SAFETY: the driver is loaded and a context is current; it writes one int.
    check(unsafe { sys::cuCtxGetDevice(&mut dev) }, "cuCtxGetDevice")?;
    Ok(Some(dev))
}

/// Makes a context current for its lifetime and restores the previous one on drop. Not `Send`:
/// the current context is per thread.
#[must_use = "the context is only current while the guard lives"]
pub struct CtxGuard {
    ctx: CUcontext,
    prev: CUcontext,
    device: i32,
    _thread_bound: PhantomData<*mut ()>,
}

impl CtxGuard {
    /// Makes `device`'s primary context current (retaining it on first use).
    pub fn enter(device: i32) -> Result<Self> {
        let ctx = primary_context(device)?;
        // SAFETY: `ctx` is `device`'s primary context, retained by primary_context and never
        // released, so it stays valid for the whole process, hence for the guard's lifetime.
        unsafe { Self::enter_raw(ctx, device) }
    }

    /// # Safety
    /// `ctx` must be a valid context of `device` for the guard's lifetime.
    unsafe fn enter_raw(ctx: CUcontext, device: i32) -> Result<Self> {
        let prev = current_context()?;
        if prev != ctx {
            // SAFETY: the driver is loaded (current_context succeeded) and `ctx` is a live
            // context (this function's contract).
            check(unsafe { sys::cuCtxSetCurrent(ctx) }, "cuCtxSetCurrent")?;
        }
        Ok(Self {
            ctx,
            prev,
            device,
            _thread_bound: PhantomData,
        })
    }

    pub fn device(&self) -> i32 {
        self.device
    }

    pub fn context(&self) -> CUcontext {
        self.ctx
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        if self.prev != self.ctx {
            // Nothing sensible can be done if this fails; the driver is in a bad state anyway.
            // SAFETY: the driver is loaded (the guard exists); `prev` was current on this thread
            // when the guard was made (the guard is not Send) and is null or a context the
            // caller keeps alive while it is current, as CUDA requires of it.
            let _ = unsafe { sys::cuCtxSetCurrent(self.prev) };
        }
    }
}

/// Runs `f` with `device`'s primary context current.
pub fn with_device<T>(device: i32, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let _g = CtxGuard::enter(device)?;
    f()
}

/// The context a stream belongs to (`cuStreamGetCtx`). For the special handles `0`
/// (legacy default), `0x1` (`cudaStreamLegacy`) and `0x2` (`cudaStreamPerThread`) this is the
/// calling thread's current context, and an error when none is current.
pub fn stream_context(stream: Stream) -> Result<CUcontext> {
    driver()?;
    let mut ctx: CUcontext = std::ptr::null_mut();
    check(
        // SAFETY: the driver is loaded; `stream` is valid or a special handle (Stream::from_raw's
        // contract) and the output a live local.
        unsafe { sys::cuStreamGetCtx(stream.raw(), &mut ctx) },
        format_args!("cuStreamGetCtx({:p})", stream.raw()),
    )?;
    Ok(ctx)
}

/// The device ordinal of the context `ctx` (briefly making it current if it is not).
///
/// # Safety
/// `ctx` must be a live context.
pub unsafe fn context_device(ctx: CUcontext) -> Result<i32> {
    if let Some(d) = known_primary_device(ctx) {
        return Ok(d);
    }
    // SAFETY: `ctx` is live (this function's contract) for the guard's short life; the device
    // -1 is only stored, never used, by the guard.
    let _g = unsafe { CtxGuard::enter_raw(ctx, -1) }?;
    let mut dev = 0;
    // SAFETY: the driver is loaded and `ctx` is current; it writes one int.
    check(unsafe { sys::cuCtxGetDevice(&mut dev) }, "cuCtxGetDevice")?;
    Ok(dev)
}

/// The device a stream runs on.
pub fn stream_device(stream: Stream) -> Result<i32> {
    // SAFETY: cuStreamGetCtx just returned the context of a live stream, and a stream's context
    // lives at least as long as the stream.
    unsafe { context_device(stream_context(stream)?) }
}

/// Fails with InvalidArgument unless `stream` runs on `device`.
pub fn ensure_stream_on_device(stream: Stream, device: i32) -> Result<()> {
    let d = stream_device(stream)?;
    ep_core::ensure_arg!(
        d == device,
        "stream {:p} belongs to CUDA device {d}, expected device {device}",
        stream.raw()
    );
    Ok(())
}

/// Lets the current context of `device` access memory of `peer` (`cuCtxEnablePeerAccess`); doing
/// it twice is fine.
pub fn enable_peer_access(device: i32, peer: i32) -> Result<()> {
    ep_core::ensure_arg!(device != peer, "peer access from device {device} to itself");
    let peer_ctx = primary_context(peer)?;
    let _g = CtxGuard::enter(device)?;
    // SAFETY: the driver is loaded; `peer_ctx` is a retained primary context (valid for the
    // process) and the flags must be 0.
    let r = unsafe { sys::cuCtxEnablePeerAccess(peer_ctx, 0) };
    if r == sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
        return Ok(());
    }
    check(
        r,
        format_args!("cuCtxEnablePeerAccess(device {device} -> device {peer})"),
    )
}

/// Waits for all work of the current context (used before freeing memory peers may still use).
pub fn synchronize_current() -> Result<()> {
    driver()?;
    // SAFETY: the driver is loaded; no arguments (no context current is an error, not UB).
    check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_restores_previous_context() {
        if driver().is_err() || super::super::driver::device_count().unwrap_or(0) == 0 {
            assert!(CtxGuard::enter(0).is_err());
            assert!(current_device().is_err() || driver().is_ok());
            return;
        }
        let before = current_context().unwrap();
        {
            let g = CtxGuard::enter(0).unwrap();
            assert_eq!(current_context().unwrap(), g.context());
            assert_eq!(current_device().unwrap(), Some(0));
            {
                let _inner = CtxGuard::enter(0).unwrap();
            }
            assert_eq!(current_context().unwrap(), g.context());
        }
        assert_eq!(current_context().unwrap(), before);
    }
}
