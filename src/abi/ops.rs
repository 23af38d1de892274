//! `ncclEpDispatch`, `ncclEpCombine`, `ncclEpComplete`: check the C structs, copy the tensor
//! descriptors, and hand the call to the runtime.

use super::guard::{ffi_call, read_opt, read_req};
use super::objects;
use super::tensor::{read_tensor, read_tensor_opt};
use super::types::*;
use ep_core::enums::{Algorithm, ExpertIdKind, Layout, PassDir};
use ep_core::error::Result;
use ep_core::op_args::{CombineArgs, DispatchArgs, recv_kind};

fn pass_dir(v: ncclEpPassDir_t) -> Result<PassDir> {
    PassDir::from_raw(v.0).ok_or_else(|| {
        ep_core::invalid_arg!(
            "config->pass_direction is {}, expected NCCL_EP_FWD_PASS (0) or NCCL_EP_BWD_PASS (1)",
            v.0
        )
    })
}

/// Sends each token to the ranks of its experts (collective).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpDispatch(
    handle: ncclEpHandle_t,
    inputs: *const ncclEpDispatchInputs_t,
    outputs: *const ncclEpDispatchOutputs_t,
    layout_info: *const ncclEpLayoutInfo_t,
    config: *const ncclEpDispatchConfig_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    crate::host_profile::start("ncclEpDispatch");
    let rc = ffi_call("ncclEpDispatch", || {
        // SAFETY: the reads below dereference the caller's pointers, each NULL or valid for its
        // struct's `size` bytes (the C contract of ncclEpDispatch); nothing else here is unsafe.
        unsafe {
            let i = read_req(inputs, "inputs")?;
            let o = read_req(outputs, "outputs")?;
            let li = read_opt(layout_info, "layout_info")?;
            let cfg = read_opt(config, "config")?;
            crate::host_profile::mark("structs");
            let hr = objects::handle(handle)?;
            let mut h = hr.lock()?;
            crate::host_profile::mark("handle");
            let algorithm = h.group.params.algorithm;
            // The layout_info tensors NCCL EP reads at dispatch, and only those (an ignored field
            // may hold anything): LOW_LATENCY's two counters. HT dispatch takes only
            // recv_topk_idx_kind from layout_info; expert_offsets and recv_total_counter are
            // handle-time outputs.
            let ll = algorithm == Algorithm::LowLatency;
            let li_t = |f: fn(&ncclEpLayoutInfo_t) -> *mut ncclEpTensor_t, name| match &li {
                Some(l) if ll => read_tensor_opt(f(l), name),
                _ => Ok(None),
            };
            let pass = cfg.map_or(Ok(PassDir::Forward), |c| pass_dir(c.pass_direction))?;
            let recv_kind = match &li {
                Some(l) => recv_kind(l.recv_topk_idx_kind.0, algorithm, h.params.layout, pass)?,
                None => ExpertIdKind::Local,
            };
            let args = DispatchArgs {
                tokens: read_tensor(i.tokens, "inputs->tokens")?,
                in_weights: read_tensor_opt(i.topk_weights, "inputs->topk_weights")?,
                in_scales: read_tensor_opt(i.scales, "inputs->scales")?,
                out_tokens: read_tensor(o.tokens, "outputs->tokens")?,
                out_weights: read_tensor_opt(o.topk_weights, "outputs->topk_weights")?,
                out_scales: read_tensor_opt(o.scales, "outputs->scales")?,
                out_topk_idx: read_tensor_opt(o.topk_idx, "outputs->topk_idx")?,
                expert_counters: li_t(|l| l.expert_counters, "layout_info->expert_counters")?,
                src_rank_counters: li_t(|l| l.src_rank_counters, "layout_info->src_rank_counters")?,
                expert_offsets: None,
                recv_total_counter: None,
                has_layout_info: li.is_some(),
                recv_kind,
                send_only: cfg.is_some_and(|c| c.send_only != 0),
                round_scales: cfg.is_some_and(|c| c.round_scales != 0),
                pass,
                quant: cfg.map_or(0, |c| c.quant_recipe.0),
            };
            ep_core::ensure_arg!(
                (0..=2).contains(&args.quant),
                "config->quant_recipe is {}, not an ncclEpDispQuant_t",
                args.quant
            );
            crate::host_profile::mark("tensors");
            crate::runtime::ops::dispatch(&mut h, args, stream)
        }
    });
    crate::host_profile::finish();
    rc
}

/// Returns expert outputs to the ranks that own the tokens and reduces them (collective).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpCombine(
    handle: ncclEpHandle_t,
    inputs: *const ncclEpCombineInputs_t,
    outputs: *const ncclEpCombineOutputs_t,
    config: *const ncclEpCombineConfig_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    crate::host_profile::start("ncclEpCombine");
    let rc = ffi_call("ncclEpCombine", || {
        // SAFETY: the reads below dereference the caller's pointers, each NULL or valid for its
        // struct's `size` bytes (the C contract of ncclEpCombine); nothing else here is unsafe.
        unsafe {
            let i = read_req(inputs, "inputs")?;
            let o = read_req(outputs, "outputs")?;
            let cfg = read_opt(config, "config")?;
            let hr = objects::handle(handle)?;
            let mut h = hr.lock()?;
            // LOW_LATENCY combine never reads inputs->topk_weights, nor rank-major's
            // outputs->topk_weights (the caller pre-reduces): NCCL EP does not even look at those
            // descriptors, so neither do we.
            let ll = h.group.params.algorithm == Algorithm::LowLatency;
            let read_unless = |skip: bool, t, name| if skip { Ok(None) } else { read_tensor_opt(t, name) };
            let args = CombineArgs {
                tokens: read_tensor(i.tokens, "inputs->tokens")?,
                in_weights: read_unless(ll, i.topk_weights, "inputs->topk_weights")?,
                in_scales: read_tensor_opt(i.scales, "inputs->scales")?,
                out_tokens: read_tensor(o.tokens, "outputs->tokens")?,
                out_weights: read_unless(
                    ll && h.params.layout == Layout::RankMajor,
                    o.topk_weights,
                    "outputs->topk_weights",
                )?,
                send_only: cfg.is_some_and(|c| c.send_only != 0),
                pass: cfg.map_or(Ok(PassDir::Forward), |c| pass_dir(c.pass_direction))?,
                quant: cfg.map_or(0, |c| c.quant_recipe.0),
            };
            ep_core::ensure_arg!(
                (0..=1).contains(&args.quant),
                "config->quant_recipe is {}, not an ncclEpCombQuant_t",
                args.quant
            );
            crate::host_profile::mark("tensors");
            crate::runtime::ops::combine(&mut h, args, stream)
        }
    });
    crate::host_profile::finish();
    rc
}

/// Finishes a `send_only` dispatch or combine (a no-op when none is pending).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpComplete(
    handle: ncclEpHandle_t,
    config: *const ncclEpCompleteConfig_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    ffi_call("ncclEpComplete", || {
        // SAFETY: C contract.
        unsafe { read_opt(config, "config") }?;
        let hr = objects::handle(handle)?;
        let mut h = hr.lock()?;
        crate::runtime::ops::complete(&mut h, stream)
    })
}
