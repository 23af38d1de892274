//! The caller's stream handle. Kept apart from `memory` so that `context` (which finds a
//! stream's device) and `memory` (whose owners enter contexts) do not import each other.

use std::ffi::c_void;

use super::driver::CUstream;

/// A caller's stream: a `cudaStream_t` received over the C ABI. It is the same type as the
/// driver's `CUstream`; `0` is the legacy default stream, `0x1`/`0x2` are
/// `cudaStreamLegacy`/`cudaStreamPerThread`. Never created or destroyed here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stream(CUstream);

// SAFETY: a stream handle is an opaque driver token, not memory this value owns; the driver
// accepts it from any thread (CUDA streams are not bound to the thread that created them).
unsafe impl Send for Stream {}
// SAFETY: as for `Send`: `&Stream` only hands out the same opaque token.
unsafe impl Sync for Stream {}

impl Stream {
    /// The legacy default stream (`0`), of whichever context is current.
    pub const LEGACY_DEFAULT: Stream = Stream(std::ptr::null_mut());

    /// # Safety
    /// `raw` must be a valid stream (or one of the special handles) for as long as it is used.
    pub unsafe fn from_raw(raw: *mut c_void) -> Self {
        Self(raw as CUstream)
    }

    pub fn raw(&self) -> CUstream {
        self.0
    }
}

/// Shorthand for [`Stream::from_raw`].
///
/// # Safety
/// As [`Stream::from_raw`].
pub unsafe fn stream_from_raw(raw: *mut c_void) -> Stream {
    // SAFETY: the caller upholds `Stream::from_raw`'s contract, which is this function's.
    unsafe { Stream::from_raw(raw) }
}
