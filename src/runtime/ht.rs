//! High-throughput mode on the GPU (docs/HT.md, "GPU design"): the group buffer and device
//! state, the metadata pass of ncclEpCreateHandle / ncclEpUpdateHandle, and dispatch / combine.
//!
//! Every HT operation (an update, a dispatch or a combine) is an *open* (each rank publishes
//! its pointers and raises its open flag in every peer's buffer), a *pull* (each rank reads
//! what it needs from its peers) and a *close* (each rank tells its peers it is done reading
//! their data and waits until they are done with its own, then advances the group epoch: the
//! `ht_close` kernel after a metadata pass, the last block of the kernel in dispatch and
//! combine). Flags carry `epoch + 1`, so they are never cleaned.

use crate::cuda::memory::{self, PinnedHostMem, Stream};
use crate::runtime::alloc::GroupMem;
use crate::runtime::group::{Group, ModeState};
use crate::runtime::handle::Handle;
use crate::runtime::ht_kernels::{HtDtype, HtModule, launch_ht};
use crate::runtime::ht_params::{HtHdr, HtParams};
use crate::sys::cudaStream_t;
use crate::transport::peers::PeerBuffers;
use ep_core::enums::Algorithm;
use ep_core::enums::{DType, ExpertIdKind, Layout, OverflowPolicy, PassDir, dtype};
use ep_core::error::Result;
use ep_core::handle_rules::HandleParams;
use ep_core::ht_errors::{BadExpertId, HtPlanError};
use ep_core::ht_layout::{HT_PIECES, HtExchange, HtHandleLayout, HtLayout, staging_rows};
use ep_core::ht_rules::{HtLayoutOutputs, check_combine, check_dispatch};
use ep_core::op_args::{CombineArgs, DispatchArgs};
use ep_core::tensor::TensorView;

/// The high-throughput state of one rank's group.
pub struct HtState {
    /// This rank's group buffer and every rank's as seen from here; empty until the first
    /// handle sizes it.
    pub buffers: PeerBuffers,
    /// Some peer lives in another process: peers read staging copies, never caller tensors.
    pub multi_process: bool,
    /// The largest layout the buffer was sized for.
    pub sized: Option<HtLayout>,
    /// `struct EpState` (the epoch), zeroed at creation.
    pub state: GroupMem,
    /// Host-visible flag: a wait timed out, or a captured update overflowed under TRAP.
    pub err: PinnedHostMem,
    /// Where the host reads a handle header (copied on the caller's stream).
    pub hdr_host: PinnedHostMem,
    /// Blocks of the data-parallel kernels.
    pub blocks: u32,
    /// Bound on every GPU wait in nanoseconds (0 = none), as LL's: the kernels read %globaltimer.
    pub timeout_ns: i64,
}

/// The group's high-throughput state (this module's view of [`Group::mode`]).
pub trait HtGroup {
    fn ht(&self) -> Result<&HtState>;
    fn ht_mut(&mut self) -> Result<&mut HtState>;
}

impl HtGroup for Group {
    fn ht(&self) -> Result<&HtState> {
        self.mode_state(Algorithm::HighThroughput)
    }
    fn ht_mut(&mut self) -> Result<&mut HtState> {
        self.mode_state_mut(Algorithm::HighThroughput)
    }
}

