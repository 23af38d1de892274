//! Window-backed tensors and `config->zero_copy` on a real communicator (a child of
//! tests/gpu_multi.rs; docs/ZERO_COPY.md). Every rank allocates a buffer with `ncclMemAlloc` and
//! registers it collectively as a symmetric NCCL window; a tensor under test is moved into that
//! window at one offset, the same on every rank (NCCL EP computes peers' addresses with the
//! caller's own offset), with `data` NULL (the library resolves it through `ncclWinGetUserPtr`)
//! or set. Outputs are poisoned in the window before each operation and copied back out after it,
//! then checked against the CPU reference exactly as the ordinary rounds are.
//!
//! - LOW_LATENCY RANK_MAJOR dispatch with `outputs->tokens` in the window, under AUTO and ON:
//!   the senders store payloads straight into every receiver's window (the direct path), plain
//!   and send_only; combine inputs in the window (LL combine is never zero-copy: resolved, then
//!   staged); ON refuses an ordinary dispatch output and an EXPERT_MAJOR handle.
//! - HIGH_THROUGHPUT (FLAT and EXPERT_MAJOR) with dispatch `outputs->tokens` and combine
//!   `inputs->tokens` in the window, under AUTO and ON (correct through our staging); ON refuses
//!   ordinary ones.

use super::*;
use nccl_ep::cuda::memory;
use std::ffi::c_void;

/// Where every tensor under test sits in the window (a multiple of 4096, not 0, so that an
/// implementation that ignored win_offset would be caught).
const WIN_OFFSET: usize = 8192;

/// This rank's share of one symmetric window.
pub struct Window<'a> {
    r: &'a Rank<'a>,
    api: NcclWindowApi,
    base: u64,
    bytes: usize,
    win: *mut c_void,
}

impl<'a> Window<'a> {
    /// `ncclMemAlloc` + `ncclCommWindowRegister(NCCL_WIN_COLL_SYMMETRIC)` (collective).
    fn new(r: &'a Rank<'a>, bytes: usize) -> Result<Window<'a>, String> {
        let api = r
            .nccl
            .windows
            .ok_or_else(|| format!("{} has no ncclCommWindowRegister (NCCL >= 2.29 needed)", r.nccl.path))?;
        let _g = nccl_ep::cuda::context::CtxGuard::enter(r.device).map_err(|e| e.msg)?;
        let bytes = bytes.next_multiple_of(1 << 21);
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: ncclMemAlloc writes one device pointer to the live local `p`; the device's
        // context is current.
        let rc = unsafe { (api.mem_alloc)(&mut p, bytes) };
        r.nccl.check("ncclMemAlloc", rc)?;
        let mut win: *mut c_void = std::ptr::null_mut();
        // SAFETY: `p` holds `bytes` bytes from ncclMemAlloc; the call writes one window handle to
        // the live local `win`; `r.comm` is this rank's live communicator.
        let reg = unsafe { (api.register)(r.comm, p, bytes, &mut win, NCCL_WIN_COLL_SYMMETRIC) };
        if let Err(e) = r.nccl.check("ncclCommWindowRegister", reg) {
            // SAFETY: `p` came from ncclMemAlloc above and is freed once.
            unsafe { (api.mem_free)(p) };
            return Err(e);
        }
        Ok(Window {
            r,
            api,
            base: p as u64,
            bytes,
            win,
        })
    }

    /// Deregisters (collective) and frees the buffer.
    fn close(self) -> Result<(), String> {
        let _g = nccl_ep::cuda::context::CtxGuard::enter(self.r.device).map_err(|e| e.msg)?;
        // SAFETY: `self.win` was registered on `self.r.comm` by `new` and is deregistered once
        // (`self` is consumed); nothing uses it any more (every stream was synchronised).
        let d = unsafe { (self.api.deregister)(self.r.comm, self.win) };
        // SAFETY: `self.base` came from ncclMemAlloc and is freed once.
        let f = unsafe { (self.api.mem_free)(self.base as *mut c_void) };
        self.r.nccl.check("ncclCommWindowDeregister", d)?;
        self.r.nccl.check("ncclMemFree", f)
    }

    /// Moves `t`'s current contents (inputs, or the poison of an output) into the window at
    /// `WIN_OFFSET` and points its descriptor there: `win_hdl` + `win_offset`, and `data` NULL
    /// (`data_null`) or the window's local address.
    fn bind(&self, t: &mut DevTensor, data_null: bool) -> Result<(), String> {
        if WIN_OFFSET + t.bytes > self.bytes {
            return Err(format!(
                "test bug: a tensor of {} bytes does not fit the window of {} at offset {WIN_OFFSET}",
                t.bytes, self.bytes
            ));
        }
        let at = self.base + WIN_OFFSET as u64;
        copy(self.r.device, at, t.mem.ptr(), t.bytes)?;
        t.desc.win_hdl = self.win.cast();
        t.desc.win_offset = WIN_OFFSET;
        t.desc.data = if data_null {
            std::ptr::null_mut()
        } else {
            at as *mut c_void
        };
        Ok(())
    }

    /// Copies the window's bytes back into `t`'s own memory (to check them) and makes `t` an
    /// ordinary tensor again.
    fn unbind(&self, t: &mut DevTensor) -> Result<(), String> {
        copy(self.r.device, t.mem.ptr(), self.base + WIN_OFFSET as u64, t.bytes)?;
        t.desc.win_hdl = std::ptr::null_mut();
        t.desc.win_offset = 0;
        t.desc.data = t.mem.ptr() as *mut c_void;
        Ok(())
    }
}

