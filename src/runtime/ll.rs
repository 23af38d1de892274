//! Low-latency mode on the GPU: the group's buffer and device state, and dispatch / combine /
//! complete launches (protocol in docs/LL.md).

use crate::cuda::memory::{self, PinnedHostMem};
use crate::runtime::alloc::GroupMem;
use crate::runtime::group::{Group, Membership, ModeState};
use crate::runtime::handle::{Handle, HandleId};
use crate::runtime::kernels::{LlDtype, LlKernel, launch_ll};
use crate::runtime::ll_params::{
    ERR_BLOCK_BYTES, LL_MAX_RANKS, LlParams, MASK_BLOCK_BYTES, MASK_DECIDE_OFF, PHASE_RECV, PHASE_SEND,
};
use crate::sys::cudaStream_t;
use crate::transport::peers::PeerBuffers;
use ep_core::enums::Algorithm;
use ep_core::enums::{ExpertIdKind, Layout, dtype};
use ep_core::error::Result;
use ep_core::ll_layout::{LlLayout, LlStage};
use ep_core::ll_rules::{COMB_QUANT_NVFP4, LlCall, check_combine, check_dispatch};
use ep_core::op_args::{CombineArgs, DispatchArgs};
use ep_core::tensor::TensorView;
use ep_core::zero_copy;

/// A `send_only` operation whose receive phase waits for `ncclEpComplete` on its handle.
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    pub handle: HandleId,
    pub kernel: LlKernel,
    pub params: LlParams,
}

/// The low-latency state of one rank's group.
pub struct LlState {
    /// This rank's communication buffer and every rank's as seen from here (empty until a
    /// handle sizes it, for AUTO).
    pub buffers: PeerBuffers,
    /// `struct EpState` (epoch and block counters), zeroed at creation.
    pub state: GroupMem,
    /// Host-mapped status (`ERR_BLOCK_BYTES`): the async error flag the kernels raise when a wait
    /// times out, and the ranks that missed the last `ncclEpMaskClean` barrier.
    pub err: PinnedHostMem,
    /// `enable_mask`: the mask block (`int mask[64]`, 1 = active, then the per-source decisions
    /// of the current operation, see `MASK_BLOCK_BYTES`), all ranks active at creation.
    pub mask: Option<GroupMem>,
    /// `ncclEpMaskClean` calls so far (the barrier's tag).
    pub clean_seq: u32,
    /// Ranks masked by the last `ncclEpMaskUpdate` (bit r; the host's copy of the caller's
    /// array, cleared by `ncclEpMaskClean`): exchanges with remote ranks leave them out
    /// (docs/MULTINODE.md, "Masks and dead peers"). Masks the kernels decide (a timeout) are
    /// not in it: the host never reads the device mask.
    pub masked_on_host: u64,
    pub pending: Option<Pending>,
    /// Blocks per LL kernel.
    pub blocks: u32,
    /// Bound on every GPU wait (0 = none).
    pub timeout_ns: i64,
    /// Every peer's buffer is on this GPU (`all_peers_on_this_gpu`, fixed at creation): the
    /// kernels fence at GPU scope (`LlParams::gpu_scope`).
    pub gpu_scope: bool,
    /// `NCCL_EP_PROFILE=1`: per-block phase timestamps (debugging only: each launch then waits).
    pub prof: Option<PinnedHostMem>,
}

/// The group's low-latency state (this module's view of [`Group::mode`]).
pub trait LlGroup {
    fn ll(&self) -> Result<&LlState>;
    fn ll_mut(&mut self) -> Result<&mut LlState>;
}

impl LlGroup for Group {
    fn ll(&self) -> Result<&LlState> {
        self.mode_state(Algorithm::LowLatency)
    }
    fn ll_mut(&mut self) -> Result<&mut LlState> {
        self.mode_state_mut(Algorithm::LowLatency)
    }
}

