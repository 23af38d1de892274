//! The high-throughput buffer planner (docs/HT.md, "GPU design"): the group buffer every rank
//! owns (signals, the routing exchange, metadata scratch and, for groups that span processes,
//! staging), and the handle's metadata block (header, receive table, send table, backward
//! table). Pure arithmetic; the kernels read the same offsets from their parameter block.
//!
//! Counters: the metadata pass counts, per source rank and per *piece* of its tokens, every
//! "counter" `c` in `[0, E + N)`: `c < E` is expert `c` (first occurrences in a row), `c = E + d`
//! is destination rank `d` (a token counts once per rank).

use crate::config::GroupParams;
use crate::enums::Layout;
use crate::error::Result;
use crate::handle_rules::HandleParams;

/// Regions start on this boundary (vector accesses; flags never share a sector with data).
pub const REGION_ALIGN: usize = 256;
/// Largest HT top-k: the kernels keep one entry per k of a row in registers.
pub const HT_MAX_TOPK: u32 = 32;
/// Most experts of an HT group: the counting kernel keeps E + N counters in shared memory.
pub const HT_MAX_EXPERTS: u32 = 8192;
/// Most ranks of an HT group (the peer table is a fixed array in the kernel parameters).
pub const HT_MAX_RANKS: u32 = 64;
/// Each source's B token rows are cut into this many pieces for the metadata scans.
pub const HT_PIECES: usize = 32;
/// Pointer slots a source publishes per operation (`ptrs[src][0..4]`).
pub const HT_PTR_SLOTS: usize = 4;
/// Bytes of the handle header (`struct HtHdr`, generated into kernels/ep_params.cuh).
pub const HT_HDR_BYTES: usize = 256;

fn mul(a: usize, b: usize) -> Result<usize> {
    crate::size_math::mul(a, b, "high-throughput")
}

fn add(a: usize, b: usize) -> Result<usize> {
    crate::size_math::add(a, b, "high-throughput")
}

fn align(x: usize) -> Result<usize> {
    crate::size_math::align_up(x, REGION_ALIGN, "high-throughput")
}

/// Tokens per piece: B / 32 rounded up to a whole warp (a warp scans 32 tokens at a time).
pub fn piece_len(max_tokens: usize) -> usize {
    max_tokens.div_ceil(HT_PIECES).div_ceil(32) * 32
}

/// The receive-slot bound of a handle (docs/HT.md, "Budget, overflow, eager mode"): S when the
/// group fixes one, else the most rows a rank can receive (eager mode never overflows):
/// FLAT N·B; EXPERT_MAJOR N·B·min(K, L) pairs plus L·(A − 1) padding rows.
pub fn recv_bound(p: &GroupParams, h: &HandleParams) -> usize {
    let (n, b, l) = (p.nranks as usize, p.max_tokens as usize, p.local_experts as usize);
    if p.max_recv_tokens > 0 {
        return p.max_recv_tokens as usize;
    }
    match h.layout {
        Layout::ExpertMajor => n
            .saturating_mul(b)
            .saturating_mul((h.num_topk as usize).min(l))
            .saturating_add(l.saturating_mul(h.expert_alignment.max(1) - 1)),
        _ => n * b,
    }
}

