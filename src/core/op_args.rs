//! The arguments of one dispatch or combine call, after the C structs were checked and every
//! tensor descriptor was copied into a [`TensorView`].

use crate::abi::enums::{ExpertIdKind, PassDir};
use crate::core::tensor::TensorView;

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
