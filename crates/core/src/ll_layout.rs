//! The low-latency communication buffer planner (docs/LL.md, "Communication buffer").
//!
//! Every rank's buffer has the same layout: two banks, each holding a small signal region
//! (flags and per-expert counts) followed by a data region that dispatch and combine share.
//! All offsets here are byte offsets from the start of a rank's buffer. The bank stride is a
//! parameter of the offset functions, not a field: the group fixes it from the allocation
//! (`allocated / 2`), which can exceed `bank_bytes` when the buffer was sized for a larger K.

use crate::config::LL_MAX_TOPK;
use crate::error::Result;

/// Regions start on this boundary so kernels can use wide vector accesses and the signal region
/// never shares a cache sector with token data.
pub const REGION_ALIGN: usize = 256;
/// Bytes of the `int32 token` field that opens a dispatch message header.
pub const HDR_TOKEN_BYTES: usize = 4;
/// Bytes of one top-k record `{int32 expert, float weight, int32 pos}` in the header.
pub const HDR_RECORD_BYTES: usize = 12;

/// The LL buffer of one group for one top-k: message sizes, in-bank offsets, bank and total bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlLayout {
    /// N.
    pub nranks: usize,
    /// E.
    pub num_experts: usize,
    /// L = E / N.
    pub local_experts: usize,
    /// B: most tokens one rank dispatches per call.
    pub max_tokens: usize,
    /// Hb: bytes of the largest token row.
    pub max_token_bytes: usize,
    /// K.
    pub topk: usize,
    /// align16(4 + 12 K): token index, then K records.
    pub hdr_bytes: usize,
    /// hdr + Hb: one dispatch message (header, then payload).
    pub dmsg_bytes: usize,
    /// Hb: one combine message (payload only; its slot says which (token, k) it is).
    pub cmsg_bytes: usize,
    /// In-bank offset of `dispatch_flag[N]` (u64).
    pub dispatch_flag_off: usize,
    /// In-bank offset of `expert_count[N][L]` (i32).
    pub expert_count_off: usize,
    /// In-bank offset of `combine_flag[N]` (u64).
    pub combine_flag_off: usize,
    /// In-bank offset of `clean_flag[N]` (u64, `(clean sequence << 32) | epoch`): the barrier of
    /// `ncclEpMaskClean`, used in bank 0 only.
    pub clean_flag_off: usize,
    /// Bytes of the signal region, rounded up to [`REGION_ALIGN`].
    pub signal_bytes: usize,
    /// In-bank offset of the data region (= `signal_bytes`).
    pub data_off: usize,
    /// N·B·dmsg: `dispatch_recv[N][B]`.
    pub dispatch_recv_bytes: usize,
    /// B·K·cmsg: `combine_recv[B][K]`.
    pub combine_recv_bytes: usize,
    /// The union of both, rounded up to [`REGION_ALIGN`].
    pub data_bytes: usize,
    /// signal_bytes + data_bytes: the smallest valid bank stride.
    pub bank_bytes: usize,
    /// 2 · bank_bytes: what one rank must allocate.
    pub total_bytes: usize,
}

fn mul(a: usize, b: usize) -> Result<usize> {
    crate::size_math::mul(a, b, "low-latency")
}

fn add(a: usize, b: usize) -> Result<usize> {
    crate::size_math::add(a, b, "low-latency")
}

fn align_up(x: usize, a: usize) -> Result<usize> {
    crate::size_math::align_up(x, a, "low-latency")
}