/// One rank's HT group buffer for one top-k (offsets in bytes from the buffer's start).
///
/// ```text
/// open[N]          u64  tag: source s published its pointers for the current operation
/// done[N]          u64  tag: rank s finished reading this rank's data
/// ptrs[N][4]       u64  source s's pointers (or staging offsets) for the current operation
/// own[B][K]        i32  this rank's routing, validated (peers pull it)
/// all[N][B][K]     i32  every rank's routing (pulled; local scratch)
/// cnt[N][P][E+N]   i32  counts per (source, piece, counter)
/// tot[N][E+N]      i32  counts per (source, counter)
/// zoff[E]          i32  EM zone offset of expert e on its rank
/// rbase[N][L]      i32  receive slot base per (source, my counter)
/// sbase[E+N]       i32  send slot base per counter (this rank's tokens)
/// staging          rows·(Hb + 4K) bytes, groups that span processes only
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtLayout {
    pub nranks: usize,
    pub num_experts: usize,
    pub local_experts: usize,
    pub max_tokens: usize,
    pub max_token_bytes: usize,
    pub topk: usize,
    pub piece_len: usize,
    pub open_off: usize,
    pub done_off: usize,
    pub ptrs_off: usize,
    pub own_off: usize,
    pub all_off: usize,
    pub cnt_off: usize,
    pub tot_off: usize,
    pub zoff_off: usize,
    pub rbase_off: usize,
    pub sbase_off: usize,
    /// Staging rows (0: every peer is in this process and reads the caller's tensors).
    pub staging_rows: usize,
    pub stage_tok_off: usize,
    pub stage_w_off: usize,
    pub total_bytes: usize,
}

impl HtLayout {
    /// Plans the buffer for N ranks, E experts, B tokens per rank, Hb bytes per row, top-k K and
    /// `staging_rows` staged rows (0 for single-process groups).
    pub fn new(
        nranks: u32,
        num_experts: u32,
        max_tokens: u32,
        max_token_bytes: u32,
        topk: u32,
        staging_rows: usize,
    ) -> Result<Self> {
        crate::config::check_geometry(nranks, num_experts, max_tokens, topk)?;
        crate::ensure_usage!(
            nranks <= HT_MAX_RANKS,
            "HIGH_THROUGHPUT groups support at most {HT_MAX_RANKS} ranks, this one has {nranks}"
        );
        crate::ensure_usage!(
            num_experts <= HT_MAX_EXPERTS,
            "HIGH_THROUGHPUT groups support at most {HT_MAX_EXPERTS} experts, this one has {num_experts}"
        );
        crate::ensure_arg!(
            topk <= HT_MAX_TOPK,
            "num_topk ({topk}) exceeds the high-throughput limit of {HT_MAX_TOPK}"
        );
        let (n, e, b, hb, k) = (
            nranks as usize,
            num_experts as usize,
            max_tokens as usize,
            max_token_bytes as usize,
            topk as usize,
        );
        let l = e / n;
        let c = e + n;
        let open_off = 0;
        let done_off = align(8 * n)?;
        let ptrs_off = add(done_off, align(8 * n)?)?;
        let own_off = add(ptrs_off, align(8 * HT_PTR_SLOTS * n)?)?;
        let all_off = add(own_off, align(mul(4, mul(b, k)?)?)?)?;
        let cnt_off = add(all_off, align(mul(4, mul(n, mul(b, k)?)?)?)?)?;
        let tot_off = add(cnt_off, align(mul(4, mul(n, mul(HT_PIECES, c)?)?)?)?)?;
        let zoff_off = add(tot_off, align(mul(4, mul(n, c)?)?)?)?;
        let rbase_off = add(zoff_off, align(4 * e)?)?;
        let sbase_off = add(rbase_off, align(mul(4, mul(n, l.max(1))?)?)?)?;
        let stage_tok_off = add(sbase_off, align(4 * c)?)?;
        let stage_w_off = add(stage_tok_off, align(mul(staging_rows, hb)?)?)?;
        let total_bytes = add(stage_w_off, align(mul(staging_rows, 4 * k)?)?)?;
        Ok(Self {
            nranks: n,
            num_experts: e,
            local_experts: l,
            max_tokens: b,
            max_token_bytes: hb,
            topk: k,
            piece_len: piece_len(b),
            open_off,
            done_off,
            ptrs_off,
            own_off,
            all_off,
            cnt_off,
            tot_off,
            zoff_off,
            rbase_off,
            sbase_off,
            staging_rows,
            stage_tok_off,
            stage_w_off,
            total_bytes,
        })
    }

