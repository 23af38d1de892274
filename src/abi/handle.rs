//! Handle functions: `ncclEpHandleMemSize`, `ncclEpInitHandle`, `ncclEpUpdateHandle`,
//! `ncclEpCreateHandle`, `ncclEpHandleDestroy`.

use super::guard::{ffi_call, out_ptr, read_opt};
use super::objects;
use super::tensor::{read_tensor, read_tensor_opt};
use super::types::*;
use crate::runtime::alloc::GroupMem;
use crate::runtime::group::{Group, GroupRef};
use crate::runtime::handle::{Handle, HandleId, HandleMem};
use crate::runtime::ht::HtGroup;
use crate::runtime::ll::LlGroup;
use ep_core::enums::{Algorithm, Layout, dtype};
use ep_core::error::Result;
use ep_core::handle_rules::{
    HandleParams, check_handle, check_topk_idx, handle_mem_bytes, handle_mem_need, mem_size_params,
};
use ep_core::tensor::Dim;
use std::ffi::c_int;

/// The arguments MemSize and InitHandle share, decoded: the layout and the optional config's
/// alignment.
///
/// # Safety
/// `config` follows the C contract.
unsafe fn handle_args(layout: ncclEpLayout_t, config: *const ncclEpHandleConfig_t) -> Result<(Option<Layout>, usize)> {
    // SAFETY: C contract.
    let cfg = unsafe { read_opt(config, "config") }?;
    let layout =
        Layout::from_raw(layout.0).map_err(|v| ep_core::invalid_arg!("layout is {v}, not an ncclEpLayout_t value"))?;
    Ok((layout, cfg.map_or(0, |c| c.dispatch_output_per_expert_alignment)))
}

/// The checks of InitHandle: group, optional config, layout, top-k.
///
/// # Safety
/// `config` follows the C contract.
unsafe fn handle_params(
    g: &Group,
    layout: ncclEpLayout_t,
    config: *const ncclEpHandleConfig_t,
    num_topk: c_int,
) -> Result<HandleParams> {
    // SAFETY: C contract.
    let (layout, align) = unsafe { handle_args(layout, config) }?;
    check_handle(&g.params, layout, num_topk as i64, align)
}

/// Bytes a caller-owned `handle_mem` tensor needs for this (layout, top-k).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpHandleMemSize(
    ep_group: ncclEpGroup_t,
    layout: ncclEpLayout_t,
    config: *const ncclEpHandleConfig_t,
    size_out: *mut usize,
    num_topk: c_int,
) -> ncclResult_t {
    ffi_call("ncclEpHandleMemSize", || {
        // The parameters never change: no need for the group's lock.
        let g = objects::group(ep_group)?;
        // SAFETY: C contract.
        let out = unsafe { out_ptr(size_out, "size_out") }?;
        // SAFETY: C contract.
        let (layout, align) = unsafe { handle_args(layout, config) }?;
        // As lenient as NCCL EP's (core::handle_rules::mem_size_params); InitHandle checks the rest.
        let hp = mem_size_params(&g.params, layout, num_topk as i64, align)?;
        *out = handle_mem_bytes(&g.params, &hp);
        Ok(())
    })
}

