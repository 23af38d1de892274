//! Fault-tolerance entry points: `ncclEpMaskQuery`, `ncclEpMaskUpdate`, `ncclEpMaskClean`,
//! `ncclEpGetAsyncError`, `ncclEpErrorClear`.

use super::guard::{ffi_call, out_ptr};
use super::objects;
use super::types::*;
use crate::runtime::group::Group;
use ep_core::enums::Algorithm;
use ep_core::error::Result;
use std::ffi::c_int;

/// Checks that the group is a low-latency group with masking enabled.
fn check_masked(g: &Group) -> Result<()> {
    ep_core::ensure_usage!(
        g.params.algorithm == Algorithm::LowLatency,
        "rank masks exist only for LOW_LATENCY groups"
    );
    ep_core::ensure_usage!(g.params.enable_mask, "the group was created with enable_mask = 0");
    Ok(())
}

/// Runs `f` on the locked group, if it is a low-latency group with masking enabled.
fn with_masked<R>(p: ncclEpGroup_t, f: impl FnOnce(&mut Group) -> Result<R>) -> Result<R> {
    objects::with_group(p, |g| {
        check_masked(g)?;
        f(g)
    })
}

/// Runs `f` on the locked group, if its async error flag can be read: LOW_LATENCY groups with
/// masking enabled (as upstream), and every HIGH_THROUGHPUT group (no masks, but timeouts and
/// overflows under graph capture raise the flag; upstream throws here).
fn with_async<R>(p: ncclEpGroup_t, f: impl FnOnce(&mut Group) -> Result<R>) -> Result<R> {
    objects::with_group(p, |g| {
        if g.params.algorithm != Algorithm::HighThroughput {
            check_masked(g)?;
        }
        f(g)
    })
}

/// Copies the active-rank mask (1 active, 0 masked) into the device array `mask_status[nranks]`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpMaskQuery(
    ep_group: ncclEpGroup_t,
    mask_status: *mut c_int,
    stream: cudaStream_t,
) -> ncclResult_t {
    ffi_call("ncclEpMaskQuery", || {
        with_masked(ep_group, |g| {
            ep_core::ensure_arg!(!mask_status.is_null(), "mask_status is NULL");
            crate::runtime::ll::mask_query(g, mask_status as u64, stream)
        })
    })
}

/// Sets the active-rank mask from the host array `mask[nranks]`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpMaskUpdate(
    ep_group: ncclEpGroup_t,
    mask: *const c_int,
    stream: cudaStream_t,
) -> ncclResult_t {
    ffi_call("ncclEpMaskUpdate", || {
        with_masked(ep_group, |g| {
            ep_core::ensure_arg!(!mask.is_null(), "mask is NULL");
            // SAFETY: `mask` is non-null and holds nranks ints (C contract of ncclEpMaskUpdate).
            let mask = unsafe { std::slice::from_raw_parts(mask, g.params.nranks as usize) };
            crate::runtime::ll::mask_update(g, mask, stream)
        })
    })
}

/// Re-admits every rank and resets the signalling state (collective over the surviving ranks;
/// synchronises `stream`).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpMaskClean(ep_group: ncclEpGroup_t, stream: cudaStream_t) -> ncclResult_t {
    ffi_call("ncclEpMaskClean", || {
        with_masked(ep_group, |g| crate::runtime::ll::mask_clean(g, stream))
    })
}

/// Reads the host-visible asynchronous error flag (1 after a peer timed out and was masked; HT:
/// also after an overflow under graph capture).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpGetAsyncError(ep_group: ncclEpGroup_t, error_out: *mut c_int) -> ncclResult_t {
    ffi_call("ncclEpGetAsyncError", || {
        with_async(ep_group, |g| {
            // SAFETY: C contract.
            let out = unsafe { out_ptr(error_out, "error_out") }?;
            // Without GPU state no kernel ran, so nothing can have timed out.
            *out = g.async_error() as c_int;
            Ok(())
        })
    })
}

/// Clears the asynchronous error flag.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpErrorClear(ep_group: ncclEpGroup_t) -> ncclResult_t {
    ffi_call("ncclEpErrorClear", || {
        with_async(ep_group, |g| {
            g.clear_async_error();
            Ok(())
        })
    })
}
