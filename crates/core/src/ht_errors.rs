//! Why an HT routing update fails: found by the GPU's metadata pass (the runtime reads it back)
//! and by the CPU reference alike, reported to the caller as one error.

use crate::error::Error;

/// An entry of `topk_idx` that is past the last expert (any negative entry means "none").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadExpertId {
    pub rank: usize,
    pub row: usize,
    pub k: usize,
    pub value: i64,
    pub num_experts: usize,
}

/// Why `ncclEpUpdateHandle` fails (outside graph capture).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HtPlanError {
    /// An expert id outside −1..E−1 (the lowest rank that has one, its first entry).
    BadExpertId(BadExpertId),
    /// TRAP: a rank receives more than S rows (the lowest such rank; `count` is its FLAT row
    /// count or EM padded total).
    Overflow { rank: usize, count: usize, budget: usize },
}

impl HtPlanError {
    /// The library error this is reported as: `ncclInvalidArgument` for a bad id,
    /// `ncclInvalidUsage` for an overflow.
    pub fn to_error(&self) -> Error {
        match *self {
            Self::BadExpertId(b) => crate::invalid_arg!(
                "topk_idx[{}][{}] is {} on rank {}: expert ids must be negative (none, e.g. -1) or in [0, {})",
                b.row,
                b.k,
                b.value,
                b.rank,
                b.num_experts
            ),
            Self::Overflow { rank, count, budget } => crate::invalid_usage!(
                "rank {rank} would receive {count} rows, more than max_recv_tokens_per_rank ({budget}); \
                 raise it (EXPERT_MAJOR counts its alignment padding: up to local experts x (alignment - 1) \
                 rows more), use NCCL_EP_AUTO (eager mode), or set overflow_policy DROP to drop the excess"
            ),
        }
    }
}