    /// The layout for a group and top-k (`staging_rows` as in [`HtLayout::new`]).
    pub fn for_group(p: &GroupParams, topk: u32, staging_rows: usize) -> Result<Self> {
        Self::new(
            p.nranks,
            p.num_experts,
            p.max_tokens,
            p.max_token_bytes,
            topk,
            staging_rows,
        )
    }

    /// Whether a buffer of `allocated` bytes holds this layout. The regions before the staging
    /// grow with K only, so a buffer planned for a larger K (and as many staging rows) holds it.
    pub fn fits(&self, allocated: usize) -> bool {
        self.total_bytes <= allocated
    }
}

/// Staging rows a handle needs in a group whose peers span processes: dispatch stages its B
/// input rows, combine its received rows (at most the receive bound).
pub fn staging_rows(p: &GroupParams, h: &HandleParams) -> usize {
    (p.max_tokens as usize).max(recv_bound(p, h))
}

/// What one HT operation moves to every remote rank of a group spanning nodes
/// (docs/MULTINODE.md, "HT across nodes"): the parts of the sender's group buffer a receiver
/// would pull, received into the receiver's **mirror** of the sender (a region with the group
/// buffer's offsets). Sizes depend on the layout and the call's row sizes only (the same on
/// every rank), never on the routing, so every operation posts the same NCCL calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HtExchange {
    /// The metadata pass: open flags, pointers (bad routing entry) and `own[B][K]`.
    Update,
    /// Dispatch: the signals, the staged tokens and scales of B rows, and (forward) their
    /// `B·K` weights.
    Dispatch {
        row_bytes: usize,
        scale_bytes: usize,
        /// K of the handle for a forward dispatch (weights move), 0 for backward.
        weights_topk: usize,
    },
    /// Combine: the signals, `rows` staged expert-output rows and (backward) their weights,
    /// `weight_row_bytes` per row (0: forward, none).
    Combine {
        row_bytes: usize,
        rows: usize,
        weight_row_bytes: usize,
    },
}

impl HtLayout {
    /// Byte ranges `(offset, len)` of the group buffer that operation `x` moves to each remote
    /// rank, in the order both sides post them. Fails when they do not fit the buffer (a
    /// dispatch or combine needs the staging of groups spanning processes).
    pub fn exchange_ranges(&self, x: HtExchange) -> Result<Vec<(usize, usize)>> {
        // open[N], done[N] and ptrs[N][4]: the receiver reads the sender's own open flag and
        // pointer slot from it.
        let signals = (0, self.own_off);
        let b = self.max_tokens;
        let v = match x {
            HtExchange::Update => vec![(0, add(self.own_off, mul(4, mul(b, self.topk)?)?)?)],
            HtExchange::Dispatch {
                row_bytes,
                scale_bytes,
                weights_topk,
            } => vec![
                signals,
                (self.stage_tok_off, mul(b, add(row_bytes, scale_bytes)?)?),
                (self.stage_w_off, mul(b, mul(4, weights_topk)?)?),
            ],
            HtExchange::Combine {
                row_bytes,
                rows,
                weight_row_bytes,
            } => vec![
                signals,
                (self.stage_tok_off, mul(rows, row_bytes)?),
                (self.stage_w_off, mul(rows, weight_row_bytes)?),
            ],
        };
        let v: Vec<(usize, usize)> = v.into_iter().filter(|r| r.1 > 0).collect();
        for &(off, len) in &v {
            // Each range stays inside its region: signals and own, token staging, weight staging.
            let limit = if off < self.stage_tok_off {
                self.all_off
            } else if off < self.stage_w_off {
                self.stage_w_off
            } else {
                self.total_bytes
            };
            crate::ensure_usage!(
                off < self.stage_tok_off || self.staging_rows > 0,
                "high-throughput across nodes: the group buffer has no staging"
            );
            crate::ensure_usage!(
                add(off, len)? <= limit,
                "high-throughput across nodes: {len} bytes at offset {off} overflow their region (it ends at {limit})"
            );
        }
        Ok(v)
    }

