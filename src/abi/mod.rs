//! The C ABI: `#[repr(C)]` types and thin `extern "C"` functions. Each body runs inside
//! [`guard::ffi_call`], reads caller memory only through the checked helpers, and calls the core.
//!
//! Safety contract of every `extern "C"` function here: each pointer argument is NULL or valid
//! for what the C API documents (structs for their `size` bytes, tensors' `sizes` for `ndim`).
#![allow(clippy::missing_safety_doc)]

pub mod convert;
pub mod enums;
pub mod ext;
pub mod group;
pub mod guard;
pub mod handle;
pub mod mask;
pub mod objects;
pub mod ops;
pub mod tensor;
pub mod types;

use guard::{ffi_call, out_ptr};
use std::ffi::c_int;
use types::ncclResult_t;

/// The version banner nccl4py looks for in the file (CUDA major of the kernels' toolchain).
#[used]
#[unsafe(no_mangle)]
pub static NCCL_EP_VERSION_BANNER: [u8; 31] = *b"NCCL EP version 0.1.0+cuda13.0\0";

extern "C" fn print_banner_at_load() {
    if guard::debug_level() > 0 {
        eprintln!("{}", std::str::from_utf8(&NCCL_EP_VERSION_BANNER[..30]).unwrap_or(""));
    }
}

/// Upstream prints its banner from an ELF constructor when NCCL_EP_DEBUG is set; so do we.
#[used]
#[unsafe(link_section = ".init_array")]
static PRINT_BANNER: extern "C" fn() = print_banner_at_load;

/// Reports the library version as `MAJOR*10000 + MINOR*100 + PATCH` (100 for 0.1.0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpGetVersion(version: *mut c_int) -> ncclResult_t {
    ffi_call("ncclEpGetVersion", || {
        // SAFETY: C contract.
        *unsafe { out_ptr(version, "version") }? = enums::NCCL_EP_VERSION_CODE;
        Ok(())
    })
}