impl ModeState for HtState {
    fn buffers_mut(&mut self) -> &mut PeerBuffers {
        &mut self.buffers
    }
    fn timed_out(&self) -> bool {
        HtState::timed_out(self)
    }
    fn clear_timeout(&self) {
        HtState::clear_timeout(self)
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl HtState {
    pub fn new(g: &Group, ranks_on_device: usize) -> Result<HtState> {
        let dev = g.device;
        let _ctx = crate::cuda::context::CtxGuard::enter(dev)?;
        // Checks N and E against the kernels' limits now rather than at the first handle.
        HtLayout::for_group(&g.params, 1, 0)?;
        let state = g.zeroed_ep_state()?;
        let err = PinnedHostMem::alloc(dev, 4)?;
        let hdr_host = PinnedHostMem::alloc(dev, std::mem::size_of::<HtHdr>())?;
        let blocks = g.kernel_blocks(ranks_on_device)?;
        let timeout_ns = g.kernel_timeout_ns();
        Ok(HtState {
            buffers: g.peer_buffers(),
            multi_process: false,
            sized: None,
            state,
            err,
            hdr_host,
            blocks,
            timeout_ns,
        })
    }

    /// True when a kernel timed out (or a captured update overflowed) since the last clear.
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
}

/// Allocates (NCCL groups: and exchanges) this rank's group buffer of `bytes`, zeroed.
fn allocate(g: &mut Group, bytes: usize) -> Result<()> {
    let st = g.ht_mut()?;
    // All ranks size buffers in lockstep and no operation of the group is in flight (handles
    // are created collectively).
    st.buffers.ensure(bytes)?;
    st.multi_process |= st.buffers.cross_process();
    Ok(())
}

fn buffer_bytes(g: &Group) -> Result<usize> {
    Ok(g.ht()?.buffers.len())
}

/// Makes sure this rank's group buffer holds handles of (`lay`, `k`): allocated at the first
/// handle, grown (collectively) when a later one needs more. Must not run while operations of
/// the group are in flight.
pub fn ensure_buffer(g: &mut Group, hp: &HandleParams) -> Result<()> {
    HtHandleLayout::new(&g.params, hp)?;
    let prev = g.ht()?.sized;
    let k = hp.num_topk.max(prev.map_or(0, |s| s.topk as u32));
    let stage = |g: &Group| -> Result<usize> {
        Ok(if g.ht()?.multi_process {
            staging_rows(&g.params, hp).max(prev.map_or(0, |s| s.staging_rows))
        } else {
            0
        })
    };
    let mut want = HtLayout::for_group(&g.params, k, stage(g)?)?;
    if prev.is_some() && buffer_bytes(g)? >= want.total_bytes {
        g.ht_mut()?.buffers.ensure_mirrors(want.total_bytes)?;
        g.ht_mut()?.sized = Some(want);
        return Ok(());
    }
    allocate(g, want.total_bytes)?;
    if stage(g)? != want.staging_rows {
        // The exchange found peers in other processes: they read staging copies.
        want = HtLayout::for_group(&g.params, k, stage(g)?)?;
        allocate(g, want.total_bytes)?;
    }
    // Remote ranks (docs/MULTINODE.md, "HT across nodes"): a mirror of each one's buffer, the
    // same layout (nothing for groups on one node).
    g.ht_mut()?.buffers.ensure_mirrors(want.total_bytes)?;
    g.ht_mut()?.sized = Some(want);
    crate::log::log_info(format_args!(
        "rank {}: high-throughput buffer of {} bytes (K = {k}, {} staging rows)",
        g.params.rank, want.total_bytes, want.staging_rows
    ));
    Ok(())
}

/// The parameters every HT launch shares: peers, buffer offsets, state, sizes.
fn base_params(g: &Group, h: &Handle) -> Result<HtParams> {
    let st = g.ht()?;
    let lay = st
        .sized
        .ok_or_else(|| ep_core::invalid_usage!("the group has no high-throughput buffer yet"))?;
    let (peers, _) = st.buffers.peers(lay.total_bytes, "high-throughput")?;
    let hl = HtHandleLayout::new(&g.params, &h.params)?;
    let mut p = HtParams::default();
    p.peers[..peers.len()].copy_from_slice(&peers);
    p.state = st.state.ptr();
    p.err = st.err.device_ptr();
    p.hmem = h.meta_ptr();
    p.off_open = lay.open_off as u64;
    p.off_done = lay.done_off as u64;
    p.off_ptrs = lay.ptrs_off as u64;
    p.off_own = lay.own_off as u64;
    p.off_all = lay.all_off as u64;
    p.off_cnt = lay.cnt_off as u64;
    p.off_tot = lay.tot_off as u64;
    p.off_zoff = lay.zoff_off as u64;
    p.off_rbase = lay.rbase_off as u64;
    p.off_sbase = lay.sbase_off as u64;
    p.off_stage_tok = lay.stage_tok_off as u64;
    p.off_stage_w = lay.stage_w_off as u64;
    p.recv_off = hl.recv_off as u64;
    p.send_off = hl.send_off as u64;
    p.bwd_off = hl.bwd_off as u64;
    p.inv_off = hl.inv_off as u64;
    p.timeout_ns = st.timeout_ns;
    p.rank = g.params.rank as i32;
    p.nranks = g.params.nranks as i32;
    p.num_experts = g.params.num_experts as i32;
    p.local_experts = g.params.local_experts as i32;
    p.max_tokens = g.params.max_tokens as i32;
    p.topk = h.params.num_topk as i32;
    p.rows = h.topk_idx.as_ref().map_or(0, |t| t.dim(0)) as i32;
    p.recv_rows = hl.recv_rows as i32;
    p.piece_len = lay.piece_len as i32;
    p.align = h.params.expert_alignment as i32;
    p.drop = (g.params.overflow == OverflowPolicy::Drop) as i32;
    p.staged = st.multi_process as i32;
    p.remote = st.buffers.remote().map_or(0, |r| r.mask);
    Ok(p)
}

fn sync(stream: cudaStream_t) -> Result<()> {
    // SAFETY: the caller's stream (C contract).
    memory::stream_synchronize(unsafe { Stream::from_raw(stream.cast()) })
}

fn capturing(stream: cudaStream_t) -> Result<bool> {
    // SAFETY: the caller's stream (C contract).
    memory::stream_is_capturing(unsafe { Stream::from_raw(stream.cast()) })
}

/// Reads the handle header: a copy on the caller's stream into pinned memory, then a wait for
/// the stream. No synchronous copy: that would go through the legacy stream, which CUDA makes
/// wait for (and hold back) the kernels of every other stream of the device, also those of the
/// other ranks of a local group.
fn read_hdr(g: &Group, h: &Handle, stream: cudaStream_t) -> Result<HtHdr> {
    let st = g.ht()?;
    let _ctx = crate::cuda::context::CtxGuard::enter(g.device)?;
    let bytes = std::mem::size_of::<HtHdr>();
    // SAFETY: the handle block starts with the header; the pinned buffer holds `bytes`.
    unsafe {
        memory::memcpy_dtoh_async(
            st.hdr_host.host_ptr(),
            h.meta_ptr(),
            bytes,
            Stream::from_raw(stream.cast()),
        )?;
    }
    sync(stream)?;
    // SAFETY: the copy has finished; every bit pattern is a valid HtHdr.
    Ok(unsafe { std::ptr::read_volatile(st.hdr_host.host_ptr() as *const HtHdr) })
}

fn ptr(t: &Option<TensorView>) -> u64 {
    t.as_ref().map_or(0, |t| t.data)
}

/// The metadata pass: exchanges every rank's routing and builds the handle's tables and the
/// `layout_info` outputs on `stream`. When the stream is not capturing, waits for it and
/// reports bad expert ids and TRAP overflows as errors (the handle is then left without
/// routing).
pub fn update(
    g: &mut Group,
    h: &mut Handle,
    topk: TensorView,
    outs: &HtLayoutOutputs,
    stream: cudaStream_t,
) -> Result<()> {
    h.topk_idx = None;
    h.dispatched = false;
    h.ht_unchecked = false;
    let dev = g.device;
    let _ctx = crate::cuda::context::CtxGuard::enter(dev)?;
    let cap = capturing(stream)?;
    let rows = topk.dim(0);
    let mut p = base_params(g, h)?;
    p.rows = rows as i32;
    p.in0 = topk.data;
    let out =
        |c: &Option<ep_core::ht_rules::CounterOut>| c.map_or((0, 0), |c| (c.data, (c.dtype == dtype::INT64) as i32));
    (p.out0, p.ec64) = out(&outs.expert_counters);
    let (o1, e1) = out(&outs.expert_offsets);
    (p.out1, p.ec64) = (o1, p.ec64.max(e1));
    (p.out3, p.tot64) = out(&outs.recv_total_counter);
    p.capturing = cap as i32;
    let em = h.params.layout == Layout::ExpertMajor;
    let m = HtModule::Meta {
        idx64: topk.is(dtype::INT64),
        em,
    };
    let blocks = g.ht()?.blocks;
    let smem = 4 * (g.params.num_experts + g.params.nranks) as usize;
    launch_ht(dev, m, "ht_reset", &p, 1, 0, stream)?;
    launch_ht(dev, m, "ht_convert", &p, blocks, 0, stream)?;
    exchange(g, m, &p, HtExchange::Update, stream)?;
    launch_ht(dev, m, "ht_pull", &p, blocks, 0, stream)?;
    launch_ht(dev, m, "ht_close", &p, 1, 0, stream)?;
    launch_ht(dev, m, "ht_count", &p, g.params.nranks * HT_PIECES as u32, smem, stream)?;
    launch_ht(dev, m, "ht_offsets", &p, 1, smem, stream)?;
    if em {
        // The inverse table: -1 wherever ht_assign writes no row (no local expert, dropped).
        let words = p.nranks as usize * p.max_tokens as usize * p.topk as usize;
        // SAFETY: inv[N][B][K] lies inside the handle's metadata block (HtHandleLayout, whose
        // offset base_params put in p.inv_off); stream-ordered before ht_assign, which fills it.
        unsafe { memory::memset_d32_async(p.hmem + p.inv_off, u32::MAX, words, Stream::from_raw(stream.cast()))? };
    }
    launch_ht(dev, m, "ht_assign", &p, blocks, 0, stream)?;
    h.topk_idx = Some(topk);
    if cap {
        return Ok(());
    }
    if g.ht()?.buffers.peers_share_thread() {
        // The ranks of a local group may all be driven by this thread: waiting here for the
        // exchange would wait for updates not issued yet. The next dispatch or combine on the
        // handle checks the result instead.
        h.ht_unchecked = true;
        return Ok(());
    }
    check_update(g, h, stream)
}

/// Reads the header of a finished update and turns a bad routing entry (on any rank) or a TRAP
/// overflow (of any rank) into the error the update reports; the handle then has no routing.
fn check_update(g: &Group, h: &mut Handle, stream: cudaStream_t) -> Result<()> {
    h.ht_unchecked = false;
    let hd = read_hdr(g, h, stream)?;
    let k = h.params.num_topk as usize;
    let b = g.params.max_tokens as usize;
    let err = if hd.bad_rank > 0 {
        let idx = b * k - hd.bad_code as usize;
        Some(HtPlanError::BadExpertId(BadExpertId {
            rank: hd.bad_rank as usize - 1,
            row: idx / k,
            k: idx % k,
            value: hd.bad_value,
            num_experts: g.params.num_experts as usize,
        }))
    } else if hd.overflow_rank > 0 {
        Some(HtPlanError::Overflow {
            rank: hd.overflow_rank as usize - 1,
            count: hd.overflow_total as usize,
            budget: HtHandleLayout::new(&g.params, &h.params)?.recv_rows,
        })
    } else {
        None
    };
    if let Some(e) = err {
        h.topk_idx = None;
        return Err(e.to_error());
    }
    Ok(())
}

/// A local group's update is checked by the first dispatch or combine after it (outside graph
/// capture; this waits for the stream once).
fn check_pending(g: &Group, h: &mut Handle, stream: cudaStream_t) -> Result<()> {
    if h.ht_unchecked && !capturing(stream)? {
        check_update(g, h, stream)
            .map_err(|e| e.context(format_args!("the last ncclEpUpdateHandle on this handle failed")))?;
    }
    Ok(())
}

fn routed(h: &Handle) -> Result<usize> {
    h.topk_idx.as_ref().map(|t| t.dim(0)).ok_or_else(|| {
        ep_core::invalid_usage!(
            "the handle has no routing: call ncclEpUpdateHandle (or ncclEpCreateHandle) first, and check that it succeeded"
        )
    })
}

/// The rows this rank received (after drops): the device count, read on the host (eager mode
/// only: this synchronises the stream).
fn eager_count(g: &Group, h: &Handle, stream: cudaStream_t, what: &str) -> Result<usize> {
    ep_core::ensure_usage!(
        !capturing(stream)?,
        "{what} in eager mode (max_recv_tokens_per_rank = 0) reads the receive count on the host and cannot be captured in a CUDA graph"
    );
    Ok(read_hdr(g, h, stream)?.count.max(0) as usize)
}

/// Copies `bytes` from a caller tensor into this rank's staging (groups spanning processes).
fn stage(g: &Group, off: usize, src: u64, bytes: usize, stream: cudaStream_t) -> Result<()> {
    if bytes == 0 || src == 0 {
        return Ok(());
    }
    let dst = g.ht()?.buffers.own();
    // SAFETY: the staging region holds at least `bytes` (sized by the receive bound); the
    // caller's tensor holds them (checked shapes).
    unsafe { memory::memcpy_dtod_async(dst + off as u64, src, bytes, Stream::from_raw(stream.cast())) }
}

/// Groups with remote ranks (docs/MULTINODE.md, "HT across nodes"), after this rank's data for
/// the operation is in its buffer and before the pull: `ht_publish` puts this rank's open flag
/// and pointers into its own slots, then one NCCL group moves what `x` names of the buffer into
/// every remote rank's mirror of it (and theirs into ours), on the caller's stream. Sizes come
/// from the layout and the call, the same on every rank and every time (graph capturable).
/// Nothing for groups on one node.
fn exchange(g: &Group, m: HtModule, p: &HtParams, x: HtExchange, stream: cudaStream_t) -> Result<()> {
    if p.remote == 0 {
        return Ok(());
    }
    let st = g.ht()?;
    let lay = st
        .sized
        .ok_or_else(|| ep_core::invalid_usage!("the group has no high-throughput buffer yet"))?;
    let ranges = lay.exchange_ranges(x)?;
    launch_ht(g.device, m, "ht_publish", p, 1, 0, stream)?;
    // SAFETY: the caller's stream (C contract of the operation); every rank of the group runs
    // its operations in the same order with the same sizes (collective, as NVIDIA's).
    unsafe { st.buffers.exchange_ranges(&ranges, stream) }
}

/// Launches the phase's one kernel; its last block closes the operation (kernels/ht_common.cuh
/// `close_when_last`).
fn finish(g: &Group, m: HtModule, name: &'static str, p: &HtParams, stream: cudaStream_t) -> Result<()> {
    launch_ht(g.device, m, name, p, g.ht()?.blocks, 0, stream)
}

fn token_dtype(dt: DType) -> HtDtype {
    match dt {
        dtype::FLOAT16 => HtDtype::F16,
        dtype::FLOAT32 => HtDtype::F32,
        _ => HtDtype::Bf16,
    }
}

pub fn dispatch(g: &mut Group, h: &mut Handle, a: &DispatchArgs, stream: cudaStream_t) -> Result<()> {
    routed(h)?;
    check_pending(g, h, stream)?;
    let topk = h.topk_idx.unwrap_or_else(|| unreachable!());
    let call = check_dispatch(&g.params, &h.params, &topk, a)?;
    // Zero-copy rules only: the pull design already writes outputs->tokens directly, and pulled
    // inputs are staged whether windowed or not (docs/ZERO_COPY.md, docs/HT.md "Zero-copy").
    ep_core::zero_copy::ht_dispatch(g.params.zero_copy, &a.out_tokens)?;
    let (t, k) = (call.tokens, h.params.num_topk as usize);
    let em = h.params.layout == Layout::ExpertMajor;
    let bwd = call.pass == PassDir::Backward;
    let hl = HtHandleLayout::new(&g.params, &h.params)?;
    if call.eager {
        let count = eager_count(g, h, stream, "ncclEpDispatch")?;
        ep_core::ensure_arg!(
            count <= call.recv_rows,
            "this rank receives {count} rows (recv_total_counter after the update), but the dispatch outputs hold {}",
            call.recv_rows
        );
    }
    let _ctx = crate::cuda::context::CtxGuard::enter(g.device)?;
    let mut p = base_params(g, h)?;
    p.row_bytes = call.row_bytes as i32;
    p.in0 = a.tokens.data;
    p.in1 = ptr(&a.in_weights);
    p.out0 = a.out_tokens.data;
    p.out1 = ptr(&a.out_topk_idx);
    p.out2 = ptr(&a.out_weights);
    p.recv_global = (call.recv_kind == ExpertIdKind::Global) as i32;
    // Rows [count, S) of the forward top-k outputs are reset (none when eager).
    p.recv_rows = if call.eager { 0 } else { hl.recv_rows as i32 };
    // QUANT_FWD: each row's scales travel with it, into the same row of outputs->scales.
    if let Some(sc) = &call.scales {
        p.in2 = sc.input;
        p.out4 = sc.output;
        p.scale_bytes = sc.row_bytes as i32;
    }
    if p.staged != 0 {
        let lay = g.ht()?.sized.unwrap_or_else(|| unreachable!());
        stage(g, lay.stage_tok_off, a.tokens.data, t * call.row_bytes, stream)?;
        stage(g, lay.stage_w_off, p.in1, t * k * 4, stream)?;
        if let Some(sc) = &call.scales {
            // After the B token rows: B · (row + scale bytes) ≤ B · Hb ≤ the token staging
            // (max(B, S) rows of Hb), so the recipe needs no room of its own.
            let off = lay.stage_tok_off + g.params.max_tokens as usize * call.row_bytes;
            stage(g, off, sc.input, t * sc.row_bytes, stream)?;
        }
    }
    let m = HtModule::Dispatch { em, bwd };
    let x = HtExchange::Dispatch {
        row_bytes: call.row_bytes,
        scale_bytes: p.scale_bytes as usize,
        weights_topk: if bwd { 0 } else { k },
    };
    exchange(g, m, &p, x, stream)?;
    finish(g, m, "ht_dispatch_kernel", &p, stream)?;
    h.dispatched = true;
    Ok(())
}

pub fn combine(g: &mut Group, h: &mut Handle, a: &CombineArgs, stream: cudaStream_t) -> Result<()> {
    routed(h)?;
    check_pending(g, h, stream)?;
    let topk = h.topk_idx.unwrap_or_else(|| unreachable!());
    let call = check_combine(&g.params, &h.params, &topk, a)?;
    ep_core::zero_copy::ht_combine(g.params.zero_copy, &a.tokens)?;
    let k = h.params.num_topk as usize;
    let em = h.params.layout == Layout::ExpertMajor;
    let bwd = call.pass == PassDir::Backward;
    let _ctx = crate::cuda::context::CtxGuard::enter(g.device)?;
    let mut p = base_params(g, h)?;
    p.row_bytes = call.row_bytes as i32;
    p.rows = call.tokens as i32;
    p.in0 = a.tokens.data;
    p.in1 = ptr(&a.in_weights);
    p.out0 = a.out_tokens.data;
    // Forward combine ignores outputs->topk_weights (NCCL EP does; core::ht_rules): never written.
    p.out1 = if bwd { ptr(&a.out_weights) } else { 0 };
    // Bytes of input weights per expert-output row (backward: EM one, FLAT K).
    let w_row = if em { 4 } else { 4 * k };
    if p.staged != 0 {
        let lay = g.ht()?.sized.unwrap_or_else(|| unreachable!());
        let rows = call.recv_rows.min(lay.staging_rows);
        stage(g, lay.stage_tok_off, a.tokens.data, rows * call.row_bytes, stream)?;
        stage(g, lay.stage_w_off, p.in1, rows * w_row, stream)?;
    }
    let m = HtModule::Combine {
        em,
        bwd,
        dtype: token_dtype(call.dtype),
    };
    if p.remote != 0 {
        // Every row a source may pull (the handle's receive bound S, in p.recv_rows; not the
        // caller's tensor rows, which ranks may size differently), backward with its weights.
        let lay = g.ht()?.sized.unwrap_or_else(|| unreachable!());
        let x = HtExchange::Combine {
            row_bytes: call.row_bytes,
            rows: (p.recv_rows as usize).min(lay.staging_rows),
            weight_row_bytes: if bwd { w_row } else { 0 },
        };
        exchange(g, m, &p, x, stream)?;
    }
    finish(g, m, "ht_combine_kernel", &p, stream)
}