    /// Bytes one rank allocates for a group spanning nodes with `remote` remote ranks: its
    /// group buffer (this layout, with staging) and one mirror of that size per remote rank.
    pub fn with_mirrors(&self, remote: usize) -> Result<usize> {
        mul(self.total_bytes, add(1, remote)?)
    }
}

/// The metadata block of an HT handle (`ncclEpHandleMemSize`):
///
/// ```text
/// header              256 B (struct HtHdr: counts, status)
/// recv[S][W]          i32   W = 1 + K (FLAT: source token, then K packed (local << 8 | k)
///                           ascending by local expert, −1 after) or 2 (EM: source token,
///                           (local << 8) | k); source token = src_rank * B + t, −1 = padding
/// send[B][K]          2 x i32  (destination rank, slot) per contribution of my token t, in
///                           combine order; (−1, −1) = none or dropped
/// bwd[B][K]           i32   per (t, k): (contribution index << 16) | FLAT column, −1 = none
/// inv[N][B][K]        i32   EM only: the receive rows of source token (s, t), one per local
///                           expert it reaches (ascending), −1 after (and for dropped rows):
///                           the dispatch kernel reads each source row once and writes it to
///                           all of them (FLAT: none)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtHandleLayout {
    /// S: receive-table rows (the receive bound).
    pub recv_rows: usize,
    /// Ints per receive-table row.
    pub recv_width: usize,
    pub recv_off: usize,
    pub send_off: usize,
    pub bwd_off: usize,
    pub inv_off: usize,
    pub total_bytes: usize,
}

