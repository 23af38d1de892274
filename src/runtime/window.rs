//! Window-backed tensors (docs/ZERO_COPY.md): a caller tensor with `win_hdl` set lives in an
//! NCCL window registered with `ncclCommWindowRegister`. Its local address is `data` when the
//! caller set it, else `ncclWinGetUserPtr + win_offset`; peers' copies are found with
//! `ncclGetPeerDevicePointer(win, win_offset, peer)`, with the caller's own offset (so every rank
//! must use the same offset in a symmetric window), as NCCL EP does. Generic over tensors: any
//! tensor of any call goes through [`resolve`].

use crate::runtime::group::{Group, Membership};
use crate::sys::ncclComm_t;
use crate::transport::nccl::Nccl;
use ep_core::error::Result;
use ep_core::op_args::{CombineArgs, DispatchArgs};
use ep_core::tensor::TensorView;

/// The communicator windows of this group belong to; local groups have none (NCCL EP always
/// has a communicator: local groups are our extension).
fn comm(g: &Group, name: &str) -> Result<ncclComm_t> {
    match &g.membership {
        Membership::Nccl { comm, .. } => Ok(*comm),
        Membership::Local { .. } => Err(ep_core::invalid_usage!(
            "{name} is window-backed (win_hdl set), but this is a local group (ncclEpxCreateLocalGroups), which has \
             no NCCL communicator and so no windows; pass a device pointer in data and win_hdl = NULL"
        )),
    }
}

/// Gives a windowed tensor its local address (`data` unless the caller set it). Empty tensors
/// are left alone (no element to address; NCCL EP does not bind them either). In a local group
/// a window means nothing: a tensor with `data` set is taken as an ordinary one, one without is
/// an error.
pub fn resolve(g: &Group, t: &mut TensorView, name: &str) -> Result<()> {
    let Some(w) = t.window else {
        return Ok(());
    };
    if t.is_empty() {
        return Ok(());
    }
    if matches!(g.membership, Membership::Local { .. }) && t.data != 0 {
        t.window = None;
        return Ok(());
    }
    let comm = comm(g, name)?;
    if t.data != 0 {
        return Ok(());
    }
    let nccl = Nccl::get()?;
    // SAFETY: the group's communicator is live while the group is (the C contract of
    // ncclEpCreateGroup); NCCL checks the window handle itself.
    let base = unsafe { nccl.win_user_ptr(comm, w.hdl) }.map_err(|e| e.context(name))?;
    t.data = base
        .checked_add(w.offset)
        .ok_or_else(|| ep_core::invalid_arg!("{name}: win_offset {:#x} overflows the window's address", w.offset))?;
    Ok(())
}

/// [`resolve`] on an optional tensor.
pub fn resolve_opt(g: &Group, t: &mut Option<TensorView>, name: &str) -> Result<()> {
    match t {
        Some(t) => resolve(g, t, name),
        None => Ok(()),
    }
}

/// Resolves every windowed tensor of a dispatch in place (a tensor without a window is left as
/// it is: [`resolve`] returns at once).
pub fn resolve_dispatch(g: &Group, a: &mut DispatchArgs) -> Result<()> {
    resolve(g, &mut a.tokens, "inputs->tokens")?;
    resolve_opt(g, &mut a.in_weights, "inputs->topk_weights")?;
    resolve_opt(g, &mut a.in_scales, "inputs->scales")?;
    resolve(g, &mut a.out_tokens, "outputs->tokens")?;
    resolve_opt(g, &mut a.out_weights, "outputs->topk_weights")?;
    resolve_opt(g, &mut a.out_scales, "outputs->scales")?;
    resolve_opt(g, &mut a.out_topk_idx, "outputs->topk_idx")?;
    resolve_opt(g, &mut a.expert_counters, "layout_info->expert_counters")?;
    resolve_opt(g, &mut a.src_rank_counters, "layout_info->src_rank_counters")?;
    resolve_opt(g, &mut a.expert_offsets, "layout_info->expert_offsets")?;
    resolve_opt(g, &mut a.recv_total_counter, "layout_info->recv_total_counter")
}

/// Resolves every windowed tensor of a combine in place.
pub fn resolve_combine(g: &Group, a: &mut CombineArgs) -> Result<()> {
    resolve(g, &mut a.tokens, "inputs->tokens")?;
    resolve_opt(g, &mut a.in_weights, "inputs->topk_weights")?;
    resolve_opt(g, &mut a.in_scales, "inputs->scales")?;
    resolve(g, &mut a.out_tokens, "outputs->tokens")?;
    resolve_opt(g, &mut a.out_weights, "outputs->topk_weights")
}

/// Every rank's address of a windowed (and resolved) tensor, this rank's being `t.data`; None
/// when some peer is not reachable by load/store (the group is not NVLink-only) or the tensor
/// has no window.
pub fn peer_addresses(g: &Group, t: &TensorView, name: &str) -> Result<Option<Vec<u64>>> {
    let Some(w) = t.window else {
        return Ok(None);
    };
    comm(g, name)?;
    let nccl = Nccl::get()?;
    let me = g.params.rank;
    let mut out = Vec::with_capacity(g.params.nranks as usize);
    for r in 0..g.params.nranks {
        if r == me {
            out.push(t.data);
            continue;
        }
        // SAFETY: NCCL checks the window handle; it writes one pointer.
        match unsafe { nccl.peer_ptr(w.hdl, w.offset, r) }.map_err(|e| e.context(name))? {
            Some(p) => out.push(p),
            None => return Ok(None),
        }
    }
    Ok(Some(out))
}
