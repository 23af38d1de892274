//! Low-latency mode on the GPU: the group's buffer and device state, and dispatch / combine /
//! complete launches (protocol in docs/LL.md).

use crate::abi::enums::{ExpertIdKind, Layout, dtype};
use crate::abi::types::cudaStream_t;
use crate::core::error::Result;
use crate::core::ll_layout::LlLayout;
use crate::core::ll_rules::{LlCall, check_combine, check_dispatch};
use crate::core::op_args::{CombineArgs, DispatchArgs};
use crate::core::tensor::TensorView;
use crate::cuda::memory::{self, DeviceMem, PinnedHostMem};
use crate::runtime::alloc::GroupMem;
use crate::runtime::group::{Group, Membership};
use crate::runtime::handle::Handle;
use crate::runtime::kernels::{LlKernel, launch_ll};
use crate::runtime::ll_params::{EP_STATE_BYTES, LL_MAX_RANKS, LlParams, PHASE_RECV, PHASE_SEND};
use crate::transport::ipc::OpenedPeers;

/// Threads per block of the LL kernels (their `__launch_bounds__`).
pub const LL_THREADS: u32 = 512;

/// A `send_only` operation whose receive phase waits for `ncclEpComplete`.
#[derive(Clone, Copy, Debug)]
pub struct Pending {
    pub handle: usize,
    pub kernel: LlKernel,
    pub params: LlParams,
}

/// Where this rank's peers' buffers are.
#[derive(Debug)]
pub enum PeerTable {
    /// None yet (NCCL groups before their first buffer; local groups always: their world
    /// hands out the peers at each launch).
    Unset,
    /// Fixed after the IPC exchange of the last allocation.
    Fixed { ptrs: Vec<u64>, _opened: OpenedPeers },
}

/// The low-latency state of one rank's group.
pub struct LlState {
    /// This rank's communication buffer, NCCL groups only (None until a handle sizes it, for
    /// AUTO); local groups keep every rank's buffer in their `LocalWorld`.
    pub buffer: Option<DeviceMem>,
    pub peers: PeerTable,
    /// `struct EpState` (epoch and block counters), zeroed at creation.
    pub state: GroupMem,
    /// Host-visible flag the kernels raise when a wait times out.
    pub err: PinnedHostMem,
    pub pending: Option<Pending>,
    /// Blocks per LL kernel.
    pub blocks: u32,
    pub timeout_cycles: i64,
    /// `NCCL_EP_PROFILE=1`: per-block phase timestamps (debugging only: each launch then waits).
    pub prof: Option<PinnedHostMem>,
}

impl LlState {
    /// Device state for a new group (buffer sized later, or now for an explicit size).
    pub fn new(g: &Group, ranks_on_device: usize) -> Result<LlState> {
        let dev = g.device;
        let _ctx = crate::cuda::context::CtxGuard::enter(dev)?;
        crate::ensure_usage!(
            g.params.nranks as usize <= LL_MAX_RANKS,
            "LOW_LATENCY groups support at most {LL_MAX_RANKS} ranks, this one has {}",
            g.params.nranks
        );
        let state = GroupMem::alloc(dev, EP_STATE_BYTES, g.custom_alloc)?;
        // SAFETY: state holds EP_STATE_BYTES bytes; the legacy stream is synchronised right after.
        unsafe { memory::memset_d8_async(state.ptr(), 0, EP_STATE_BYTES, memory::Stream::LEGACY_DEFAULT)? };
        memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
        let err = PinnedHostMem::alloc(dev, 4)?;
        let sms = crate::cuda::driver::sm_count(dev)? as u32;
        let mut blocks = (sms / ranks_on_device.max(1) as u32).max(1);
        if g.params.max_num_sms != 0 {
            blocks = blocks.min(g.params.max_num_sms);
        }
        let khz = crate::cuda::driver::device_attribute(
            dev,
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CLOCK_RATE,
        )? as i64;
        let timeout_cycles = ((g.params.timeout_ns as i128 * khz as i128) / 1_000_000).min(i64::MAX as i128) as i64;
        let prof = match std::env::var("NCCL_EP_PROFILE").as_deref() {
            Ok("1") => Some(PinnedHostMem::alloc(dev, 64 * blocks as usize)?),
            _ => None,
        };
        Ok(LlState {
            buffer: None,
            peers: PeerTable::Unset,
            state,
            err,
            pending: None,
            blocks,
            timeout_cycles,
            prof,
        })
    }