fn copy(device: i32, dst: u64, src: u64, bytes: usize) -> Result<(), String> {
    if bytes == 0 {
        return Ok(());
    }
    let _g = nccl_ep::cuda::context::CtxGuard::enter(device).map_err(|e| e.msg)?;
    // SAFETY: both ranges are device memory of this context holding `bytes` bytes (the callers'
    // tensors and the window, asserted large enough); the legacy stream is synchronised below,
    // before either is used again.
    unsafe { memory::memcpy_dtod_async(dst, src, bytes, memory::Stream::LEGACY_DEFAULT) }.map_err(|e| e.msg)?;
    memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT).map_err(|e| e.msg)
}

/// The error code of an operation that must be refused, and that it was refused.
fn expect_refused(rc: Result<(), String>, what: &str, needle: &str) -> Vec<String> {
    match rc {
        Ok(()) => vec![format!("{what}: accepted, expected ncclInvalidArgument")],
        Err(e) if e.contains("returned 4") && e.contains(needle) => vec![],
        Err(e) => vec![format!("{what}: {e} (expected code 4 mentioning {needle:?})")],
    }
}

/// One LL RANK_MAJOR round with `outputs->tokens` (and, on odd rounds, combine `inputs->tokens`)
/// in the window.
fn ll_window_round(
    r: &Rank,
    g: &Group,
    s: &Stream,
    w: &Window,
    c: &Case,
    rng: &mut SplitMix64,
    data_null: bool,
) -> Result<Vec<String>, String> {
    let me = r.rank;
    let world = c.world(rng);
    let mut b = alloc_rank(c, r.device, world.ranks[me].num_tokens)?;
    load_inputs(c, &b, &world.ranks[me])?;
    let h = ll_handle(c, g, &mut b, s)?;
    w.bind(&mut b.out, data_null)?;
    // Every rank's window holds its poison before any peer may write into it.
    r.barrier()?;
    dispatch(c, h.0, &mut b, s, c.send_only)?;
    if c.send_only {
        complete(h.0, s)?;
    }
    s.sync()?;
    // No rank reuses its window (next: combine inputs) before every peer's direct stores ended.
    r.barrier()?;
    w.unbind(&mut b.out)?;
    let all = LlLinks::all(r.world);
    let mut bad = check_dispatch_rank(c, &world, me, &b, &all)?;
    let (xs, ws) = combine_inputs(c, &world, rng);
    upload_combine_inputs(&b, me, &xs, &ws)?;
    w.bind(&mut b.x, !data_null)?;
    combine(c, h.0, &mut b, s, c.send_only)?;
    if c.send_only {
        complete(h.0, s)?;
    }
    s.sync()?;
    w.unbind(&mut b.x)?;
    r.barrier()?;
    bad.extend(check_combine_rank(c, &world, me, &b, &xs, &ws, &all)?);
    Ok(bad)
}