impl LlLayout {
    /// Plans the buffer for N ranks, E experts, B tokens per rank, Hb bytes per token and top-k K.
    pub fn new(nranks: u32, num_experts: u32, max_tokens: u32, max_token_bytes: u32, topk: u32) -> Result<Self> {
        crate::config::check_geometry(nranks, num_experts, max_tokens, topk)?;
        crate::ensure_arg!(max_token_bytes > 0, "max_token_bytes is 0");
        crate::ensure_arg!(
            max_token_bytes.is_multiple_of(16),
            "max_token_bytes ({max_token_bytes}) must be a multiple of 16"
        );
        crate::ensure_arg!(
            topk <= LL_MAX_TOPK,
            "num_topk ({topk}) exceeds the low-latency limit of {LL_MAX_TOPK}"
        );
        let (n, e, b, hb, k) = (
            nranks as usize,
            num_experts as usize,
            max_tokens as usize,
            max_token_bytes as usize,
            topk as usize,
        );
        let l = e / n;
        // K <= 32 and Hb < 2^32, so the message sizes cannot overflow a 64-bit usize.
        let hdr_bytes = align_up(HDR_TOKEN_BYTES + HDR_RECORD_BYTES * k, 16)?;
        let dmsg_bytes = hdr_bytes + hb;
        let cmsg_bytes = hb;
        // Each signal array starts 16-byte aligned (u64 flags need 8; 16 keeps vector loads open).
        let dispatch_flag_off = 0;
        let expert_count_off = align_up(mul(8, n)?, 16)?;
        let combine_flag_off = add(expert_count_off, align_up(mul(4, mul(n, l)?)?, 16)?)?;
        let clean_flag_off = add(combine_flag_off, mul(8, n)?)?;
        let signal_bytes = align_up(add(clean_flag_off, mul(8, n)?)?, REGION_ALIGN)?;
        let dispatch_recv_bytes = mul(mul(n, b)?, dmsg_bytes)?;
        let combine_recv_bytes = mul(mul(b, k)?, cmsg_bytes)?;
        let data_bytes = align_up(dispatch_recv_bytes.max(combine_recv_bytes), REGION_ALIGN)?;
        let bank_bytes = add(signal_bytes, data_bytes)?;
        let total_bytes = mul(2, bank_bytes)?;
        Ok(Self {
            nranks: n,
            num_experts: e,
            local_experts: l,
            max_tokens: b,
            max_token_bytes: hb,
            topk: k,
            hdr_bytes,
            dmsg_bytes,
            cmsg_bytes,
            dispatch_flag_off,
            expert_count_off,
            combine_flag_off,
            clean_flag_off,
            signal_bytes,
            data_off: signal_bytes,
            dispatch_recv_bytes,
            combine_recv_bytes,
            data_bytes,
            bank_bytes,
            total_bytes,
        })
    }

    /// The bank stride a buffer of `allocated` bytes gives: half of it, rounded down to
    /// [`REGION_ALIGN`] so that every region stays aligned in bank 1 (an explicit
    /// `rdma_buffer_size` need not be a multiple of 512).
    pub fn bank_stride(allocated: usize) -> usize {
        allocated / 2 / REGION_ALIGN * REGION_ALIGN
    }

    /// Whether a buffer of `allocated` bytes holds this layout (`bank_bytes <= allocated / 2`;
    /// `bank_bytes` is a multiple of the alignment, so rounding the stride down changes nothing).
    pub fn fits(&self, allocated: usize) -> bool {
        self.bank_bytes <= Self::bank_stride(allocated)
    }

    fn bank_base(&self, stride: usize, bank: usize) -> usize {
        debug_assert!(bank < 2, "bank {bank}");
        debug_assert!(
            stride >= self.bank_bytes && stride.is_multiple_of(REGION_ALIGN),
            "stride {stride}"
        );
        bank * stride
    }

    /// `dispatch_recv[src][slot]`: where source `src` writes its `slot`-th message to this rank.
    pub fn dispatch_recv_offset(&self, stride: usize, bank: usize, src: usize, slot: usize) -> usize {
        debug_assert!(src < self.nranks && slot < self.max_tokens);
        self.bank_base(stride, bank) + self.data_off + (src * self.max_tokens + slot) * self.dmsg_bytes
    }