/// The body of InitHandle, shared with CreateHandle: `g` is `group`, locked by the caller.
///
/// # Safety
/// Pointers follow the C contract.
#[allow(clippy::too_many_arguments)]
unsafe fn init_handle(
    g: &mut Group,
    group: &GroupRef,
    layout: ncclEpLayout_t,
    config: *const ncclEpHandleConfig_t,
    num_topk: c_int,
    handle_mem: *const ncclEpTensor_t,
    stream: Option<cudaStream_t>,
) -> Result<Handle> {
    // SAFETY: C contract.
    let hp = unsafe { handle_params(g, layout, config, num_topk) }?;
    let need = handle_mem_need(&g.params, &hp)?;
    // SAFETY: C contract.
    let mut caller_mem = unsafe { read_tensor_opt(handle_mem, "handle_mem") }?;
    crate::runtime::window::resolve_opt(g, &mut caller_mem, "handle_mem")?;
    let mem = match caller_mem {
        Some(t) => {
            t.expect("handle_mem", &[Dim::AtLeast(need)], &[dtype::UINT8])?;
            // The block holds 8-byte fields (NCCL EP's holds int64 arrays: it faults below 8).
            ep_core::ensure_arg!(
                t.data % 8 == 0,
                "handle_mem data ({:#x}) must be 8-byte aligned",
                t.data
            );
            HandleMem::Caller {
                ptr: t.data,
                bytes: t.dim(0),
            }
        }
        // A group without GPU state (no CUDA driver) still validates handles; its operations fail.
        // HT CreateHandle: a stream-ordered allocation, so that the metadata kernels other ranks
        // of a local group already queued may keep running (docs/HT.md, "Local groups").
        None if g.ht().is_ok() && g.custom_alloc.is_none() && stream.is_some() => {
            // SAFETY: the caller's stream (C contract).
            let s = unsafe { crate::cuda::memory::Stream::from_raw(stream.unwrap_or(std::ptr::null_mut()).cast()) };
            HandleMem::Owned(GroupMem::Driver(crate::cuda::memory::DeviceMem::alloc_async(
                g.device, need, s,
            )?))
        }
        None if g.has_gpu_state() => HandleMem::Owned(GroupMem::alloc(g.device, need, g.custom_alloc)?),
        None => HandleMem::None,
    };
    if g.ll().is_ok() {
        let lay = crate::runtime::ll::layout(g, hp.num_topk)?;
        crate::runtime::ll::ensure_buffer(g, &lay)?;
    }
    if g.ht().is_ok() {
        crate::runtime::ht::ensure_buffer(g, &hp)?;
    }
    g.live_handles += 1;
    Ok(Handle {
        id: HandleId::next(),
        group: group.clone(),
        params: hp,
        topk_idx: None,
        mem,
        dispatched: false,
        ht_unchecked: false,
        destroyed: false,
    })
}

/// Sets the routing of a handle (the body of UpdateHandle): `g` is the handle's group, locked
/// by the caller.
///
/// # Safety
/// Pointers follow the C contract.
unsafe fn update_handle(
    g: &mut Group,
    h: &mut Handle,
    topk_idx: *const ncclEpTensor_t,
    layout_info: *const ncclEpLayoutInfo_t,
    stream: cudaStream_t,
) -> Result<()> {
    // SAFETY: C contract.
    let mut t = unsafe { read_tensor(topk_idx, "topk_idx") }?;
    crate::runtime::window::resolve(g, &mut t, "topk_idx")?;
    // SAFETY: C contract.
    let li = unsafe { read_opt(layout_info, "layout_info") }?;
    check_topk_idx(&g.params, &h.params, &t)?;
    if g.params.algorithm == Algorithm::LowLatency {
        ep_core::ensure_usage!(
            li.is_none(),
            "layout_info must be NULL for a LOW_LATENCY handle (its counters come from ncclEpDispatch)"
        );
        h.topk_idx = Some(t);
        return Ok(());
    }
    // SAFETY: C contract (each tensor pointer of layout_info may be NULL).
    let outs = unsafe { ht_layout_info(g, &h.params, li.as_ref()) }?;
    ep_core::ensure_usage!(
        g.ht().is_ok(),
        "this group has no GPU state: the CUDA driver (libcuda.so.1) could not be loaded"
    );
    crate::runtime::ht::update(g, h, t, &outs, stream)
}

/// The `layout_info` outputs of a HIGH_THROUGHPUT update, checked (core::ht_rules).
///
/// # Safety
/// The tensor pointers inside `li` follow the C contract.
unsafe fn ht_layout_info(
    g: &Group,
    hp: &HandleParams,
    li: Option<&ncclEpLayoutInfo_t>,
) -> Result<ep_core::ht_rules::HtLayoutOutputs> {
    let mut a = ep_core::ht_rules::HtLayoutInfoArgs::default();
    if let Some(li) = li {
        // SAFETY: C contract.
        unsafe {
            a.expert_counters = read_tensor_opt(li.expert_counters, "layout_info->expert_counters")?;
            a.src_rank_counters = read_tensor_opt(li.src_rank_counters, "layout_info->src_rank_counters")?;
            a.expert_offsets = read_tensor_opt(li.expert_offsets, "layout_info->expert_offsets")?;
            a.recv_total_counter = read_tensor_opt(li.recv_total_counter, "layout_info->recv_total_counter")?;
        }
        use crate::runtime::window::resolve_opt;
        resolve_opt(g, &mut a.expert_counters, "layout_info->expert_counters")?;
        resolve_opt(g, &mut a.src_rank_counters, "layout_info->src_rank_counters")?;
        resolve_opt(g, &mut a.expert_offsets, "layout_info->expert_offsets")?;
        resolve_opt(g, &mut a.recv_total_counter, "layout_info->recv_total_counter")?;
    }
    ep_core::ht_rules::check_layout_info(&g.params, hp, &a)
}