    /// True when a kernel timed out waiting for a peer since the flag was last cleared.
    pub fn timed_out(&self) -> bool {
        // SAFETY: a 4-byte pinned allocation the kernels write with atomics; read as an atomic.
        unsafe {
            (*(self.err.host_ptr() as *const std::sync::atomic::AtomicI32)).load(std::sync::atomic::Ordering::Acquire)
                != 0
        }
    }

    /// Clears the flag `timed_out` reads.
    pub fn clear_timeout(&self) {
        // SAFETY: as in `timed_out`.
        unsafe {
            (*(self.err.host_ptr() as *const std::sync::atomic::AtomicI32))
                .store(0, std::sync::atomic::Ordering::Release)
        }
    }
}

/// The buffer layout a handle of top-k `k` uses in this group.
pub fn layout(g: &Group, k: u32) -> Result<LlLayout> {
    let p = &g.params;
    LlLayout::new(p.nranks, p.num_experts, p.max_tokens, p.max_token_bytes, k)
}

/// Bytes of this rank's communication buffer (0 before the first handle, for AUTO).
fn buffer_bytes(g: &Group) -> Result<usize> {
    Ok(match &g.membership {
        Membership::Local { world } => world.buffer_bytes(),
        Membership::Nccl { .. } => g.ll()?.buffer.as_ref().map_or(0, |b| b.len()),
    })
}