impl HtHandleLayout {
    pub fn new(p: &GroupParams, h: &HandleParams) -> Result<Self> {
        let (b, k) = (p.max_tokens as usize, h.num_topk as usize);
        let recv_rows = recv_bound(p, h);
        crate::ensure_usage!(
            recv_rows < (1 << 31) && (p.nranks as usize).saturating_mul(b).saturating_mul(k) < (1 << 31),
            "this HIGH_THROUGHPUT handle is too large for the kernels' 32-bit indices \
             (receive rows {recv_rows}, ranks x max_dispatch_tokens_per_rank x top-k {})",
            (p.nranks as usize).saturating_mul(b).saturating_mul(k)
        );
        // EXPERT_MAJOR zone offsets are 32-bit sums of padded counts, whatever the budget (NCCL EP's
        // are too, and overflow): bound the worst padded total.
        if h.layout == Layout::ExpertMajor && h.expert_alignment > 1 {
            let (n, l) = (p.nranks as usize, p.local_experts as usize);
            let worst = n
                .saturating_mul(b)
                .saturating_mul(k.min(l))
                .saturating_add(l.saturating_mul(h.expert_alignment - 1));
            crate::ensure_usage!(
                worst < (1 << 31),
                "config->dispatch_output_per_expert_alignment ({}) is too large: with {l} local experts the padded \
                 receive rows could reach {worst}, past the kernels' 32-bit indices",
                h.expert_alignment
            );
        }
        let recv_width = match h.layout {
            Layout::ExpertMajor => 2,
            _ => 1 + k,
        };
        let recv_off = HT_HDR_BYTES;
        let send_off = add(recv_off, align(mul(4, mul(recv_rows, recv_width)?)?)?)?;
        let bwd_off = add(send_off, align(mul(8, mul(b, k)?)?)?)?;
        let inv_off = add(bwd_off, align(mul(4, mul(b, k)?)?)?)?;
        let inv = match h.layout {
            Layout::ExpertMajor => mul(p.nranks as usize, mul(b, k)?)?,
            _ => 0,
        };
        let total_bytes = add(inv_off, align(mul(4, inv)?)?)?;
        Ok(Self {
            recv_rows,
            recv_width,
            recv_off,
            send_off,
            bwd_off,
            inv_off,
            total_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enums::{Algorithm, OverflowPolicy};

    fn params(n: u32, e: u32, b: u32, s: u32, topk: u32) -> GroupParams {
        GroupParams {
            algorithm: Algorithm::HighThroughput,
            nranks: n,
            rank: 0,
            num_experts: e,
            local_experts: e / n,
            max_tokens: b,
            max_recv_tokens: s,
            max_token_bytes: 14336,
            rdma_buffer_size: 0,
            max_num_sms: 0,
            enable_mask: false,
            timeout_ns: 1,
            overflow: OverflowPolicy::Trap,
            zero_copy: Default::default(),
            num_topk: topk,
            custom_alloc: false,
        }
    }

    #[test]
    fn pieces_cover_every_token_in_whole_warps() {
        for b in [1, 31, 32, 33, 513, 1024, 4096, 4097, 8192] {
            let pl = piece_len(b);
            assert!(pl.is_multiple_of(32) && pl > 0, "B {b}");
            assert!(pl * HT_PIECES >= b, "B {b}");
            assert!(pl * (HT_PIECES - 1) < b + 32 * HT_PIECES, "B {b}: pieces not too long");
        }
        assert_eq!(piece_len(4096), 128);
    }

    #[test]
    fn anchor_group_buffer() {
        // 8 ranks, E = 256, B = 4096, Hb = 14336, K = 8, one process.
        let l = HtLayout::new(8, 256, 4096, 14336, 8, 0).unwrap();
        assert_eq!(l.open_off, 0);
        assert_eq!(l.done_off, 256);
        assert_eq!(l.ptrs_off, 512);
        assert_eq!(l.own_off, 768);
        assert_eq!(l.all_off, 768 + 4096 * 8 * 4);
        assert_eq!(l.cnt_off - l.all_off, 8 * 4096 * 8 * 4);
        assert_eq!(l.tot_off - l.cnt_off, 8 * 32 * 264 * 4);
        assert_eq!(l.stage_w_off, l.stage_tok_off);
        assert_eq!(l.total_bytes, l.stage_tok_off);
        // About 1.4 MiB per rank without staging.
        assert!(l.total_bytes < 3 << 19, "{}", l.total_bytes);
        for off in [
            l.done_off,
            l.ptrs_off,
            l.own_off,
            l.all_off,
            l.cnt_off,
            l.tot_off,
            l.zoff_off,
            l.rbase_off,
            l.sbase_off,
            l.stage_tok_off,
            l.stage_w_off,
            l.total_bytes,
        ] {
            assert_eq!(off % REGION_ALIGN, 0);
        }
        // Staging adds rows * (Hb + 4K), each part aligned.
        let s = HtLayout::new(8, 256, 4096, 14336, 8, 100).unwrap();
        assert_eq!(s.total_bytes - l.total_bytes, 100 * 14336 + 3328);
        assert!(l.fits(s.total_bytes) && !s.fits(l.total_bytes));
        // A buffer planned for a larger K holds a smaller one.
        let k1 = HtLayout::new(8, 256, 4096, 14336, 1, 0).unwrap();
        assert!(k1.fits(l.total_bytes));
    }

    /// QUANT_FWD stages a source's scale rows right after its B token rows, inside the token
    /// staging (runtime::ht::dispatch, kernels/ht_dispatch.cu `src_scales`): B · (token row +
    /// scale row) ≤ B · Hb must fit the staging of every handle, also when S < B or eager.
    #[test]
    fn quant_fwd_scales_fit_the_token_staging() {
        for (b, s) in [(64u32, 0u32), (64, 16), (4096, 1024), (513, 20000), (1, 1)] {
            for layout in [Layout::Flat, Layout::ExpertMajor] {
                let p = params(8, 256, b, s, 8);
                let rows = staging_rows(&p, &hp(layout, 8, 1));
                let l = HtLayout::for_group(&p, 8, rows).unwrap();
                let hb = p.max_token_bytes as usize;
                // The worst split of Hb: the largest 16-byte token row and a 16-byte scale row.
                let (tb, sb) = (hb - 16, 16);
                let scales_end = b as usize * tb + b as usize * sb;
                assert!(
                    l.stage_tok_off + scales_end <= l.stage_w_off,
                    "B {b} S {s} {layout:?}: scales end at {scales_end}, token staging is {}",
                    l.stage_w_off - l.stage_tok_off
                );
            }
        }
    }

    #[test]
    fn limits_and_overflow() {
        assert_eq!(HtLayout::new(8, 256, 128, 14336, 33, 0).unwrap_err().code(), 4);
        assert_eq!(HtLayout::new(8, 100, 128, 14336, 8, 0).unwrap_err().code(), 5);
        assert_eq!(HtLayout::new(65, 65, 128, 14336, 8, 0).unwrap_err().code(), 5);
        assert_eq!(HtLayout::new(8, 16384, 128, 14336, 8, 0).unwrap_err().code(), 5);
        assert_eq!(
            HtLayout::new(8, 256, 128, 14336, 8, usize::MAX / 2).unwrap_err().code(),
            4
        );
    }

    fn hp(layout: Layout, k: u32, a: usize) -> HandleParams {
        HandleParams {
            layout,
            num_topk: k,
            expert_alignment: a,
        }
    }

    #[test]
    fn receive_bound_and_handle_block() {
        let fixed = params(8, 256, 4096, 20000, 8);
        assert_eq!(recv_bound(&fixed, &hp(Layout::Flat, 8, 1)), 20000);
        assert_eq!(recv_bound(&fixed, &hp(Layout::ExpertMajor, 8, 64)), 20000);
        let eager = params(8, 256, 4096, 0, 0);
        assert_eq!(recv_bound(&eager, &hp(Layout::Flat, 8, 1)), 8 * 4096);
        assert_eq!(recv_bound(&eager, &hp(Layout::ExpertMajor, 8, 1)), 8 * 4096 * 8);
        assert_eq!(
            recv_bound(&eager, &hp(Layout::ExpertMajor, 8, 64)),
            8 * 4096 * 8 + 32 * 63
        );
        // min(K, L): 2 local experts take at most 2 rows of a token.
        let eager2 = params(128, 256, 16, 0, 0);
        assert_eq!(recv_bound(&eager2, &hp(Layout::ExpertMajor, 8, 1)), 128 * 16 * 2);
        assert_eq!(staging_rows(&fixed, &hp(Layout::Flat, 8, 1)), 20000);
        assert_eq!(
            staging_rows(&params(8, 256, 4096, 4096, 0), &hp(Layout::Flat, 8, 1)),
            4096
        );

        let h = HtHandleLayout::new(&fixed, &hp(Layout::Flat, 8, 1)).unwrap();
        assert_eq!((h.recv_rows, h.recv_width, h.recv_off), (20000, 9, 256));
        assert_eq!(h.send_off, 256 + (20000 * 9 * 4usize).div_ceil(256) * 256);
        assert_eq!(h.bwd_off - h.send_off, 4096 * 8 * 8);
        assert_eq!(h.inv_off - h.bwd_off, 4096 * 8 * 4);
        assert_eq!(h.total_bytes, h.inv_off);
        let em = HtHandleLayout::new(&fixed, &hp(Layout::ExpertMajor, 8, 1)).unwrap();
        assert_eq!(em.recv_width, 2);
        // EM: two ints per receive row, then the inverse table (K rows per source token).
        assert_eq!(em.send_off - em.recv_off, (20000 * 2 * 4usize).div_ceil(256) * 256);
        assert_eq!(em.total_bytes - em.inv_off, fixed.nranks as usize * 4096 * 8 * 4);
        // A huge alignment is refused whatever the budget (zone offsets are 32-bit).
        assert!(HtHandleLayout::new(&fixed, &hp(Layout::ExpertMajor, 8, 1 << 20)).is_ok());
        let e = HtHandleLayout::new(&fixed, &hp(Layout::ExpertMajor, 8, 1 << 40)).unwrap_err();
        assert_eq!(e.code(), 5);
        assert!(e.msg.contains("alignment"), "{}", e.msg);
        // 32-bit indices.
        let huge = params(64, 256, 1 << 20, 0, 0);
        assert_eq!(
            HtHandleLayout::new(&huge, &hp(Layout::Flat, 32, 1)).unwrap_err().code(),
            5
        );
    }

    /// Across nodes (docs/MULTINODE.md, "HT across nodes"): what each operation moves per remote
    /// rank, inside the regions the receiver reads, and what a rank allocates.
    #[test]
    fn exchange_ranges_per_operation() {
        // N = 4, E = 32, B = 64, S = 2048, Hb = 14336, K = 8: staging max(B, S) = 2048 rows.
        let p = params(4, 32, 64, 2048, 8);
        let h = hp(Layout::Flat, 8, 1);
        let l = HtLayout::for_group(&p, 8, staging_rows(&p, &h)).unwrap();
        assert_eq!(l.staging_rows, 2048);
        assert_eq!(
            l.exchange_ranges(HtExchange::Update).unwrap(),
            vec![(0, l.own_off + 64 * 8 * 4)]
        );
        // Forward dispatch of bf16 H = 7168 with 224-byte scale rows: B rows of both, B·K weights.
        let d = HtExchange::Dispatch {
            row_bytes: 14336 - 224,
            scale_bytes: 224,
            weights_topk: 8,
        };
        assert_eq!(
            l.exchange_ranges(d).unwrap(),
            vec![
                (0, l.own_off),
                (l.stage_tok_off, 64 * 14336),
                (l.stage_w_off, 64 * 8 * 4)
            ]
        );
        // Backward: no weights.
        let bwd = HtExchange::Dispatch {
            row_bytes: 4096,
            scale_bytes: 0,
            weights_topk: 0,
        };
        assert_eq!(
            l.exchange_ranges(bwd).unwrap(),
            vec![(0, l.own_off), (l.stage_tok_off, 64 * 4096)]
        );
        // Combine: S rows; backward FLAT weights are K floats a row.
        let c = HtExchange::Combine {
            row_bytes: 14336,
            rows: 2048,
            weight_row_bytes: 32,
        };
        assert_eq!(
            l.exchange_ranges(c).unwrap(),
            vec![
                (0, l.own_off),
                (l.stage_tok_off, 2048 * 14336),
                (l.stage_w_off, 2048 * 32)
            ]
        );
        // Past the staging: refused, never a transfer out of bounds.
        let big = HtExchange::Combine {
            row_bytes: 14336,
            rows: 2049,
            weight_row_bytes: 0,
        };
        assert_eq!(l.exchange_ranges(big).unwrap_err().code(), 5);
        let nostage = HtLayout::for_group(&p, 8, 0).unwrap();
        assert!(nostage.exchange_ranges(HtExchange::Update).is_ok());
        assert_eq!(nostage.exchange_ranges(d).unwrap_err().code(), 5);
        // Every range of every operation lies inside the mirror (the same layout).
        for x in [HtExchange::Update, d, bwd, c] {
            for (off, len) in l.exchange_ranges(x).unwrap() {
                assert!(off + len <= l.total_bytes);
            }
        }
        // A rank with 2 remote ranks: its buffer and 2 mirrors.
        assert_eq!(l.with_mirrors(2).unwrap(), 3 * l.total_bytes);
        assert_eq!(l.with_mirrors(0).unwrap(), l.total_bytes);
    }
}