/// LL: windows under AUTO and ON; ON's refusals.
pub fn ll_zero_copy(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let me = r.rank;
    for (mode, name) in [(0, "AUTO"), (2, "ON")] {
        let mut c = ll_case(r, Layout::RankMajor, 2048);
        let mut cfg = c.group_config();
        cfg.zero_copy = ncclEpZeroCopyMode_t(mode);
        let g = Group::new(r, &cfg)?;
        let s = Stream::new(r.device)?;
        // Room for the largest tensor moved in: an EXPERT_MAJOR output [L, N*B, H] (bf16).
        let bytes = WIN_OFFSET + c.local_experts * c.nranks * c.max_tokens * c.hidden * 2;
        let w = Window::new(r, bytes)?;
        let mut rng = r.rng("ll_zero_copy", mode as u64);
        for i in 0..6 {
            c.routing = [
                Routing::Uniform,
                Routing::SameRankDups,
                Routing::Skewed { rank: r.world - 1 },
            ][i % 3];
            c.send_only = i == 4;
            c.tokens = if i == 5 { Some(c.max_tokens) } else { None };
            c.idx64 = i.is_multiple_of(2);
            let bad = ll_window_round(r, &g, &s, &w, &c, &mut rng, i.is_multiple_of(2))?;
            t.record(r, &format!("ll_zero_copy {name} {}", round_name(&c)), bad)?;
        }
        if mode == 2 {
            // ON: an ordinary output, and an EXPERT_MAJOR handle, are refused (on every rank
            // alike, before any GPU work, so no collective is left half done).
            c.send_only = false;
            let world = c.world(&mut rng);
            let mut b = alloc_rank(&c, r.device, world.ranks[me].num_tokens)?;
            load_inputs(&c, &b, &world.ranks[me])?;
            let h = ll_handle(&c, &g, &mut b, &s)?;
            let mut bad = expect_refused(
                dispatch(&c, h.0, &mut b, &s, false),
                "ON, ordinary output",
                "ZERO_COPY_ON",
            );
            drop(h);
            let em = ll_case(r, Layout::ExpertMajor, 2048);
            let world = em.world(&mut rng);
            let mut be = alloc_rank(&em, r.device, world.ranks[me].num_tokens)?;
            load_inputs(&em, &be, &world.ranks[me])?;
            let he = ll_handle(&em, &g, &mut be, &s)?;
            w.bind(&mut be.out, true)?;
            bad.extend(expect_refused(
                dispatch(&em, he.0, &mut be, &s, false),
                "ON, EXPERT_MAJOR",
                "RANK_MAJOR",
            ));
            w.unbind(&mut be.out)?;
            drop(he);
            t.record(r, "ll_zero_copy ON refusals", bad)?;
        }
        s.sync()?;
        r.barrier()?;
        g.destroy()?;
        w.close()?;
        r.barrier()?;
    }
    Ok(())
}

/// HT: FLAT and EXPERT_MAJOR rounds with dispatch outputs and combine inputs in the window,
/// under AUTO and ON; ON refuses ordinary ones.
pub fn ht_zero_copy(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let (mut cfg, l, budget) = ht_group(r);
    for (mode, name) in [(0, "AUTO"), (2, "ON")] {
        cfg.zero_copy = ncclEpZeroCopyMode_t(mode);
        let g = Group::new(r, &cfg)?;
        let s = Stream::new(r.device)?;
        let w = Window::new(r, WIN_OFFSET + budget * 14336)?;
        let mut rng = r.rng("ht_zero_copy", mode as u64);
        for (i, layout) in [Layout::Flat, Layout::ExpertMajor, Layout::Flat]
            .into_iter()
            .enumerate()
        {
            let c = HtCase {
                layout,
                dt: HtDtype::ALL[i % HtDtype::ALL.len()],
                hidden: 2048,
                topk: 8,
                align: 0,
                tokens: None,
                routing: [Routing::Uniform, Routing::SameRankDups, Routing::Uniform][i],
                global_ids: false,
                idx64: true,
                quant_fwd: false,
                backward: false,
            };
            let zc = HtWindows {
                window: &w,
                data_null: i.is_multiple_of(2),
            };
            match ht_round_windowed(r, &g, &s, l, budget, &c, &mut rng, Some(&zc))? {
                HtOutcome::NotImplemented(e) => return Err(format!("HT not implemented: {e}")),
                HtOutcome::Checked(bad) => t.record(r, &format!("ht_zero_copy {name} {c:?}"), bad)?,
            }
        }
        if mode == 2 {
            let c = HtCase {
                layout: Layout::Flat,
                dt: HtDtype::ALL[0],
                hidden: 2048,
                topk: 8,
                align: 0,
                tokens: None,
                routing: Routing::Uniform,
                global_ids: false,
                idx64: true,
                quant_fwd: false,
                backward: false,
            };
            let bad = match ht_round_windowed(r, &g, &s, l, budget, &c, &mut rng, None) {
                Ok(_) => vec!["ON, ordinary dispatch output: accepted, expected ncclInvalidArgument".to_string()],
                Err(e) if e.contains("returned 4") && e.contains("outputs->tokens") => vec![],
                Err(e) => vec![format!("ON, ordinary dispatch output: {e}")],
            };
            t.record(r, "ht_zero_copy ON refusal", bad)?;
        }
        s.sync()?;
        r.barrier()?;
        g.destroy()?;
        w.close()?;
        r.barrier()?;
    }
    Ok(())
}

/// What an HT round moves into the window: dispatch `outputs->tokens` and combine
/// `inputs->tokens`.
pub struct HtWindows<'a> {
    pub window: &'a Window<'a>,
    pub data_null: bool,
}

impl HtWindows<'_> {
    pub fn bind(&self, r: &Rank, t: &mut DevTensor) -> Result<(), String> {
        self.window.bind(t, self.data_null)?;
        r.barrier()
    }
    pub fn unbind(&self, r: &Rank, t: &mut DevTensor) -> Result<(), String> {
        r.barrier()?;
        self.window.unbind(t)
    }
}