/// Makes sure this rank's buffer holds `lay` (allocating or growing it for AUTO; collective for
/// NCCL groups; for local groups every rank's buffer at once). Must not run while operations of
/// the group are in flight.
pub fn ensure_buffer(g: &mut Group, lay: &LlLayout) -> Result<()> {
    let have = buffer_bytes(g)?;
    if have > 0 && lay.fits(have) {
        return Ok(());
    }
    let explicit = g.params.rdma_buffer_size as usize;
    let bytes = if explicit != 0 {
        crate::ensure_usage!(
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
    let nranks = g.params.nranks as usize;
    let dev = g.device;
    match &g.membership {
        Membership::Local { world } => world.ensure(bytes)?,
        Membership::Nccl { comm, .. } => {
            let comm = *comm;
            let _ctx = crate::cuda::context::CtxGuard::enter(dev)?;
            if have > 0 {
                // Growing: nothing of this group may still run on the GPU.
                crate::cuda::context::synchronize_current()?;
            }
            let ll = g.ll_mut()?;
            ll.buffer = None;
            ll.peers = PeerTable::Unset;
            let buf = DeviceMem::alloc(dev, bytes)?;
            // SAFETY: the buffer holds `bytes`; zero flags are never a valid tag.
            unsafe { memory::memset_d8_async(buf.ptr(), 0, bytes, memory::Stream::LEGACY_DEFAULT)? };
            memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
            let nccl = crate::transport::nccl::Nccl::get()?;
            // SAFETY: the communicator is the caller's; all ranks size buffers in lockstep.
            let (ptrs, opened) = unsafe { crate::transport::ipc::exchange(nccl, comm, rank, nranks, dev, &buf) }?;
            let ll = g.ll_mut()?;
            ll.buffer = Some(buf);
            ll.peers = PeerTable::Fixed { ptrs, _opened: opened };
        }
    }
    crate::abi::guard::log_info(format_args!(
        "rank {rank}: low-latency buffer of {bytes} bytes (K = {})",
        lay.topk
    ));
    Ok(())
}

/// The parameters every LL launch shares: peers, layout offsets, state.
fn base_params(g: &Group, lay: &LlLayout) -> Result<LlParams> {
    let ll = g.ll()?;
    let (peers, bytes) = match (&ll.peers, &g.membership) {
        (_, Membership::Local { world }) => world.peers(lay.total_bytes)?,
        (PeerTable::Fixed { ptrs, .. }, _) => (ptrs.clone(), ll.buffer.as_ref().map_or(0, |b| b.len())),
        (PeerTable::Unset, _) => return Err(crate::invalid_usage!("the group has no low-latency buffer yet")),
    };
    crate::ensure_usage!(lay.fits(bytes), "the low-latency buffer is too small for this handle");
    let mut p = LlParams::default();
    p.peers[..peers.len()].copy_from_slice(&peers);
    p.bank_stride = LlLayout::bank_stride(bytes) as u64;
    p.off_dflag = lay.dispatch_flag_off as u64;
    p.off_ecount = lay.expert_count_off as u64;
    p.off_cflag = lay.combine_flag_off as u64;
    p.off_data = lay.data_off as u64;
    p.state = ll.state.ptr();
    p.err = ll.err.device_ptr();
    p.timeout_cycles = ll.timeout_cycles;
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

fn no_pending(g: &Group) -> Result<()> {
    crate::ensure_usage!(
        g.ll()?.pending.is_none(),
        "a send_only operation is pending on this group: call ncclEpComplete before the next dispatch or combine"
    );
    Ok(())
}

fn opt_ptr(t: &Option<crate::core::tensor::TensorView>) -> u64 {
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

fn run(
    g: &mut Group,
    h: &Handle,
    kernel: LlKernel,
    mut p: LlParams,
    send_only: bool,
    stream: cudaStream_t,
) -> Result<()> {
    p.phases = if send_only { PHASE_SEND } else { PHASE_SEND | PHASE_RECV };
    launch(g, kernel, &mut p, stream)?;
    if send_only {
        g.ll_mut()?.pending = Some(Pending {
            handle: h as *const Handle as usize,
            kernel,
            params: p,
        });
    }
    Ok(())
}

/// The handle's routing (set by ncclEpUpdateHandle / ncclEpCreateHandle).
fn routing(h: &Handle) -> Result<TensorView> {
    h.topk_idx.clone().ok_or_else(|| {
        crate::invalid_usage!("the handle has no routing: call ncclEpUpdateHandle (or ncclEpCreateHandle) first")
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
    let kernel = LlKernel::dispatch(h.params.num_topk, h.params.layout, topk.dtype == dtype::INT64);
    run(g, h, kernel, p, call.send_only, stream)?;
    h.dispatched = true;
    Ok(())
}

pub fn combine(g: &mut Group, h: &mut Handle, a: &CombineArgs, stream: cudaStream_t) -> Result<()> {
    let topk = routing(h)?;
    let call = check_combine(&g.params, &h.params, &topk, a)?;
    crate::ensure_usage!(
        h.dispatched,
        "ncclEpCombine needs an ncclEpDispatch on this handle first"
    );
    // EM: the weights applied on the receiving side are combine's outputs->topk_weights.
    let p = call_params(
        g,
        h,
        &topk,
        &call,
        a.tokens.data,
        opt_ptr(&a.out_weights),
        a.out_tokens.data,
    )?;
    let kernel = LlKernel::combine(h.params.num_topk, h.params.layout, topk.dtype == dtype::INT64);
    run(g, h, kernel, p, call.send_only, stream)
}

/// Runs the receive phase of this handle's pending `send_only` operation, if any.
pub fn complete(g: &mut Group, h: &mut Handle, stream: cudaStream_t) -> Result<()> {
    // Without GPU state nothing can be pending.
    let Some(pend) = g.ll.as_ref().and_then(|l| l.pending) else {
        return Ok(());
    };
    if pend.handle != h as *const Handle as usize {
        return Ok(());
    }
    let mut p = pend.params;
    p.phases = PHASE_RECV;
    launch(g, pend.kernel, &mut p, stream)?;
    g.ll_mut()?.pending = None;
    Ok(())
}
