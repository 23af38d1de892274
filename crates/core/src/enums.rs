//! The domain's enumerations. The C ABI receives each as a plain integer; `src/abi` converts it
//! with the `from_raw` functions here, which say which values exist (unknown ones are `None` or
//! `Err(value)`), and back with `raw` where a value returns to C.

/// The two modes of a group.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Algorithm {
    LowLatency,
    HighThroughput,
}

impl Algorithm {
    /// `NCCL_EP_ALGO_LOW_LATENCY` (0) or `NCCL_EP_ALGO_HIGH_THROUGHPUT` (1).
    pub fn from_raw(v: i32) -> Option<Self> {
        match v {
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

/// How received tokens are arranged.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum Layout {
    ExpertMajor,
    RankMajor,
    Flat,
}

impl Layout {
    /// `Ok(None)` is `NCCL_EP_LAYOUT_UNSET` (0); `Err` an unknown value.
    pub fn from_raw(v: i32) -> Result<Option<Self>, i32> {
        match v {
            0 => Ok(None),
            1 => Ok(Some(Self::ExpertMajor)),
            2 => Ok(Some(Self::RankMajor)),
            3 => Ok(Some(Self::Flat)),
            x => Err(x),
        }
    }
    pub fn raw(self) -> i32 {
        match self {
            Self::ExpertMajor => 1,
            Self::RankMajor => 2,
            Self::Flat => 3,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::ExpertMajor => "EXPERT_MAJOR",
            Self::RankMajor => "RANK_MAJOR",
            Self::Flat => "FLAT",
        }
    }
}

/// Forward (dispatch tokens, combine results) or backward (gradients the other way) pass.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum PassDir {
    Forward,
    Backward,
}

impl PassDir {
    pub fn from_raw(v: i32) -> Option<Self> {
        match v {
            0 => Some(Self::Forward),
            1 => Some(Self::Backward),
            _ => None,
        }
    }
}

/// Whether received expert ids are numbered within the rank or across the group.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum ExpertIdKind {
    Local,
    Global,
}

impl ExpertIdKind {
    /// AUTO (0) is LOCAL, as in NCCL EP v2.
    pub fn from_raw(v: i32) -> Option<Self> {
        match v {
            0 | 1 => Some(Self::Local),
            2 => Some(Self::Global),
            _ => None,
        }
    }
}

/// What a receive budget overflow does.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum OverflowPolicy {
    Trap,
    Drop,
}

impl OverflowPolicy {
    /// AUTO (0) is TRAP.
    pub fn from_raw(v: i32) -> Option<Self> {
        match v {
            0 | 1 => Some(Self::Trap),
            2 => Some(Self::Drop),
            _ => None,
        }
    }
}

/// A data type of NCCL (`ncclDataType_t`'s values) plus v2's packed FP4 pair.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum DType {
    Int8,
    Uint8,
    Int32,
    Uint32,
    Int64,
    Uint64,
    Float16,
    Float32,
    Float64,
    Bfloat16,
    Float8E4M3,
    Float8E5M2,
    /// Two FP4 E2M1 values in one byte (`ncclFloat4x2`, 12).
    Float4x2,
}

impl DType {
    pub const ALL: [DType; 13] = [
        Self::Int8,
        Self::Uint8,
        Self::Int32,
        Self::Uint32,
        Self::Int64,
        Self::Uint64,
        Self::Float16,
        Self::Float32,
        Self::Float64,
        Self::Bfloat16,
        Self::Float8E4M3,
        Self::Float8E5M2,
        Self::Float4x2,
    ];
    /// The type with this `ncclDataType_t` value; `None` for a value that is no data type.
    pub fn from_raw(v: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.raw() == v)
    }
    /// The `ncclDataType_t` value.
    pub const fn raw(self) -> i32 {
        match self {
            Self::Int8 => 0,
            Self::Uint8 => 1,
            Self::Int32 => 2,
            Self::Uint32 => 3,
            Self::Int64 => 4,
            Self::Uint64 => 5,
            Self::Float16 => 6,
            Self::Float32 => 7,
            Self::Float64 => 8,
            Self::Bfloat16 => 9,
            Self::Float8E4M3 => 10,
            Self::Float8E5M2 => 11,
            Self::Float4x2 => 12,
        }
    }
    /// Bytes per element (an `ncclFloat4x2` element is one byte holding two values).
    pub const fn elem_bytes(self) -> usize {
        match self {
            Self::Int8 | Self::Uint8 | Self::Float8E4M3 | Self::Float8E5M2 | Self::Float4x2 => 1,
            Self::Float16 | Self::Bfloat16 => 2,
            Self::Int32 | Self::Uint32 | Self::Float32 => 4,
            Self::Int64 | Self::Uint64 | Self::Float64 => 8,
        }
    }
    /// The name NCCL's header gives it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Int8 => "ncclInt8",
            Self::Uint8 => "ncclUint8",
            Self::Int32 => "ncclInt32",
            Self::Uint32 => "ncclUint32",
            Self::Int64 => "ncclInt64",
            Self::Uint64 => "ncclUint64",
            Self::Float16 => "ncclFloat16",
            Self::Float32 => "ncclFloat32",
            Self::Float64 => "ncclFloat64",
            Self::Bfloat16 => "ncclBfloat16",
            Self::Float8E4M3 => "ncclFloat8e4m3",
            Self::Float8E5M2 => "ncclFloat8e5m2",
            Self::Float4x2 => "ncclFloat4x2",
        }
    }
}

impl From<DType> for i32 {
    fn from(d: DType) -> i32 {
        d.raw()
    }
}

/// Short names for the data types, as the rules and tests spell them.
pub mod dtype {
    use super::DType;
    pub const INT8: DType = DType::Int8;
    pub const UINT8: DType = DType::Uint8;
    pub const INT32: DType = DType::Int32;
    pub const UINT32: DType = DType::Uint32;
    pub const INT64: DType = DType::Int64;
    pub const UINT64: DType = DType::Uint64;
    pub const FLOAT16: DType = DType::Float16;
    pub const FLOAT32: DType = DType::Float32;
    pub const FLOAT64: DType = DType::Float64;
    pub const BFLOAT16: DType = DType::Bfloat16;
    pub const FLOAT8E4M3: DType = DType::Float8E4M3;
    pub const FLOAT8E5M2: DType = DType::Float8E5M2;
    pub const FLOAT4X2: DType = DType::Float4x2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_values_round_trip_and_unknown_values_are_refused() {
        for (i, d) in DType::ALL.into_iter().enumerate() {
            assert_eq!(d.raw(), i as i32);
            assert_eq!(DType::from_raw(i as i32), Some(d));
        }
        for v in [-1, 13, 14, 255, i32::MIN, i32::MAX] {
            assert_eq!(DType::from_raw(v), None, "{v}");
        }
    }

    #[test]
    fn enum_values_match_the_header() {
        assert_eq!(Algorithm::from_raw(2), None);
        assert_eq!(Layout::from_raw(4), Err(4));
        assert_eq!(Layout::from_raw(0), Ok(None));
        for l in [Layout::ExpertMajor, Layout::RankMajor, Layout::Flat] {
            assert_eq!(Layout::from_raw(l.raw()), Ok(Some(l)));
        }
        assert_eq!(ExpertIdKind::from_raw(0), Some(ExpertIdKind::Local));
        assert_eq!(OverflowPolicy::from_raw(0), Some(OverflowPolicy::Trap));
        assert_eq!(PassDir::from_raw(-1), None);
    }
}