    /// `combine_recv[token][k]`: where the expert output for top-k position `k` of this rank's
    /// token `token` lands.
    pub fn combine_recv_offset(&self, stride: usize, bank: usize, token: usize, k: usize) -> usize {
        debug_assert!(token < self.max_tokens && k < self.topk);
        self.bank_base(stride, bank) + self.data_off + (token * self.topk + k) * self.cmsg_bytes
    }

    /// `dispatch_flag[src]` (u64, `(tag << 32) | token count`).
    pub fn dispatch_flag_offset(&self, stride: usize, bank: usize, src: usize) -> usize {
        debug_assert!(src < self.nranks);
        self.bank_base(stride, bank) + self.dispatch_flag_off + 8 * src
    }

    /// `expert_count[src][l]` (i32): selections `src` sent to local expert `l` of this rank.
    pub fn expert_count_offset(&self, stride: usize, bank: usize, src: usize, l: usize) -> usize {
        debug_assert!(src < self.nranks && l < self.local_experts);
        self.bank_base(stride, bank) + self.expert_count_off + 4 * (src * self.local_experts + l)
    }

    /// `combine_flag[src]` (u64, `(tag << 32) | 1`), written by expert rank `src`.
    pub fn combine_flag_offset(&self, stride: usize, bank: usize, src: usize) -> usize {
        debug_assert!(src < self.nranks);
        self.bank_base(stride, bank) + self.combine_flag_off + 8 * src
    }

    /// `clean_flag[src]` (u64, `(clean sequence << 32) | epoch`), written by rank `src` in
    /// `ncclEpMaskClean`.
    pub fn clean_flag_offset(&self, stride: usize, bank: usize, src: usize) -> usize {
        debug_assert!(src < self.nranks);
        self.bank_base(stride, bank) + self.clean_flag_off + 8 * src
    }

    /// Offset, inside a dispatch message, of top-k record `k` (`expert` at +0, `weight` at +4,
    /// `pos` at +8). The payload starts at `hdr_bytes`.
    pub fn hdr_record_offset(&self, k: usize) -> usize {
        debug_assert!(k < self.topk);
        HDR_TOKEN_BYTES + HDR_RECORD_BYTES * k
    }
}

/// The staging region of one remote peer (docs/MULTINODE.md): what this rank's kernels write for a
/// rank reached through NCCL point-to-point instead of load/store, and what arrives from it.
///
/// It is a bank "as seen by one source": the signal region with the bank's offsets (the source
/// writes only its own `dispatch_flag`, `expert_count` row and `combine_flag` there), then a data
/// region holding that source's `dispatch_recv[slot]` rows from offset `data_off` (indexed by
/// slot alone, not by source rank) or the expert outputs for that source's tokens: the
/// `combine_recv[token][k]` grid of a bank (expert-major), one row per token (rank-major, where
/// an expert rank sends one reduced row per (token, rank)). No banks:
/// the send phase, the exchange and the receive phase of one operation run in stream order, and
/// the next operation starts after them. Every size is fixed by the layout, so the exchange
/// (`ncclSend`/`ncclRecv` of these bytes) can be captured in a CUDA graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlStage {
    /// Bytes a dispatch moves per remote peer and direction: `data_off + B·dmsg`.
    pub dispatch_bytes: usize,
    /// Bytes an expert-major combine moves per remote peer and direction: `data_off + B·K·cmsg`.
    pub combine_bytes: usize,
    /// Bytes a rank-major combine moves per remote peer and direction: `data_off + B·cmsg`.
    pub combine_rm_bytes: usize,
    /// One staging region: the larger of the two, rounded up to [`REGION_ALIGN`].
    pub stride: usize,
}

impl LlStage {
    pub fn new(l: &LlLayout) -> Result<Self> {
        let dispatch_bytes = add(l.data_off, mul(l.max_tokens, l.dmsg_bytes)?)?;
        let combine_bytes = add(l.data_off, l.combine_recv_bytes)?;
        let combine_rm_bytes = add(l.data_off, mul(l.max_tokens, l.cmsg_bytes)?)?;
        let stride = align_up(dispatch_bytes.max(combine_bytes), REGION_ALIGN)?;
        Ok(Self {
            dispatch_bytes,
            combine_bytes,
            combine_rm_bytes,
            stride,
        })
    }

