//! Enumerations and constants of the public API.
//!
//! The `*Values` enums exist for the header: cbindgen emits them as the C enums `ncclEp*_t`
//! (see `cbindgen*.toml`). Rust code receives enums as integers and converts them with the
//! `from_raw` helpers below, which reject unknown values.
#![allow(non_camel_case_types, clippy::upper_case_acronyms)]

use super::types::*;
use std::ffi::c_int;

pub const NCCL_EP_MAGIC: u32 = 0xC00F_FFEE;
pub const NCCL_EP_TENSOR_MAGIC: u32 = 0xCAFE_CAFE;
/// Written by `ncclEpTensorAlloc` into descriptors the library owns (upstream's value).
pub const NCCL_EP_TENSOR_ALLOC_MAGIC: u32 = 0xBEEF_BEEF;
pub const NCCL_EP_VERSION_CODE: c_int = 100;
pub const NCCL_EP_API_VERSION: u32 = 2;
pub const NCCL_EP_AUTO: u32 = 0;

// ncclResult_t values (nccl.h).
pub const NCCL_SUCCESS: ncclResult_t = 0;
pub const NCCL_UNHANDLED_CUDA_ERROR: ncclResult_t = 1;
pub const NCCL_SYSTEM_ERROR: ncclResult_t = 2;
pub const NCCL_INTERNAL_ERROR: ncclResult_t = 3;
pub const NCCL_INVALID_ARGUMENT: ncclResult_t = 4;
pub const NCCL_INVALID_USAGE: ncclResult_t = 5;
pub const NCCL_REMOTE_ERROR: ncclResult_t = 6;
pub const NCCL_TIMEOUT: ncclResult_t = 8;

// ---- C enums for the header (see module comment) ----

#[repr(C)]
pub enum ncclEpAlgorithmValues {
    NCCL_EP_ALGO_LOW_LATENCY = 0,
    NCCL_EP_ALGO_HIGH_THROUGHPUT = 1,
}

#[repr(C)]
pub enum ncclEpLayoutValues {
    NCCL_EP_LAYOUT_UNSET = 0,
    NCCL_EP_LAYOUT_EXPERT_MAJOR = 1,
    NCCL_EP_LAYOUT_RANK_MAJOR = 2,
    NCCL_EP_LAYOUT_FLAT = 3,
}

#[repr(C)]
pub enum ncclEpPassDirValues {
    NCCL_EP_FWD_PASS = 0,
    NCCL_EP_BWD_PASS = 1,
}

#[repr(C)]
pub enum ncclEpZeroCopyModeValues {
    NCCL_EP_ZERO_COPY_AUTO = 0,
    NCCL_EP_ZERO_COPY_OFF = 1,
    NCCL_EP_ZERO_COPY_ON = 2,
}

#[repr(C)]
pub enum ncclEpOverflowPolicyValues {
    NCCL_EP_OVERFLOW_AUTO = 0,
    NCCL_EP_OVERFLOW_TRAP = 1,
    NCCL_EP_OVERFLOW_DROP = 2,
}

#[repr(C)]
pub enum ncclEpExpertIdKindValues {
    NCCL_EP_EXPERT_ID_AUTO = 0,
    NCCL_EP_EXPERT_ID_LOCAL = 1,
    NCCL_EP_EXPERT_ID_GLOBAL = 2,
}

#[repr(C)]
pub enum ncclEpDispQuantValues {
    NCCL_EP_DISP_QUANT_NONE = 0,
    NCCL_EP_DISP_QUANT_FWD = 1,
    NCCL_EP_DISP_QUANT_DS_FP8E3M4 = 2,
}

#[repr(C)]
pub enum ncclEpCombQuantValues {
    NCCL_EP_COMB_QUANT_NONE = 0,
    NCCL_EP_COMB_QUANT_NVFP4 = 1,
}

// The Rust-side enums are the core's (`ep_core::enums`); src/abi converts the integers above
// into them (`from_raw`) and back (`raw`).
