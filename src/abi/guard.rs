//! What every `extern "C"` body goes through: one panic boundary, the per-thread last-error
//! message, `NCCL_EP_DEBUG` logging, and checked reads of caller structs (the struct-size rule).

use super::enums::{NCCL_EP_MAGIC, NCCL_INTERNAL_ERROR, NCCL_SUCCESS};
use super::types::*;
use ep_core::error::{Error, ErrorKind, Result};
use std::cell::RefCell;
use std::ffi::{CString, c_char};
use std::mem::{MaybeUninit, size_of};
use std::panic::{AssertUnwindSafe, catch_unwind};

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub use crate::log::{debug_level, log_info, log_warn};

fn record(func: &str, err: &Error) {
    let text = format!("{func}: {}", err.msg);
    log_warn(&text);
    let c = CString::new(text.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Pointer to this thread's last error message (valid until the next failure on this thread).
pub fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs one C entry point: panics become `ncclInternalError`, errors their code, and both leave
/// a message for `ncclEpxGetLastError`.
pub fn ffi_call(func: &'static str, body: impl FnOnce() -> Result<()>) -> ncclResult_t {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => NCCL_SUCCESS,
        Ok(Err(e)) => {
            record(func, &e);
            e.code()
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            record(
                func,
                &Error::new(ErrorKind::Internal, format!("internal error (panic): {what}")),
            );
            NCCL_INTERNAL_ERROR
        }
    }
}

/// A public struct that starts with `{unsigned size; unsigned magic;}`.
pub trait VersionedStruct: Copy {
    const NAME: &'static str;
    /// The smallest size any caller (API v1 or later) may pass.
    const V1_SIZE: u32;
}

macro_rules! versioned {
    ($($t:ty => $v1:expr),* $(,)?) => {$(
        impl VersionedStruct for $t {
            const NAME: &'static str = stringify!($t);
            const V1_SIZE: u32 = $v1;
        }
    )*};
}
versioned!(
    ncclEpTensorAllocConfig_t => 8,
    ncclEpGroupConfig_t => 96,
    ncclEpLayoutInfo_t => 40,
    ncclEpDispatchInputs_t => 32,
    ncclEpDispatchOutputs_t => 40,
    ncclEpCombineInputs_t => 24,
    ncclEpCombineOutputs_t => 24,
    ncclEpHandleConfig_t => 16,
    ncclEpDispatchConfig_t => 20,
    ncclEpCombineConfig_t => 16,
    ncclEpCompleteConfig_t => 8,
);

/// The zero default of a struct with its header filled in (what the INIT macros produce).
pub fn struct_default<T: VersionedStruct>() -> T {
    // SAFETY: every VersionedStruct is plain old data whose all-zero bit pattern is valid
    // (integers, raw pointers, Option<fn>), and the first two u32s are size and magic.
    unsafe {
        let mut v = MaybeUninit::<T>::zeroed();
        let p = v.as_mut_ptr() as *mut u32;
        p.write(size_of::<T>() as u32);
        p.add(1).write(NCCL_EP_MAGIC);
        v.assume_init()
    }
}

/// Reads an optional caller struct by the struct-size rule: NULL gives `None`; a size below the
/// V1 size or a wrong magic is an error; otherwise `min(size, sizeof)` bytes are copied over the
/// defaults, so fields past the caller's size read as defaults and a larger future tail is ignored.
///
/// # Safety
/// `p` is NULL or points at least `p->size` readable bytes (the C contract).
pub unsafe fn read_opt<T: VersionedStruct>(p: *const T, arg: &str) -> Result<Option<T>> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: the caller promises p points at a struct that starts with size and magic.
    let (size, magic) = unsafe {
        (
            (p as *const u32).read_unaligned(),
            (p as *const u32).add(1).read_unaligned(),
        )
    };
    if size < T::V1_SIZE {
        return Err(ep_core::invalid_arg!(
            "{arg}: {}.size is {size}, smaller than the smallest valid size {} (initialise it with its INIT macro)",
            T::NAME,
            T::V1_SIZE
        ));
    }
    if magic != NCCL_EP_MAGIC {
        return Err(ep_core::invalid_arg!(
            "{arg}: {}.magic is {magic:#010x}, expected {NCCL_EP_MAGIC:#010x} (initialise it with its INIT macro)",
            T::NAME
        ));
    }
    let mut out = struct_default::<T>();
    let n = (size as usize).min(size_of::<T>());
    // SAFETY: n bytes are readable at p (size >= n) and writable in out; T is plain old data.
    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, &mut out as *mut T as *mut u8, n) };
    // SAFETY: out is T-sized; restore the header to the current values.
    unsafe {
        let h = &mut out as *mut T as *mut u32;
        h.write(size_of::<T>() as u32);
        h.add(1).write(NCCL_EP_MAGIC);
    }
    Ok(Some(out))
}

/// Like [`read_opt`] for a struct the function requires.
///
/// # Safety
/// As [`read_opt`].
pub unsafe fn read_req<T: VersionedStruct>(p: *const T, arg: &str) -> Result<T> {
    // SAFETY: forwarded contract.
    unsafe { read_opt(p, arg) }?.ok_or_else(|| ep_core::invalid_arg!("{arg} is NULL ({} required)", T::NAME))
}

/// Checks an out-pointer argument and gives it back as a mutable reference.
///
/// # Safety
/// `p` is NULL or valid for writes of `T`.
pub unsafe fn out_ptr<'a, T>(p: *mut T, arg: &str) -> Result<&'a mut T> {
    // SAFETY: non-NULL out-pointers are writable by the C contract.
    unsafe { p.as_mut() }.ok_or_else(|| ep_core::invalid_arg!("{arg} is NULL"))
}