    /// Staging one rank allocates for `remote` remote peers: a send and a receive region each.
    pub fn total_bytes(&self, remote: usize) -> Result<usize> {
        mul(mul(2, remote)?, self.stride)
    }

    /// Offset, in a staging region, of the source's `slot`-th dispatch message.
    pub fn dispatch_offset(l: &LlLayout, slot: usize) -> usize {
        debug_assert!(slot < l.max_tokens);
        l.data_off + slot * l.dmsg_bytes
    }
}

/// Ranks `rank` treats as remote (bit r): those outside its block of `node_size` consecutive
/// ranks (`NCCL_EP_NODE_SIZE`, docs/MULTINODE.md). `node_size` 0 means one node.
pub fn remote_ranks(rank: usize, nranks: usize, node_size: usize) -> u64 {
    if node_size == 0 || node_size >= nranks {
        return 0;
    }
    let node = rank / node_size;
    crate::rank_set::ranks_where(nranks, |r| r / node_size != node)
}

/// Bytes of an LL handle's metadata (`ncclEpHandleMemSize`): `align256(4·(2·N + N·B·(K+1) + B·K))`,
/// the same formula as `handle_rules::handle_mem_bytes`.
pub fn handle_mem_bytes(nranks: u32, max_tokens: u32, topk: u32) -> usize {
    LlHandleMeta::new(nranks, max_tokens, topk).bytes()
}

/// The int32 layout of an LL handle's metadata: `counts[N]` (tokens received from each source),
/// `msgs[N]` (rows received from each source: expert-major selections, rank-major tokens),
/// then one entry of K+1 ints per (source, slot): the source's token index, then
/// - expert-major: K destination rows (`l·N·B + row`, −1 where top-k k is not on this rank);
/// - rank-major: the first local top-k position `j` (the other K−1 ints unused);
///
/// then `own[B][K]`, the same rows seen from this rank's own tokens (the messages it sent itself),
/// indexed by token: expert-major the K rows of token t's entry, rank-major its slot at [t][0].
/// A one-rank combine reads its expert outputs through it in one pass (docs/LL.md); entries of
/// tokens not sent in the last dispatch are stale and never read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlHandleMeta {
    pub nranks: usize,
    pub max_tokens: usize,
    pub topk: usize,
}

impl LlHandleMeta {
    pub fn new(nranks: u32, max_tokens: u32, topk: u32) -> Self {
        Self {
            nranks: nranks as usize,
            max_tokens: max_tokens as usize,
            topk: topk as usize,
        }
    }

    /// Ints per (source, slot) entry.
    pub fn entry_ints(&self) -> usize {
        self.topk + 1
    }

    /// Index (in int32 units) of `counts[src]`.
    pub fn count_index(&self, src: usize) -> usize {
        debug_assert!(src < self.nranks);
        src
    }

    /// Index (in int32 units) of `msgs[src]`.
    pub fn msgs_index(&self, src: usize) -> usize {
        debug_assert!(src < self.nranks);
        self.nranks + src
    }

    /// Index (in int32 units) of the entry of (src, slot); its token index comes first.
    pub fn entry_index(&self, src: usize, slot: usize) -> usize {
        debug_assert!(src < self.nranks && slot < self.max_tokens);
        2 * self.nranks + (src * self.max_tokens + slot) * self.entry_ints()
    }

    /// Index (in int32 units) of `own[token]`, the first of its K ints.
    pub fn own_index(&self, token: usize) -> usize {
        debug_assert!(token < self.max_tokens);
        2 * self.nranks + self.nranks * self.max_tokens * self.entry_ints() + token * self.topk
    }

