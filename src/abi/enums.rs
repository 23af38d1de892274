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

/// ncclDataType_t values (nccl.h) plus the v2 pseudo type `ncclFloat4x2` (12).
pub mod dtype {
    use super::ncclDataType_t;
    pub const INT8: ncclDataType_t = 0;
    pub const UINT8: ncclDataType_t = 1;
    pub const INT32: ncclDataType_t = 2;
    pub const UINT32: ncclDataType_t = 3;
    pub const INT64: ncclDataType_t = 4;
    pub const UINT64: ncclDataType_t = 5;
    pub const FLOAT16: ncclDataType_t = 6;
    pub const FLOAT32: ncclDataType_t = 7;
    pub const FLOAT64: ncclDataType_t = 8;
    pub const BFLOAT16: ncclDataType_t = 9;
    pub const FLOAT8E4M3: ncclDataType_t = 10;
    pub const FLOAT8E5M2: ncclDataType_t = 11;
    pub const FLOAT4X2: ncclDataType_t = 12;

    /// Bytes per element, or None for a value that is no data type.
    pub fn elem_bytes(dt: ncclDataType_t) -> Option<usize> {
        Some(match dt {
            INT8 | UINT8 | FLOAT8E4M3 | FLOAT8E5M2 | FLOAT4X2 => 1,
            FLOAT16 | BFLOAT16 => 2,
            INT32 | UINT32 | FLOAT32 => 4,
            INT64 | UINT64 | FLOAT64 => 8,
            _ => return None,
        })
    }

    pub fn name(dt: ncclDataType_t) -> &'static str {
        match dt {
            INT8 => "ncclInt8",
            UINT8 => "ncclUint8",
            INT32 => "ncclInt32",
            UINT32 => "ncclUint32",
            INT64 => "ncclInt64",
            UINT64 => "ncclUint64",
            FLOAT16 => "ncclFloat16",
            FLOAT32 => "ncclFloat32",
            FLOAT64 => "ncclFloat64",
            BFLOAT16 => "ncclBfloat16",
            FLOAT8E4M3 => "ncclFloat8e4m3",
            FLOAT8E5M2 => "ncclFloat8e5m2",
            FLOAT4X2 => "ncclFloat4x2",
            _ => "an unknown data type",
        }
    }
}

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

// ---- Rust-side enums, converted from the raw integers ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Algorithm {
    LowLatency,
    HighThroughput,
}

impl Algorithm {
    pub fn from_raw(v: ncclEpAlgorithm_t) -> Option<Self> {
        match v.0 {
            0 => Some(Self::LowLatency),
            1 => Some(Self::HighThroughput),
            _ => None,
        }
    }
    pub fn short(self) -> &'static str {
        match self {
            Self::LowLatency => "LOW_LATENCY",
            Self::HighThroughput => "HIGH_THROUGHPUT",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Layout {
    ExpertMajor,
    RankMajor,
    Flat,
}

impl Layout {
    /// `Ok(None)` is UNSET; `Err` an unknown value.
    pub fn from_raw(v: ncclEpLayout_t) -> Result<Option<Self>, c_int> {
        match v.0 {
            0 => Ok(None),
            1 => Ok(Some(Self::ExpertMajor)),
            2 => Ok(Some(Self::RankMajor)),
            3 => Ok(Some(Self::Flat)),
            x => Err(x),
        }
    }
    pub fn raw(self) -> ncclEpLayout_t {
        ncclEpLayout_t(match self {
            Self::ExpertMajor => 1,
            Self::RankMajor => 2,
            Self::Flat => 3,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::ExpertMajor => "EXPERT_MAJOR",
            Self::RankMajor => "RANK_MAJOR",
            Self::Flat => "FLAT",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PassDir {
    Forward,
    Backward,
}

impl PassDir {
    pub fn from_raw(v: ncclEpPassDir_t) -> Option<Self> {
        match v.0 {
            0 => Some(Self::Forward),
            1 => Some(Self::Backward),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ExpertIdKind {
    Local,
    Global,
}

impl ExpertIdKind {
    pub fn from_raw(v: ncclEpExpertIdKind_t) -> Option<Self> {
        match v.0 {
            0 | 1 => Some(Self::Local),
            2 => Some(Self::Global),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum OverflowPolicy {
    Trap,
    Drop,
}

impl OverflowPolicy {
    pub fn from_raw(v: ncclEpOverflowPolicy_t) -> Option<Self> {
        match v.0 {
            0 | 1 => Some(Self::Trap),
            2 => Some(Self::Drop),
            _ => None,
        }
    }
}
