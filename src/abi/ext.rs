//! Our extensions (`ncclEpx*`, declared in `include/nccl_ep_ext.h`).

use std::ffi::c_char;

/// The message of the last failed `ncclEp*`/`ncclEpx*` call on this thread ("" if none).
/// The string stays valid until the next failing call on the same thread.
#[unsafe(no_mangle)]
pub extern "C" fn ncclEpxGetLastError() -> *const c_char {
    super::guard::last_error_ptr()
}