impl ModeState for LlState {
    fn buffers_mut(&mut self) -> &mut PeerBuffers {
        &mut self.buffers
    }
    fn timed_out(&self) -> bool {
        LlState::timed_out(self)
    }
    fn clear_timeout(&self) {
        LlState::clear_timeout(self)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl LlState {
    /// Device state for a new group (buffer sized later, or now for an explicit size).
    pub fn new(g: &Group, ranks_on_device: usize) -> Result<LlState> {
        let dev = g.device;
        let _ctx = crate::cuda::context::CtxGuard::enter(dev)?;
        ep_core::ensure_usage!(
            g.params.nranks as usize <= LL_MAX_RANKS,
            "LOW_LATENCY groups support at most {LL_MAX_RANKS} ranks, this one has {}",
            g.params.nranks
        );
        let state = g.zeroed_ep_state()?;
        let mask = if g.params.enable_mask {
            let m = GroupMem::alloc(dev, MASK_BLOCK_BYTES, g.custom_alloc)?;
            // SAFETY: the block holds MASK_BLOCK_BYTES: 64 ints of 1, then zeroed decisions
            // (tag 0 is never the tag of an operation).
            unsafe {
                memory::memset_d32_async(m.ptr(), 1, LL_MAX_RANKS, memory::Stream::LEGACY_DEFAULT)?;
                memory::memset_d8_async(
                    m.ptr() + MASK_DECIDE_OFF as u64,
                    0,
                    MASK_BLOCK_BYTES - MASK_DECIDE_OFF,
                    memory::Stream::LEGACY_DEFAULT,
                )?;
            }
            Some(m)
        } else {
            None
        };
        memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
        if mask.is_some() {
            // ncclEpMaskClean's barrier must not start compiling while peers already wait in it.
            crate::runtime::kernels::preload(dev, LlKernel::clean())?;
        }
        let err = PinnedHostMem::alloc(dev, ERR_BLOCK_BYTES)?;
        let blocks = g.kernel_blocks(ranks_on_device)?;
        let timeout_ns = g.kernel_timeout_ns();
        let prof = match std::env::var("NCCL_EP_PROFILE").as_deref() {
            Ok("1") => Some(PinnedHostMem::alloc(dev, 64 * blocks as usize)?),
            _ => None,
        };
        Ok(LlState {
            buffers: g.peer_buffers(),
            state,
            err,
            mask,
            clean_seq: 0,
            masked_on_host: 0,
            pending: None,
            blocks,
            timeout_ns,
            gpu_scope: all_peers_on_this_gpu(g),
            prof,
        })
    }

    /// True when a kernel timed out waiting for a peer since the flag was last cleared.
    pub fn timed_out(&self) -> bool {
        // A kernel's wait, or (groups spanning nodes) an exchange the watchdog saw outlive the
        // timeout (transport::watchdog).
        self.err.flag_raised() || self.buffers.remote_timed_out()
    }

    /// Clears the flag `timed_out` reads.
    pub fn clear_timeout(&self) {
        self.err.clear_flag();
        self.buffers.clear_remote_timeout();
    }

    /// Ranks (bit set) that did not reach the last `ncclEpMaskClean` barrier in time; valid once
    /// that call's stream has been synchronised.
    fn clean_missing(&self) -> u64 {
        // SAFETY: the status block holds ERR_BLOCK_BYTES; the u64 at 8 is written by ll_clean.
        unsafe {
            (*(self.err.host_ptr().cast::<u8>().add(8) as *const std::sync::atomic::AtomicU64))
                .load(std::sync::atomic::Ordering::Acquire)
        }
    }
}

/// The buffer layout a handle of top-k `k` uses in this group.
pub fn layout(g: &Group, k: u32) -> Result<LlLayout> {
    let p = &g.params;
    let slot = ep_core::config::ll_slot_bytes(p.max_token_bytes);
    LlLayout::new(p.nranks, p.num_experts, p.max_tokens, slot, k)
}

/// Bytes of this rank's communication buffer (0 before the first handle, for AUTO).
fn buffer_bytes(g: &Group) -> Result<usize> {
    Ok(g.ll()?.buffers.len())
}

/// Makes sure this rank's buffer holds `lay` (allocating or growing it for AUTO; collective for
/// NCCL groups; for local groups every rank's buffer at once). Must not run while operations of
/// the group are in flight.
pub fn ensure_buffer(g: &mut Group, lay: &LlLayout) -> Result<()> {
    let have = buffer_bytes(g)?;
    // Remote ranks' staging regions (docs/MULTINODE.md; nothing without remote ranks); local
    // to this rank, sized per handle like the buffer.
    let stage = LlStage::new(lay)?.stride;
    if have > 0 && lay.fits(have) {
        return g.ll_mut()?.buffers.ensure_stage(stage);
    }
    let explicit = g.params.rdma_buffer_size as usize;
    let bytes = if explicit != 0 {
        ep_core::ensure_usage!(
            have == 0 && lay.fits(explicit),
            "config->rdma_buffer_size ({explicit} bytes) is too small for this handle, which needs {} bytes \
             (ncclEpxBufferSize gives the exact figure; NCCL_EP_AUTO sizes it for you)",
            lay.total_bytes
        );
        explicit
    } else {
        lay.total_bytes
    };
    let rank = g.params.rank as usize;
    // All ranks size buffers in lockstep and no operation of the group is in flight (handles
    // are created collectively).
    g.ll_mut()?.buffers.ensure(bytes)?;
    g.ll_mut()?.buffers.ensure_stage(stage)?;
    crate::log::log_info(format_args!(
        "rank {rank}: low-latency buffer of {bytes} bytes (K = {})",
        lay.topk
    ));
    Ok(())
}

/// The parameters every LL launch shares: peers, layout offsets, state.
fn base_params(g: &Group, lay: &LlLayout) -> Result<LlParams> {
    let ll = g.ll()?;
    let (peers, bytes) = ll.buffers.peers(lay.total_bytes, "low-latency")?;
    ep_core::ensure_usage!(lay.fits(bytes), "the low-latency buffer is too small for this handle");
    let mut p = LlParams::default();
    p.peers[..peers.len()].copy_from_slice(&peers);
    p.bank_stride = LlLayout::bank_stride(bytes) as u64;
    p.off_dflag = lay.dispatch_flag_off as u64;
    p.off_ecount = lay.expert_count_off as u64;
    p.off_cflag = lay.combine_flag_off as u64;
    p.off_clean = lay.clean_flag_off as u64;
    p.off_data = lay.data_off as u64;
    p.state = ll.state.ptr();
    p.err = ll.err.device_ptr();
    if let Some(m) = &ll.mask {
        p.mask = m.ptr();
        p.decide = m.ptr() + MASK_DECIDE_OFF as u64;
    }
    if let Some(r) = ll.buffers.remote() {
        p.remote = r.mask;
        p.rstage = r.recv;
        p.stage_stride = r.stride;
    }
    p.timeout_ns = ll.timeout_ns;
    p.gpu_scope = ll.gpu_scope as i32;
    p.rank = g.params.rank as i32;
    p.nranks = g.params.nranks as i32;
    p.num_experts = g.params.num_experts as i32;
    p.local_experts = g.params.local_experts as i32;
    p.max_tokens = g.params.max_tokens as i32;
    p.dmsg = lay.dmsg_bytes as i32;
    p.hdr = lay.hdr_bytes as i32;
    p.cmsg = lay.cmsg_bytes as i32;
    Ok(p)
}

/// Whether every peer's buffer is on this rank's GPU (the kernels then fence at GPU scope): one
/// rank, or a local group whose ranks all use this device. Ranks in other processes may share
/// the GPU too, but nothing here knows their devices, so they keep system scope.
fn all_peers_on_this_gpu(g: &Group) -> bool {
    match &g.membership {
        Membership::Local { world } => world.devices.iter().all(|&d| d == g.device),
        Membership::Nccl { .. } => g.params.nranks == 1,
    }
}

fn no_pending(g: &Group) -> Result<()> {
    ep_core::ensure_usage!(
        g.ll()?.pending.is_none(),
        "a send_only operation is pending on this group: call ncclEpComplete before the next dispatch or combine"
    );
    Ok(())
}

fn opt_ptr(t: &Option<ep_core::tensor::TensorView>) -> u64 {
    t.as_ref().map_or(0, |t| t.data)
}

/// Launches one LL kernel; with `NCCL_EP_PROFILE=1` also waits for it and prints its phases.
fn launch(g: &Group, kernel: LlKernel, p: &mut LlParams, stream: cudaStream_t) -> Result<()> {
    let ll = g.ll()?;
    if let Some(prof) = &ll.prof {
        // SAFETY: the pinned buffer holds 8 u64 per block; nothing else writes it now.
        unsafe { std::ptr::write_bytes(prof.host_ptr().cast::<u8>(), 0, prof.len()) };
        p.prof = prof.device_ptr();
    }
    launch_ll(g.device, kernel, p, ll.blocks, stream)?;
    if let Some(prof) = &ll.prof {
        // SAFETY: the caller's stream (C contract).
        memory::stream_synchronize(unsafe { memory::Stream::from_raw(stream.cast()) })?;
        // SAFETY: blocks * 8 u64 written by the kernel, which has finished.
        let t = unsafe { std::slice::from_raw_parts(prof.host_ptr() as *const u64, 8 * ll.blocks as usize) };
        let t0 = (0..ll.blocks as usize)
            .map(|b| t[8 * b])
            .filter(|&v| v != 0)
            .min()
            .unwrap_or(0);
        let mut line = format!(
            "NCCL EP PROFILE rank {} {:?} phases {}:",
            g.params.rank, kernel.kind, p.phases
        );
        for i in 1..6 {
            let v: Vec<u64> = (0..ll.blocks as usize)
                .map(|b| t[8 * b + i])
                .filter(|&v| v != 0)
                .collect();
            if let (Some(lo), Some(hi)) = (v.iter().min(), v.iter().max()) {
                line += &format!(" m{i} {:.1}-{:.1}us", (lo - t0) as f64 / 1e3, (hi - t0) as f64 / 1e3);
            }
        }
        eprintln!("{line}");
    }
    Ok(())
}

/// Runs an operation: one launch of both phases, or the send phase alone (`send_only`). With
/// remote ranks (docs/MULTINODE.md) the send phase is followed by the exchange of the staging
/// regions (`xbytes` of the handle's staging layout per remote rank and direction) on the same
/// stream, and a full operation launches its receive phase after it. The staging size is only
/// worked out for such groups: one-node operations pay nothing for it.
#[allow(clippy::too_many_arguments)]
fn run(
    g: &mut Group,
    h: &Handle,
    kernel: LlKernel,
    mut p: LlParams,
    send_only: bool,
    xbytes: fn(&LlStage, Layout) -> usize,
    stream: cudaStream_t,
) -> Result<()> {
    crate::host_profile::mark("params");
    let split = p.remote != 0;
    p.phases = if send_only || split {
        PHASE_SEND
    } else {
        PHASE_SEND | PHASE_RECV
    };
    launch(g, kernel, &mut p, stream)?;
    if split {
        let bytes = xbytes(&LlStage::new(&layout(g, h.params.num_topk)?)?, h.params.layout);
        let ll = g.ll()?;
        // SAFETY: the caller's stream (C contract of the operation); every rank of the group
        // runs its operations in the same order (collective, as NVIDIA's), and the ranks the
        // application masked on the host are left out by every rank that masked them.
        unsafe { ll.buffers.exchange(bytes, ll.masked_on_host, stream) }?;
        if !send_only {
            p.phases = PHASE_RECV;
            launch(g, kernel, &mut p, stream)?;
        }
    }
    if send_only {
        g.ll_mut()?.pending = Some(Pending {
            handle: h.id,
            kernel,
            params: p,
        });
    }
    Ok(())
}

/// The handle's routing (set by ncclEpUpdateHandle / ncclEpCreateHandle).
fn routing(h: &Handle) -> Result<TensorView> {
    h.topk_idx.ok_or_else(|| {
        ep_core::invalid_usage!("the handle has no routing: call ncclEpUpdateHandle (or ncclEpCreateHandle) first")
    })
}

/// Launch parameters shared by dispatch and combine: peers and layout, the routing, this call's
/// main input `x`, weights and output, and the handle's metadata.
fn call_params(
    g: &Group,
    h: &Handle,
    topk: &TensorView,
    call: &LlCall,
    x: u64,
    weights: u64,
    out: u64,
) -> Result<LlParams> {
    no_pending(g)?;
    let lay = layout(g, h.params.num_topk)?;
    let mut p = base_params(g, &lay)?;
    p.x = x;
    p.topk_idx = topk.data;
    p.weights = weights;
    p.out = out;
    p.meta = h.meta_ptr();
    p.num_tokens = call.tokens as i32;
    p.row_bytes = call.row_bytes as i32;
    Ok(p)
}

pub fn dispatch(g: &mut Group, h: &mut Handle, a: &DispatchArgs, stream: cudaStream_t) -> Result<()> {
    let topk = routing(h)?;
    let call = check_dispatch(&g.params, &h.params, &topk, a)?;
    crate::host_profile::mark("checked");
    let direct = direct_outputs(g, h, a)?;
    crate::host_profile::mark("direct");
    let mut p = call_params(
        g,
        h,
        &topk,
        &call,
        a.tokens.data,
        opt_ptr(&a.in_weights),
        a.out_tokens.data,
    )?;
    match h.params.layout {
        Layout::ExpertMajor => p.out_counters = opt_ptr(&a.expert_counters),
        _ => {
            p.out_counters = opt_ptr(&a.src_rank_counters);
            p.out_topk_idx = opt_ptr(&a.out_topk_idx);
            p.out_weights = opt_ptr(&a.out_weights);
            p.recv_global = (a.recv_kind == ExpertIdKind::Global) as i32;
        }
    }
    // Recipes (docs/LL.md, "Quantisation recipes"): the scales ride in the payload after the
    // token bytes; row_bytes is the travelling token row (DS_FP8E3M4: H E4M3 bytes).
    p.quant = call.recipe as i32;
    p.scale_bytes = call.scale_bytes as i32;
    p.round_scales = call.round_scales as i32;
    p.x_scales = opt_ptr(&a.in_scales);
    p.out_scales = opt_ptr(&a.out_scales);
    if let Some(peers) = direct {
        p.out_peers[..peers.len()].copy_from_slice(&peers);
        p.direct_out = 1;
    }
    let kernel = LlKernel::dispatch(
        h.params.num_topk,
        h.params.layout,
        topk.is(dtype::INT64),
        g.params.enable_mask,
    );
    run(g, h, kernel, p, call.send_only, |s, _| s.dispatch_bytes, stream)?;
    h.dispatched = true;
    Ok(())
}

/// Zero-copy (docs/ZERO_COPY.md): every rank's `outputs->tokens` when the dispatch stores its
/// payloads straight into them (RANK_MAJOR, a plain recipe, a window that every peer maps here),
/// else None (the staged path); under `zero_copy` ON no direct path is `ncclInvalidArgument`.
fn direct_outputs(g: &Group, h: &Handle, a: &DispatchArgs) -> Result<Option<Vec<u64>>> {
    let mode = g.params.zero_copy;
    // Ranks on other nodes (docs/MULTINODE.md) are reached through staging, never directly.
    // (A group without GPU state fails later, after the rules, as every dispatch does.)
    let local_only = g.ll().map_or(true, |ll| ll.buffers.remote().is_none());
    let eligible = local_only && zero_copy::ll_tokens_may_go_direct(h.params.layout, a.quant, &a.out_tokens);
    let peers = if eligible {
        crate::runtime::window::peer_addresses(g, &a.out_tokens, "outputs->tokens")?
    } else {
        None
    };
    // A window NCCL cannot map for some peer means a group that is not NVLink-only.
    let nvlink_only = local_only && (!eligible || peers.is_some());
    let direct = zero_copy::ll_dispatch_direct(
        mode,
        h.params.layout,
        a.quant,
        &a.out_tokens,
        a.out_scales.as_ref(),
        nvlink_only,
    )?;
    // Scales (QUANT_FWD) are staged for now: the kernel forwards tokens only.
    Ok(if direct.tokens { peers } else { None })
}

pub fn combine(g: &mut Group, h: &mut Handle, a: &CombineArgs, stream: cudaStream_t) -> Result<()> {
    let topk = routing(h)?;
    let call = check_combine(&g.params, &h.params, &topk, a)?;
    crate::host_profile::mark("checked");
    ep_core::ensure_usage!(
        h.dispatched,
        "ncclEpCombine needs an ncclEpDispatch on this handle first"
    );
    // EM: the weights applied on the receiving side are combine's outputs->topk_weights. Dispatch
    // moves rows as bytes (one kernel for every token type); combine has one per type.
    let mut p = call_params(
        g,
        h,
        &topk,
        &call,
        a.tokens.data,
        opt_ptr(&a.out_weights),
        a.out_tokens.data,
    )?;
    // NVFP4 (bf16 rows, checked): its own kernel, which reads the caller's global scales.
    let dt = if a.quant == COMB_QUANT_NVFP4 {
        p.comb_scales = opt_ptr(&a.in_scales);
        LlDtype::Nvfp4
    } else {
        LlDtype::from_nccl(call.dtype)?
    };
    // Rows to itself go unstaged when the receive phase runs in this call, while the caller's
    // expert outputs are still valid (a send_only operation's receive may come after the caller
    // reused them). The NVFP4 kernel always stages (it encodes while sending).
    p.self_direct = (!call.send_only && dt != LlDtype::Nvfp4) as i32;
    let kernel = LlKernel::combine(
        h.params.num_topk,
        h.params.layout,
        topk.is(dtype::INT64),
        g.params.enable_mask,
        dt,
    );
    let xbytes = |s: &LlStage, layout| match layout {
        Layout::ExpertMajor => s.combine_bytes,
        _ => s.combine_rm_bytes,
    };
    run(g, h, kernel, p, call.send_only, xbytes, stream)
}

/// Runs the receive phase of this handle's pending `send_only` operation, if any.
pub fn complete(g: &mut Group, h: &mut Handle, stream: cudaStream_t) -> Result<()> {
    // Without GPU state nothing can be pending.
    let Some(pend) = g.ll().ok().and_then(|l| pending_of(&l.pending, h.id)) else {
        return Ok(());
    };
    let mut p = pend.params;
    p.phases = PHASE_RECV;
    launch(g, pend.kernel, &mut p, stream)?;
    g.ll_mut()?.pending = None;
    Ok(())
}

/// The group's pending operation if handle `id` left it.
fn pending_of(pending: &Option<Pending>, id: HandleId) -> Option<Pending> {
    pending.filter(|p| p.handle == id)
}

/// `ncclEpHandleDestroy`: forgets the pending operation of handle `id`, if any (its receive
/// phase never runs); true when there was one. The epoch stays where the send phase left it,
/// so the next operation reuses its bank and tag (docs/LL.md, "Epoch, send_only, graphs").
pub fn forget_pending(pending: &mut Option<Pending>, id: HandleId) -> bool {
    let mine = pending_of(pending, id).is_some();
    if mine {
        *pending = None;
    }
    mine
}

// ---------------------------------------------------------------------------------------------
// Masks (docs/LL.md, "Masks and timeouts")

/// The mask block of a group created with `enable_mask`.
fn mask_ptr(g: &Group) -> Result<u64> {
    g.ll()?
        .mask
        .as_ref()
        .map(GroupMem::ptr)
        .ok_or_else(|| ep_core::internal_err!("a group with enable_mask has no mask buffer"))
}

/// `ncclEpMaskQuery`: copies the mask (`int[N]`, 1 active, 0 masked) into the caller's device
/// array, queued on `stream`.
pub fn mask_query(g: &Group, out: u64, stream: cudaStream_t) -> Result<()> {
    let src = mask_ptr(g)?;
    let _ctx = crate::cuda::context::CtxGuard::enter(g.device)?;
    // SAFETY: the mask holds N ints; `out` is the caller's device array of N ints (C contract).
    unsafe {
        memory::memcpy_dtod_async(
            out,
            src,
            4 * g.params.nranks as usize,
            memory::Stream::from_raw(stream.cast()),
        )
    }
}

/// `ncclEpMaskUpdate`: copies the caller's host array `int[N]` into the mask, queued on `stream`
/// (non-zero = active). The host array must stay valid until the copy ran; CUDA copies pageable
/// memory before returning (and may wait for the stream first).
pub fn mask_update(g: &mut Group, mask: &[std::ffi::c_int], stream: cudaStream_t) -> Result<()> {
    let dst = mask_ptr(g)?;
    let n = g.params.nranks as usize;
    ep_core::ensure_arg!(mask.len() == n, "the mask has {} entries for {n} ranks", mask.len());
    g.ll_mut()?.masked_on_host = masked_bits(mask);
    let _ctx = crate::cuda::context::CtxGuard::enter(g.device)?;
    // SAFETY: the device mask holds N ints and `mask` N ints (checked above); a copy from pageable
    // memory has read it before the call returns.
    unsafe {
        memory::memcpy_htod_async(
            dst,
            mask.as_ptr().cast(),
            4 * n,
            memory::Stream::from_raw(stream.cast()),
        )
    }
}

/// `ncclEpMaskClean`'s part across nodes (docs/MULTINODE.md, "Masks and dead peers"), after the
/// clean kernel brought this node's ranks to one epoch and the stream is idle: swaps
/// (sequence, epoch) with every remote rank and moves this rank's epoch to the latest of all.
/// False when the exchange did not complete within the group's timeout.
fn clean_remote(g: &Group, seq: u32, stream: cudaStream_t) -> Result<bool> {
    let ll = g.ll()?;
    let state = ll.state.ptr();
    let mut epoch = [0u32; 1];
    // SAFETY: `state` is the group's EpState (epoch first); the stream that wrote it is idle.
    unsafe { memory::memcpy_dtoh(&mut epoch, state)? };
    let limit = std::time::Duration::from_nanos(g.params.timeout_ns);
    // SAFETY: the caller's stream (C contract of ncclEpMaskClean); every rank of the group cleans
    // in the same order (collective).
    let Some(records) = (unsafe { ll.buffers.swap_records([seq, epoch[0], 0, 0], limit, stream) })? else {
        return Ok(false);
    };
    let latest = latest_epoch(epoch[0], records.iter().map(|(_, r)| r[1]));
    if latest != epoch[0] {
        // SAFETY: as above; the stream is idle (the exchange completed), so no kernel reads it.
        unsafe { memory::memcpy_htod(state, &[latest])? };
    }
    Ok(true)
}

/// The latest of `own` and `others`, epochs that only move forward and may wrap (pure).
pub fn latest_epoch(own: u32, others: impl Iterator<Item = u32>) -> u32 {
    others.fold(own, |best, e| if (e.wrapping_sub(best) as i32) > 0 { e } else { best })
}

/// The ranks (bit r, r < 64) a mask array marks masked: value 0, as the kernels read it
/// (`rank_active`: nonzero is active; pure).
pub fn masked_bits(mask: &[std::ffi::c_int]) -> u64 {
    ep_core::rank_set::ranks_where(mask.len(), |r| mask[r] == 0)
}

/// `ncclEpMaskClean` (collective over the ranks that take part): the mask-aware barrier of
/// kernels/ll_clean.cu, which also brings every rank to the same epoch; then every rank active
/// again, and the stream synchronised. Ranks that did not reach the barrier within the timeout
/// stay masked and the call fails with `ncclTimeout` (the async error flag is raised too).
pub fn mask_clean(g: &mut Group, stream: cudaStream_t) -> Result<()> {
    let mask = mask_ptr(g)?;
    ep_core::ensure_usage!(
        g.ll()?.pending.is_none(),
        "a send_only operation is pending on this group: call ncclEpComplete before ncclEpMaskClean"
    );
    ep_core::ensure_usage!(
        buffer_bytes(g)? > 0,
        "the group has no low-latency buffer yet (NCCL_EP_AUTO allocates it at the first handle): \
         create a handle before ncclEpMaskClean"
    );
    let remote = g.ll()?.buffers.remote().map_or(0, |r| r.mask);
    // Signal offsets do not depend on K: any layout that fits the buffer gives them.
    let lay = layout(g, 1)?;
    let mut p = base_params(g, &lay)?;
    let ll = g.ll_mut()?;
    ll.clean_seq = ll.clean_seq.wrapping_add(1).max(1);
    p.clean_seq = ll.clean_seq as i32;
    let n = g.params.nranks as usize;
    launch_ll(g.device, LlKernel::clean(), &p, 1, stream)?;
    let _ctx = crate::cuda::context::CtxGuard::enter(g.device)?;
    // SAFETY: the caller's stream (C contract); the mask holds N ints.
    let s = unsafe { memory::Stream::from_raw(stream.cast()) };
    // SAFETY: `mask` is this group's mask block (at least N ints, allocated with the group), in
    // the context entered above; the write is ordered after the clean kernel on the same stream.
    unsafe { memory::memset_d32_async(mask, 1, n, s)? };
    memory::stream_synchronize(s)?;
    let mut missing = g.ll()?.clean_missing();
    if remote != 0 && !clean_remote(g, p.clean_seq as u32, stream)? {
        // The exchange with the other nodes did not complete: which rank is late cannot be
        // told apart, so all of them stay masked (and NCCL's kernel holds the stream until
        // the communicator is revoked).
        missing |= remote;
        g.ll()?.err.raise_flag();
    }
    g.ll_mut()?.masked_on_host = missing;
    if missing == 0 {
        return Ok(());
    }
    for r in ep_core::rank_set::members(missing, n) {
        // SAFETY: entry r of the mask.
        unsafe { memory::memset_d32_async(mask + 4 * r as u64, 0, 1, s)? };
    }
    memory::stream_synchronize(s)?;
    Err(ep_core::error::Error::new(
        ep_core::error::ErrorKind::Timeout,
        format!(
            "rank(s) {} did not reach ncclEpMaskClean within {:.1} ms: they stay masked (the async error flag is raised)",
            ep_core::rank_set::list(missing),
            g.params.timeout_ns as f64 / 1e6
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(handle: HandleId) -> Option<Pending> {
        Some(Pending {
            handle,
            kernel: LlKernel::clean(),
            params: LlParams::default(),
        })
    }

    #[test]
    fn latest_epoch_across_nodes() {
        assert_eq!(latest_epoch(5, [3u32, 7, 6].into_iter()), 7);
        assert_eq!(latest_epoch(5, std::iter::empty()), 5);
        assert_eq!(latest_epoch(9, [9u32, 2].into_iter()), 9, "behind stays behind");
        // Across the wrap: u32::MAX + 2 is later than u32::MAX.
        assert_eq!(latest_epoch(u32::MAX, [1u32].into_iter()), 1);
        assert_eq!(latest_epoch(1, [u32::MAX].into_iter()), 1);
    }

    #[test]
    fn host_mask_bits() {
        assert_eq!(masked_bits(&[1, 1, 1, 1]), 0);
        assert_eq!(
            masked_bits(&[1, 0, 7, 0]),
            0b1010,
            "nonzero is active, as the kernels read it"
        );
        assert_eq!(masked_bits(&[]), 0);
        let mut big = vec![1; 70];
        big[63] = 0;
        big[65] = 0;
        assert_eq!(masked_bits(&big), 1u64 << 63, "ranks past 64 have no bit");
    }

    /// The pending table is keyed by handle id: only its own handle completes or forgets it.
    #[test]
    fn pending_belongs_to_its_handle() {
        let (a, b) = (HandleId::next(), HandleId::next());
        assert_ne!(a, b);
        let mut slot = op(a);
        assert!(pending_of(&slot, b).is_none(), "another handle completes nothing");
        assert_eq!(pending_of(&slot, a).map(|p| p.handle), Some(a));
        assert!(!forget_pending(&mut slot, b), "destroying another handle keeps it");
        assert!(slot.is_some());
        assert!(forget_pending(&mut slot, a), "destroying its handle forgets it");
        assert!(slot.is_none());
        assert!(!forget_pending(&mut slot, a), "nothing left to forget");
    }

    /// A handle made after another was destroyed never inherits its operation, whatever
    /// address it gets: ids are never reused, across threads too.
    #[test]
    fn handle_ids_are_never_reused() {
        let ids: Vec<HandleId> = std::thread::scope(|s| {
            let t: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..1000).map(|_| HandleId::next()).collect::<Vec<_>>()))
                .collect();
            t.into_iter().flat_map(|t| t.join().unwrap()).collect()
        });
        let set: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(set.len(), ids.len());
        let old = HandleId::next();
        let slot = op(old);
        assert!(pending_of(&slot, HandleId::next()).is_none());
    }
}