    /// Total bytes, 256-aligned. Saturates instead of wrapping (validated configs keep
    /// N·B <= u32::MAX, far from the limit).
    pub fn bytes(&self) -> usize {
        let entries = self
            .nranks
            .saturating_mul(self.max_tokens)
            .saturating_mul(self.entry_ints());
        let own = self.max_tokens.saturating_mul(self.topk);
        let ints = entries.saturating_add(own).saturating_add(2 * self.nranks);
        ints.saturating_mul(4)
            .div_ceil(REGION_ALIGN)
            .saturating_mul(REGION_ALIGN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    fn anchor(n: u32, k: u32) -> LlLayout {
        LlLayout::new(n, 256, 128, 14336, k).unwrap()
    }

    #[test]
    fn anchor_config_sizes() {
        let l = anchor(8, 8);
        println!("anchor N=8: {l:?}");
        assert_eq!(l.hdr_bytes, 112);
        assert_eq!(l.dmsg_bytes, 14448);
        assert_eq!(l.cmsg_bytes, 14336);
        assert_eq!(l.dispatch_recv_bytes, 14_794_752);
        assert_eq!(l.combine_recv_bytes, 14_680_064);
        assert_eq!(l.data_bytes, 14_794_752);
        // 8 flags + 8x32 counts + 8 + 8 flags = 64 + 1024 + 64 + 64 bytes -> 1280 after alignment.
        assert_eq!(l.signal_bytes, 1280);
        assert_eq!(l.bank_bytes, 14_796_032);
        assert_eq!(l.total_bytes, 29_592_064);
        assert!(l.total_bytes <= 32 * MIB);
    }

    #[test]
    fn stage_sizes() {
        let l = anchor(16, 8);
        let s = LlStage::new(&l).unwrap();
        // Signals of N = 16 (L = 16): 128 + 1024 + 128 + 128 -> 1536 after alignment.
        assert_eq!(l.data_off, 1536);
        assert_eq!(s.dispatch_bytes, 1536 + 128 * 14448);
        assert_eq!(s.combine_bytes, 1536 + 128 * 8 * 14336);
        assert_eq!(s.combine_rm_bytes, 1536 + 128 * 14336);
        assert!(s.combine_rm_bytes <= s.dispatch_bytes);
        assert_eq!(s.stride, 1536 + 14_680_064);
        assert!(s.stride.is_multiple_of(REGION_ALIGN));
        // 2 x 8 H100: 8 remote peers, send and receive region each.
        assert_eq!(s.total_bytes(8).unwrap(), 16 * s.stride);
        assert_eq!(s.total_bytes(0).unwrap(), 0);
        // K = 1: dispatch rows dominate.
        let s1 = LlStage::new(&anchor(16, 1)).unwrap();
        assert_eq!(s1.stride, 1536 + 128 * 14352);
        assert_eq!(LlStage::dispatch_offset(&l, 0), l.data_off);
        assert_eq!(LlStage::dispatch_offset(&l, 127), l.data_off + 127 * l.dmsg_bytes);
        assert!(LlStage::dispatch_offset(&l, 127) + l.dmsg_bytes <= s.dispatch_bytes);
        // A region always holds the source's signals at the bank's offsets.
        assert!(l.clean_flag_off + 8 * l.nranks <= l.data_off);
    }

    #[test]
    fn node_split() {
        assert_eq!(remote_ranks(0, 4, 0), 0);
        assert_eq!(remote_ranks(3, 4, 4), 0);
        assert_eq!(remote_ranks(3, 4, 9), 0);
        assert_eq!(remote_ranks(0, 4, 1), 0b1110);
        assert_eq!(remote_ranks(2, 4, 1), 0b1011);
        assert_eq!(remote_ranks(0, 4, 2), 0b1100);
        assert_eq!(remote_ranks(3, 4, 2), 0b0011);
        // A last, smaller node.
        assert_eq!(remote_ranks(4, 5, 2), 0b01111);
        assert_eq!(remote_ranks(1, 5, 2), 0b11100);
        assert_eq!(remote_ranks(63, 64, 8), !0u64 >> 8);
    }

    #[test]
    fn sixty_four_ranks() {
        let l = anchor(64, 8);
        println!(
            "N=64: total {} bytes ({:.2} MiB)",
            l.total_bytes,
            l.total_bytes as f64 / MIB as f64
        );
        assert_eq!(l.signal_bytes, 2560);
        assert_eq!(l.total_bytes, 236_721_152);
        assert!(l.total_bytes <= 240 * MIB);
    }

    #[test]
    fn monotonic_in_topk() {
        for n in [1, 2, 8, 64] {
            let mut last = 0;
            for k in 1..=LL_MAX_TOPK {
                let t = anchor(n, k).total_bytes;
                assert!(t >= last, "N={n} K={k}: {t} < {last}");
                last = t;
            }
        }
    }

    /// Every region offset is 16-byte aligned, inside the buffer, and the two banks are disjoint.
    fn check_offsets(l: &LlLayout, stride: usize) {
        let total = 2 * stride;
        let mut spans = [Vec::new(), Vec::new()];
        for (bank, span) in spans.iter_mut().enumerate() {
            let lo = bank * stride;
            let hi = lo + l.bank_bytes;
            let mut put = |off: usize, len: usize, align: usize| {
                assert!(off.is_multiple_of(align), "offset {off} not {align}-aligned");
                assert!(
                    off >= lo && off + len <= hi && off + len <= total,
                    "{off}+{len} outside bank {bank}"
                );
                span.push((off, len));
            };
            for s in 0..l.nranks {
                put(l.dispatch_flag_offset(stride, bank, s), 8, 8);
                put(l.combine_flag_offset(stride, bank, s), 8, 8);
                put(l.clean_flag_offset(stride, bank, s), 8, 8);
                for e in 0..l.local_experts {
                    put(l.expert_count_offset(stride, bank, s, e), 4, 4);
                }
                for slot in 0..l.max_tokens {
                    put(l.dispatch_recv_offset(stride, bank, s, slot), l.dmsg_bytes, 16);
                }
            }
            for t in 0..l.max_tokens {
                for k in 0..l.topk {
                    put(l.combine_recv_offset(stride, bank, t, k), l.cmsg_bytes, 16);
                }
            }
            assert!((l.dispatch_flag_off + lo).is_multiple_of(16));
            assert!((l.expert_count_off + lo).is_multiple_of(16));
            assert!((l.combine_flag_off + lo).is_multiple_of(16));
            assert!((l.clean_flag_off + lo).is_multiple_of(8));
            assert!((l.data_off + lo).is_multiple_of(REGION_ALIGN));
        }
        // Banks do not overlap.
        let end0 = spans[0].iter().map(|&(o, n)| o + n).max().unwrap();
        let start1 = spans[1].iter().map(|&(o, _)| o).min().unwrap();
        assert!(end0 <= start1);
        // Signals never overlap each other or the data region (data and combine share by design).
        for (bank, sp) in spans.iter().enumerate() {
            let data_start = bank * stride + l.data_off;
            let mut sig: Vec<_> = sp.iter().filter(|&&(o, _)| o < data_start).copied().collect();
            sig.sort();
            for w in sig.windows(2) {
                assert!(w[0].0 + w[0].1 <= w[1].0, "signals overlap: {w:?}");
            }
            assert!(sig.last().map_or(0, |&(o, n)| o + n) <= data_start);
        }
    }

    #[test]
    fn offsets_aligned_in_range_and_banks_disjoint() {
        let cases = [
            (1, 1, 1, 16, 1),
            (2, 4, 3, 16, 2),
            (3, 9, 5, 48, 3),
            (4, 8, 7, 32, 8),
            (8, 256, 4, 64, 32),
        ];
        for (n, e, b, hb, k) in cases {
            let l = LlLayout::new(n, e, b, hb, k).unwrap();
            check_offsets(&l, l.bank_bytes);
            // A buffer sized for a larger K gives a larger stride; offsets still work.
            let big = LlLayout::new(n, e, b, hb, 32).unwrap();
            assert!(l.fits(big.total_bytes));
            check_offsets(&l, LlLayout::bank_stride(big.total_bytes));
        }
    }

    #[test]
    fn fits_and_stride() {
        let l = anchor(8, 8);
        assert!(l.fits(l.total_bytes));
        assert!(l.fits(l.total_bytes + 1));
        assert!(!l.fits(l.total_bytes - 1));
        assert!(!anchor(8, 9).fits(l.total_bytes));
        assert_eq!(LlLayout::bank_stride(1000), 256);
        assert_eq!(LlLayout::bank_stride(l.total_bytes), l.bank_bytes);
    }

    #[test]
    fn header_records() {
        let l = LlLayout::new(2, 4, 3, 16, 2).unwrap();
        assert_eq!(l.hdr_bytes, 32); // 4 + 24 = 28 -> 32
        assert_eq!(l.hdr_record_offset(0), 4);
        assert_eq!(l.hdr_record_offset(1), 16);
        assert_eq!(LlLayout::new(2, 4, 3, 16, 1).unwrap().hdr_bytes, 16);
        assert_eq!(LlLayout::new(2, 64, 3, 16, 32).unwrap().hdr_bytes, 400); // 388 -> 400
    }

    #[test]
    fn bad_inputs() {
        let code = |r: Result<LlLayout>| r.unwrap_err().code();
        assert_eq!(code(LlLayout::new(0, 8, 1, 16, 1)), 4);
        assert_eq!(code(LlLayout::new(2, 0, 1, 16, 1)), 4);
        assert_eq!(code(LlLayout::new(2, 8, 0, 16, 1)), 4);
        assert_eq!(code(LlLayout::new(2, 8, 1, 0, 1)), 4);
        assert_eq!(code(LlLayout::new(2, 8, 1, 16, 0)), 4);
        assert_eq!(code(LlLayout::new(3, 8, 1, 16, 1)), 5);
        assert_eq!(code(LlLayout::new(2, 8, 1, 24, 1)), 4);
        assert_eq!(code(LlLayout::new(2, 8, 1, 16, 33)), 4);
        // N·B·dmsg overflows 64 bits.
        let e = LlLayout::new(u32::MAX, u32::MAX, u32::MAX, 0xFFFF_FFF0, 1).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e.msg.contains("overflows"), "{}", e.msg);
    }

    #[test]
    fn handle_meta_matches_handle_rules() {
        use crate::enums::{Algorithm, Layout};
        use crate::handle_rules::{self, tests_support::params};
        let mut p = params(Algorithm::LowLatency);
        for (n, b, k) in [(8, 128, 8), (64, 128, 8), (1, 1, 1), (3, 7, 32)] {
            p.nranks = n;
            p.max_tokens = b;
            let h = handle_rules::check_handle(&p, Some(Layout::RankMajor), k as i64, 0).unwrap();
            assert_eq!(handle_mem_bytes(n, b, k), handle_rules::handle_mem_bytes(&p, &h));
        }
        // 4 * (2·8 + 8·128·9 + 128·8) = 41024 -> 41216 after 256-alignment.
        assert_eq!(handle_mem_bytes(8, 128, 8), 41216);
        let m = LlHandleMeta::new(2, 3, 2);
        assert_eq!(m.count_index(1), 1);
        assert_eq!(m.msgs_index(1), 3);
        assert_eq!(m.entry_index(0, 0), 4);
        assert_eq!(m.entry_index(1, 2), 4 + 5 * 3);
        assert_eq!(m.own_index(0), 4 + 2 * 3 * 3);
        assert_eq!(m.own_index(2), 4 + 2 * 3 * 3 + 2 * 2);
        // The last entry and the last own row end inside the block.
        assert!(4 * (m.entry_index(1, 2) + m.entry_ints()) <= m.own_index(0) * 4);
        assert!(4 * (m.own_index(2) + 2) <= m.bytes());
    }
}