/// Creates a handle without routing; `ncclEpUpdateHandle` sets it.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpInitHandle(
    handle: *mut ncclEpHandle_t,
    ep_group: ncclEpGroup_t,
    layout: ncclEpLayout_t,
    config: *const ncclEpHandleConfig_t,
    num_topk: c_int,
    handle_mem: *const ncclEpTensor_t,
) -> ncclResult_t {
    ffi_call("ncclEpInitHandle", || {
        // SAFETY: C contract.
        let out = unsafe { out_ptr(handle, "handle") }?;
        *out = std::ptr::null_mut();
        let gr = objects::group(ep_group)?;
        let mut g = gr.lock()?;
        // SAFETY: C contract.
        let h = unsafe { init_handle(&mut g, &gr, layout, config, num_topk, handle_mem, None) }?;
        *out = objects::publish_handle(h);
        Ok(())
    })
}

/// Sets or replaces the routing (`topk_idx`) of a handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpUpdateHandle(
    handle: ncclEpHandle_t,
    topk_idx: *const ncclEpTensor_t,
    layout_info: *const ncclEpLayoutInfo_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    ffi_call("ncclEpUpdateHandle", || {
        let hr = objects::handle(handle)?;
        let mut h = hr.lock()?;
        let gr = h.group.clone();
        let mut g = gr.lock()?;
        // SAFETY: C contract.
        unsafe { update_handle(&mut g, &mut h, topk_idx, layout_info, stream) }
    })
}

/// InitHandle (top-k from `topk_idx`, library-owned metadata) followed by UpdateHandle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpCreateHandle(
    handle: *mut ncclEpHandle_t,
    ep_group: ncclEpGroup_t,
    layout: ncclEpLayout_t,
    topk_idx: *const ncclEpTensor_t,
    layout_info: *const ncclEpLayoutInfo_t,
    config: *const ncclEpHandleConfig_t,
    stream: cudaStream_t,
) -> ncclResult_t {
    ffi_call("ncclEpCreateHandle", || {
        // SAFETY: C contract.
        let out = unsafe { out_ptr(handle, "handle") }?;
        *out = std::ptr::null_mut();
        let gr = objects::group(ep_group)?;
        // Header checks come before anything is built, so a bad struct leaves *handle NULL.
        // SAFETY: C contract.
        let t = unsafe { read_tensor(topk_idx, "topk_idx") }?;
        // SAFETY: C contract.
        unsafe { read_opt(layout_info, "layout_info") }?;
        ep_core::ensure_arg!(
            t.ndim() == 2,
            "topk_idx must be 2-D [tokens, top-k], got {}-D",
            t.ndim()
        );
        let k = c_int::try_from(t.dim(1)).map_err(|_| ep_core::invalid_arg!("topk_idx has {} columns", t.dim(1)))?;
        // One lock for both steps: no other call on the group sees the half-built handle.
        let mut g = gr.lock()?;
        // SAFETY: C contract.
        let mut h = unsafe { init_handle(&mut g, &gr, layout, config, k, std::ptr::null(), Some(stream)) }?;
        // SAFETY: C contract.
        if let Err(e) = unsafe { update_handle(&mut g, &mut h, topk_idx, layout_info, stream) } {
            // Given back without leaking the group's handle count.
            g.live_handles = g.live_handles.saturating_sub(1);
            return Err(e);
        }
        *out = objects::publish_handle(h);
        Ok(())
    })
}

/// Destroys a handle (its group stays). A `send_only` operation the handle left pending is
/// dropped with it, its receive phase never run (as NVIDIA's destroy drops it), and the group
/// accepts new operations; destroy that handle on every rank alike. A call on the handle in
/// progress on another thread finishes first; one that comes later fails with
/// ncclInvalidArgument.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpHandleDestroy(handle: ncclEpHandle_t) -> ncclResult_t {
    ffi_call("ncclEpHandleDestroy", || {
        if handle.is_null() {
            return Ok(());
        }
        // Out of the registry first: of two racing destroys only one gets it. A call in
        // progress on the handle finishes first (its lock), or fails afterwards.
        let hr = objects::take_handle(handle)?;
        let mut h = hr.lock()?;
        crate::runtime::ops::destroy_handle(&mut h)
    })
}
