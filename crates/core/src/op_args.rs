//! The arguments of one dispatch or combine call, after the C structs were checked and every
//! tensor descriptor was copied into a [`TensorView`].

use crate::enums::{Algorithm, ExpertIdKind, Layout, PassDir};
use crate::error::Result;
use crate::tensor::TensorView;

/// `layout_info->recv_topk_idx_kind` of a dispatch, resolved as NCCL EP resolves it: AUTO (0) is
/// LOCAL, LOCAL (1) and GLOBAL (2) stand. Another value matters only where the dispatch writes
/// expert ids through NCCL EP's kernel that asserts on it (LOW_LATENCY RANK_MAJOR; HIGH_THROUGHPUT
/// forward, whose default expert-major path also runs it): there it is `ncclInvalidArgument`
/// (NCCL EP traps on the device); elsewhere it is ignored, as NCCL EP ignores it.
pub fn recv_kind(raw: i32, algorithm: Algorithm, layout: Layout, pass: PassDir) -> Result<ExpertIdKind> {
    let used = match algorithm {
        Algorithm::LowLatency => layout == Layout::RankMajor,
        Algorithm::HighThroughput => pass == PassDir::Forward,
    };
    match raw {
        0 | 1 => Ok(ExpertIdKind::Local),
        2 => Ok(ExpertIdKind::Global),
        v if used => Err(crate::invalid_arg!(
            "layout_info->recv_topk_idx_kind is {v}, expected 0 (AUTO), 1 (LOCAL) or 2 (GLOBAL)"
        )),
        _ => Ok(ExpertIdKind::Local),
    }
}

#[derive(Clone, Debug)]
pub struct DispatchArgs {
    pub tokens: TensorView,
    pub in_weights: Option<TensorView>,
    pub in_scales: Option<TensorView>,
    pub out_tokens: TensorView,
    pub out_weights: Option<TensorView>,
    pub out_scales: Option<TensorView>,
    pub out_topk_idx: Option<TensorView>,
    pub expert_counters: Option<TensorView>,
    pub src_rank_counters: Option<TensorView>,
    pub expert_offsets: Option<TensorView>,
    pub recv_total_counter: Option<TensorView>,
    /// True when the caller passed a layout_info at all.
    pub has_layout_info: bool,
    pub recv_kind: ExpertIdKind,
    pub send_only: bool,
    pub round_scales: bool,
    pub pass: PassDir,
    pub quant: i32,
}

#[derive(Clone, Debug)]
pub struct CombineArgs {
    pub tokens: TensorView,
    pub in_weights: Option<TensorView>,
    pub in_scales: Option<TensorView>,
    pub out_tokens: TensorView,
    pub out_weights: Option<TensorView>,
    pub send_only: bool,
    pub pass: PassDir,
    pub quant: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recv_kind_is_checked_only_where_it_is_used() {
        use Algorithm::{HighThroughput as Ht, LowLatency as Ll};
        use Layout::{ExpertMajor as Em, Flat, RankMajor as Rm};
        use PassDir::{Backward as Bwd, Forward as Fwd};
        for (a, l, d) in [(Ll, Rm, Fwd), (Ll, Em, Fwd), (Ht, Flat, Fwd), (Ht, Em, Bwd)] {
            assert_eq!(recv_kind(0, a, l, d).unwrap(), ExpertIdKind::Local);
            assert_eq!(recv_kind(1, a, l, d).unwrap(), ExpertIdKind::Local);
            assert_eq!(recv_kind(2, a, l, d).unwrap(), ExpertIdKind::Global);
        }
        for (a, l, d) in [(Ll, Rm, Fwd), (Ht, Flat, Fwd), (Ht, Em, Fwd)] {
            let e = recv_kind(3, a, l, d).unwrap_err();
            assert_eq!(e.code(), 4);
            assert!(e.msg.contains("recv_topk_idx_kind is 3"), "{}", e.msg);
        }
        // Ignored where NCCL EP ignores it (was ncclInvalidArgument everywhere).
        for (a, l, d) in [(Ll, Em, Fwd), (Ht, Flat, Bwd), (Ht, Em, Bwd)] {
            assert_eq!(recv_kind(-1, a, l, d).unwrap(), ExpertIdKind::Local);
        }
    }
}
