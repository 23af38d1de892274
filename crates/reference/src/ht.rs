//! The CPU reference of high-throughput mode (docs/HT.md): routing validation, every rank's
//! receive metadata computed from the whole group's routing, dispatch (forward and backward) and
//! combine (forward and backward) for both layouts (FLAT, EXPERT_MAJOR) and the token types
//! bf16, fp16 and fp32. It is the test oracle the HT kernels are compared against, bit for bit.
//!
//! Use: [`HtPlan::new`] (or [`HtPlan::captured`]) once per routing, then [`HtPlan::dispatch`] and
//! [`HtPlan::combine`] per call and per rank (each needs every rank's inputs, and computes one
//! rank's outputs, so a GPU test pays only for the rank it checks). Token tensors are raw
//! little-endian bytes `[rows, H]` of the call's [`HtDtype`]. Malformed inputs (wrong lengths,
//! too small outputs) are test bugs and panic; routing errors that the library reports to its
//! caller are [`HtPlanError`]s.

use crate::ll::{SplitMix64, bf16_to_f32, f32_to_bf16_rne};
use ep_core::enums::{DType, ExpertIdKind, Layout, OverflowPolicy, PassDir, dtype};
pub use ep_core::ht_errors::{BadExpertId, HtPlanError};

// ---------------------------------------------------------------------------------------------
// Token data types

/// The token types of HT dispatch and combine (`quant_recipe` NONE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HtDtype {
    Bf16,
    F16,
    F32,
}

impl HtDtype {
    /// Every token type.
    pub const ALL: [HtDtype; 3] = [HtDtype::Bf16, HtDtype::F16, HtDtype::F32];

    /// The token type of an `ncclDataType_t`, or None for one HT does not move.
    pub fn from_nccl(dt: DType) -> Option<Self> {
        match dt {
            dtype::BFLOAT16 => Some(Self::Bf16),
            dtype::FLOAT16 => Some(Self::F16),
            dtype::FLOAT32 => Some(Self::F32),
            _ => None,
        }
    }
    pub fn nccl(self) -> DType {
        match self {
            Self::Bf16 => dtype::BFLOAT16,
            Self::F16 => dtype::FLOAT16,
            Self::F32 => dtype::FLOAT32,
        }
    }
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Self::Bf16 | Self::F16 => 2,
            Self::F32 => 4,
        }
    }
    /// Element `i` of `row` as f32 (exact).
    pub fn load(self, row: &[u8], i: usize) -> f32 {
        match self {
            Self::Bf16 => bf16_to_f32(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])),
            Self::F16 => f16_to_f32(u16::from_le_bytes([row[2 * i], row[2 * i + 1]])),
            Self::F32 => f32::from_le_bytes(row[4 * i..4 * i + 4].try_into().expect("4 bytes")),
        }
    }
    /// Stores `v` rounded once to this type (nearest, ties to even) as element `i` of `row`.
    pub fn store(self, row: &mut [u8], i: usize, v: f32) {
        match self {
            Self::Bf16 => row[2 * i..2 * i + 2].copy_from_slice(&f32_to_bf16_rne(v).to_le_bytes()),
            Self::F16 => row[2 * i..2 * i + 2].copy_from_slice(&f32_to_f16_rne(v).to_le_bytes()),
            Self::F32 => row[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        }
    }
    /// `values` rounded to this type, as little-endian bytes.
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; values.len() * self.bytes()];
        for (i, &v) in values.iter().enumerate() {
            self.store(&mut out, i, v);
        }
        out
    }
    /// Little-endian bytes of this type as f32 values.
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        assert!(bytes.len().is_multiple_of(self.bytes()), "a whole number of elements");
        (0..bytes.len() / self.bytes()).map(|i| self.load(bytes, i)).collect()
    }
}

/// IEEE binary16 bits to f32 (exact; NaN stays NaN with its payload).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    let bits = match exp {
        // Zero and subnormals: man · 2^-24, exact in f32.
        0 => {
            let v = man as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -v } else { v };
        }
        0x1F => sign | 0x7F80_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// f32 to IEEE binary16 bits, round to nearest, ties to even (what `__float2half_rn` does):
/// overflow gives infinity, tiny values round into the subnormals or to a signed zero. NaN gives
/// a quiet NaN of the same sign.
pub fn f32_to_f16_rne(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let a = b & 0x7FFF_FFFF;
    if a > 0x7F80_0000 {
        return sign | 0x7E00 | ((a >> 13) & 0x3FF) as u16;
    }
    let e = (a >> 23) as i32 - 127;
    if e > 15 {
        return sign | 0x7C00; // at least 65536 (or infinity)
    }
    let m = a & 0x7F_FFFF;
    if e >= -14 {
        // Normal: keep 10 mantissa bits; a carry out of the mantissa moves the exponent on
        // (and 0x7BFF + 1 is infinity, as it should be).
        let h = (((e + 15) as u32) << 10) | (m >> 13);
        let rem = m & 0x1FFF;
        let up = rem > 0x1000 || (rem == 0x1000 && (h & 1) == 1);
        return sign | (h + up as u32) as u16;
    }
    if e < -25 {
        return sign; // below half the smallest subnormal (f32 subnormals included)
    }
    // Subnormal: the value is sig · 2^(e − 23), in units of the smallest subnormal (2^-24)
    // sig · 2^(e + 1): shift right by −(e + 1), which is 14..=24 here.
    let sig = m | 0x80_0000;
    let shift = (-(e + 1)) as u32;
    let h = sig >> shift;
    let rem = sig & ((1 << shift) - 1);
    let half = 1u32 << (shift - 1);
    let up = rem > half || (rem == half && (h & 1) == 1);
    sign | (h + up as u32) as u16
}

/// `rows · hidden` random values in [−4, 4) of type `dt`, as bytes.
pub fn random_tokens(rng: &mut SplitMix64, dt: HtDtype, rows: usize, hidden: usize) -> Vec<u8> {
    let v: Vec<f32> = (0..rows * hidden).map(|_| rng.unit_f32() * 8.0 - 4.0).collect();
    dt.encode(&v)
}

/// `len` random bytes: the raw rows of QUANT_FWD's quantised types (FP8, packed FP4, UE8M0),
/// every bit pattern included (NaN encodings too: the library never looks at them).
pub fn random_bytes(rng: &mut SplitMix64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(len);
    v
}

// ---------------------------------------------------------------------------------------------
// Routing

/// The first entry (row-major) of one rank's routing `[T, K]` that is E or more: `(row, k, value)`.
/// Negative entries are "none" whatever their value, as in NCCL EP (which skips every negative
/// id) and in our LOW_LATENCY mode.
pub fn find_bad_expert_id(topk: &[i64], k: usize, num_experts: usize) -> Option<(usize, usize, i64)> {
    topk.iter()
        .position(|&e| e >= num_experts as i64)
        .map(|i| (i / k, i % k, topk[i]))
}

/// Widens an int32 routing tensor.
pub fn topk_from_i32(v: &[i32]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// A routing tensor's little-endian bytes (`ncclInt32` or `ncclInt64`) as i64.
pub fn topk_from_bytes(bytes: &[u8], dt: DType) -> Vec<i64> {
    match dt {
        dtype::INT32 => bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4")) as i64)
            .collect(),
        dtype::INT64 => bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8")))
            .collect(),
        _ => panic!("topk_idx is int32 or int64, not {}", dt.name()),
    }
}

// ---------------------------------------------------------------------------------------------
// The plan: every rank's receive metadata

/// The group-wide parameters of one handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtConfig {
    /// N.
    pub nranks: usize,
    /// E (a multiple of N).
    pub num_experts: usize,
    /// K: the handle's top-k.
    pub topk: usize,
    /// FLAT or EXPERT_MAJOR.
    pub layout: Layout,
    /// A: `dispatch_output_per_expert_alignment` (0 and 1: none; EXPERT_MAJOR only).
    pub alignment: usize,
    /// S: `max_recv_tokens_per_rank`; 0 = eager (no cap).
    pub budget: usize,
    pub policy: OverflowPolicy,
}

impl HtConfig {
    /// L = E / N.
    pub fn local_experts(&self) -> usize {
        self.num_experts / self.nranks
    }
    /// `pad(c)` of docs/HT.md: 0 stays 0, otherwise rounded up to the alignment.
    pub fn pad(&self, c: usize) -> usize {
        if c == 0 {
            0
        } else {
            c.next_multiple_of(self.alignment.max(1))
        }
    }
}

/// One received row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HtSlot {
    /// FLAT: a source token, with the local experts it selects here (ascending, distinct) and the
    /// top-k position of each one's first occurrence in the source row: `(local, k)`.
    Token {
        src_rank: usize,
        src_token: usize,
        experts: Vec<(usize, usize)>,
    },
    /// EXPERT_MAJOR: one (source token, local expert) pair; `k` is the expert's first occurrence
    /// in the source row.
    Expert {
        src_rank: usize,
        src_token: usize,
        local: usize,
        k: usize,
    },
    /// EXPERT_MAJOR alignment padding (zero tokens and weights).
    Padding,
}

/// One destination of a source token, in combine order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtSend {
    pub rank: usize,
    /// EXPERT_MAJOR: the local expert; FLAT: None.
    pub local: Option<usize>,
    /// Its row at `rank`, or None where DROP dropped it.
    pub slot: Option<usize>,
}

/// What one rank receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HtRankMeta {
    /// `recv_total_counter`: rows with no budget (FLAT: tokens; EM: padded total), pre-drop.
    pub recv_total: usize,
    /// `count`: rows this rank holds, `min(recv_total, S)` (eager: `recv_total`).
    pub count: usize,
    /// `layout_info->expert_counters` [L]. FLAT: (row, expert) pairs per local expert among the
    /// rows held (unpadded). EM: padded counts, clamped to the room left under S.
    pub expert_counters: Vec<usize>,
    /// `layout_info->expert_offsets` [L] (EM; clamped to S). Empty for FLAT.
    pub expert_offsets: Vec<usize>,
    /// EM: offsets before clamping (zone l is `[zone_offsets[l], zone_offsets[l] + pad(c_l))`).
    /// Empty for FLAT.
    pub zone_offsets: Vec<usize>,
    /// EM: unpadded (token, expert) pairs per local expert, pre-drop. FLAT: (row, expert) pairs
    /// per local expert, pre-drop.
    pub expert_pairs: Vec<usize>,
    /// Rows `[0, count)`.
    pub slots: Vec<HtSlot>,
    /// Data rows (not padding) dropped by the budget.
    pub dropped: usize,
}

/// The whole group's routing of one handle and what follows from it (docs/HT.md, "Routing").
#[derive(Clone, Debug)]
pub struct HtPlan {
    pub cfg: HtConfig,
    /// [rank][t·K + k], invalid ids (capture) replaced by −1.
    routing: Vec<Vec<i64>>,
    ranks: Vec<HtRankMeta>,
    /// [rank][t]: destinations in combine order: ascending rank (FLAT), ascending (rank, local)
    /// (EM).
    sends: Vec<Vec<Vec<HtSend>>>,
    /// Set under graph capture when TRAP found an overflow (rows were dropped as with DROP):
    /// the group's async error flag.
    pub async_error: bool,
}

impl HtPlan {
    /// `ncclEpUpdateHandle` outside graph capture: every rank's routing `[T_r, K]` (ids −1..E−1,
    /// repeats count once), or the error the update returns.
    pub fn new<R: AsRef<[i64]>>(cfg: HtConfig, routing: &[R]) -> Result<Self, HtPlanError> {
        Self::build(cfg, routing, false)
    }

    /// `ncclEpUpdateHandle` under graph capture: invalid ids are treated as −1, and a TRAP
    /// overflow drops rows as DROP does and sets [`HtPlan::async_error`].
    pub fn captured<R: AsRef<[i64]>>(cfg: HtConfig, routing: &[R]) -> Self {
        Self::build(cfg, routing, true).expect("capture reports no errors")
    }

    fn build<R: AsRef<[i64]>>(cfg: HtConfig, routing: &[R], capturing: bool) -> Result<Self, HtPlanError> {
        let (n, e, k) = (cfg.nranks, cfg.num_experts, cfg.topk);
        assert!(n > 0 && k > 0 && e > 0 && e.is_multiple_of(n), "bad config {cfg:?}");
        assert!(
            matches!(cfg.layout, Layout::Flat | Layout::ExpertMajor),
            "HT layouts are FLAT and EXPERT_MAJOR"
        );
        assert_eq!(routing.len(), n, "one routing per rank");
        let l_n = cfg.local_experts();
        let mut clean = Vec::with_capacity(n);
        for (r, rt) in routing.iter().enumerate() {
            let rt = rt.as_ref();
            assert!(rt.len().is_multiple_of(k), "rank {r}: routing is [T, {k}]");
            if let Some((row, kk, value)) = find_bad_expert_id(rt, k, e)
                && !capturing
            {
                return Err(HtPlanError::BadExpertId(BadExpertId {
                    rank: r,
                    row,
                    k: kk,
                    value,
                    num_experts: e,
                }));
            }
            clean.push(
                rt.iter()
                    .map(|&x| if x < 0 || x >= e as i64 { -1 } else { x })
                    .collect::<Vec<i64>>(),
            );
        }
        let tokens: Vec<usize> = clean.iter().map(|r| r.len() / k).collect();
        // Distinct selections of every token, in k order: (expert, first k).
        let sel: Vec<Vec<Vec<(usize, usize)>>> = clean
            .iter()
            .map(|rt| {
                rt.chunks(k)
                    .map(|row| {
                        let mut v: Vec<(usize, usize)> = Vec::new();
                        for (kk, &x) in row.iter().enumerate() {
                            if x >= 0 && !v.iter().any(|&(y, _)| y == x as usize) {
                                v.push((x as usize, kk));
                            }
                        }
                        v
                    })
                    .collect()
            })
            .collect();

        // Per destination rank: the rows it would receive with no budget, in slot order.
        // FLAT: one entry per (source, token) hitting the rank. EM: one zone per local expert.
        /// (source rank, source token, its (local expert, first k) here).
        type FlatRow = (usize, usize, Vec<(usize, usize)>);
        struct Want {
            flat: Vec<FlatRow>,
            zones: Vec<Vec<(usize, usize, usize)>>,
            total: usize,
        }
        let want: Vec<Want> = (0..n)
            .map(|d| {
                let mut flat = Vec::new();
                let mut zones = vec![Vec::new(); l_n];
                for (s, st) in sel.iter().enumerate() {
                    for (t, row) in st.iter().enumerate() {
                        let mut here: Vec<(usize, usize)> = row
                            .iter()
                            .filter(|&&(x, _)| x / l_n == d)
                            .map(|&(x, kk)| (x % l_n, kk))
                            .collect();
                        if here.is_empty() {
                            continue;
                        }
                        here.sort_unstable();
                        for &(l, kk) in &here {
                            zones[l].push((s, t, kk));
                        }
                        flat.push((s, t, here));
                    }
                }
                let total = match cfg.layout {
                    Layout::Flat => flat.len(),
                    _ => zones.iter().map(|z| cfg.pad(z.len())).sum(),
                };
                Want { flat, zones, total }
            })
            .collect();

        let fixed = cfg.budget > 0;
        let mut async_error = false;
        if let Some(d) = (0..n).find(|&d| fixed && want[d].total > cfg.budget)
            && cfg.policy == OverflowPolicy::Trap
        {
            if !capturing {
                return Err(HtPlanError::Overflow {
                    rank: d,
                    count: want[d].total,
                    budget: cfg.budget,
                });
            }
            async_error = true;
        }
        let cap = if fixed { cfg.budget } else { usize::MAX };

        let mut sends: Vec<Vec<Vec<HtSend>>> = tokens.iter().map(|&t| vec![Vec::new(); t]).collect();
        let mut ranks = Vec::with_capacity(n);
        for (d, w) in want.into_iter().enumerate() {
            let count = w.total.min(cap);
            let mut meta = HtRankMeta {
                recv_total: w.total,
                count,
                expert_counters: vec![0; l_n],
                expert_offsets: Vec::new(),
                zone_offsets: Vec::new(),
                expert_pairs: vec![0; l_n],
                slots: Vec::with_capacity(count),
                dropped: 0,
            };
            match cfg.layout {
                Layout::Flat => {
                    for (i, (s, t, experts)) in w.flat.into_iter().enumerate() {
                        let kept = i < cap;
                        for &(l, _) in &experts {
                            meta.expert_pairs[l] += 1;
                            if kept {
                                meta.expert_counters[l] += 1;
                            }
                        }
                        sends[s][t].push(HtSend {
                            rank: d,
                            local: None,
                            slot: kept.then_some(i),
                        });
                        if kept {
                            meta.slots.push(HtSlot::Token {
                                src_rank: s,
                                src_token: t,
                                experts,
                            });
                        } else {
                            meta.dropped += 1;
                        }
                    }
                }
                _ => {
                    meta.slots = vec![HtSlot::Padding; count];
                    let mut off = 0usize;
                    for (l, zone) in w.zones.into_iter().enumerate() {
                        let padded = cfg.pad(zone.len());
                        meta.zone_offsets.push(off);
                        meta.expert_pairs[l] = zone.len();
                        let pub_off = off.min(cap);
                        meta.expert_offsets.push(pub_off);
                        meta.expert_counters[l] = padded.min(cap - pub_off);
                        for (j, (s, t, kk)) in zone.into_iter().enumerate() {
                            let slot = off + j;
                            let kept = slot < cap;
                            sends[s][t].push(HtSend {
                                rank: d,
                                local: Some(l),
                                slot: kept.then_some(slot),
                            });
                            if kept {
                                meta.slots[slot] = HtSlot::Expert {
                                    src_rank: s,
                                    src_token: t,
                                    local: l,
                                    k: kk,
                                };
                            } else {
                                meta.dropped += 1;
                            }
                        }
                        off += padded;
                    }
                }
            }
            ranks.push(meta);
        }
        Ok(Self {
            cfg,
            routing: clean,
            ranks,
            sends,
            async_error,
        })
    }

    pub fn nranks(&self) -> usize {
        self.cfg.nranks
    }
    /// T of rank r.
    pub fn num_tokens(&self, r: usize) -> usize {
        self.routing[r].len() / self.cfg.topk
    }
    /// Rank r's routing as the handle keeps it (invalid ids under capture are −1).
    pub fn routing(&self, r: usize) -> &[i64] {
        &self.routing[r]
    }
    /// What rank d receives.
    pub fn rank(&self, d: usize) -> &HtRankMeta {
        &self.ranks[d]
    }
    /// Where token t of rank s goes, in combine order.
    pub fn sends(&self, s: usize, t: usize) -> &[HtSend] {
        &self.sends[s][t]
    }
    /// The row of token t of rank s at rank d (FLAT; `local` ignored) or at local expert
    /// `local` of rank d (EM); None where it does not go there or was dropped.
    pub fn slot_of(&self, s: usize, t: usize, d: usize, local: usize) -> Option<usize> {
        self.sends[s][t]
            .iter()
            .find(|x| x.rank == d && x.local.is_none_or(|l| l == local))
            .and_then(|x| x.slot)
    }

    /// The rows at which FLAT top-k outputs and EM weights are reset (to −1 / 0.0) when not
    /// written: `[count, S)`; none in eager mode.
    fn reset_end(&self, d: usize) -> usize {
        self.ranks[d].count.max(self.cfg.budget)
    }

    /// Rank d's dispatch outputs with `out_rows` rows (≥ S, or ≥ count in eager mode).
    pub fn dispatch(&self, d: usize, inp: &HtDispatchIn<'_>, out_rows: usize) -> HtDispatchOut {
        let (n, k, l_n) = (self.cfg.nranks, self.cfg.topk, self.cfg.local_experts());
        let meta = &self.ranks[d];
        assert!(
            out_rows >= meta.count,
            "rank {d}: {out_rows} output rows < count {}",
            meta.count
        );
        assert!(
            out_rows >= self.cfg.budget,
            "rank {d}: {out_rows} output rows < S {}",
            self.cfg.budget
        );
        let rb = inp.hidden * inp.dtype.bytes();
        assert_eq!(inp.tokens.len(), n, "tokens of every rank");
        for (s, x) in inp.tokens.iter().enumerate() {
            assert_eq!(x.len(), self.num_tokens(s) * rb, "rank {s}: tokens are [T, H]");
        }
        let fwd = inp.pass == PassDir::Forward;
        if fwd {
            assert_eq!(inp.weights.len(), n, "forward: weights of every rank");
            for (s, w) in inp.weights.iter().enumerate() {
                assert_eq!(w.len(), self.num_tokens(s) * k, "rank {s}: weights are [T, K]");
            }
        }
        let p = inp.poison;
        let mut out = HtDispatchOut {
            tokens: self.dispatch_rows(d, inp.tokens, rb, out_rows, p),
            topk_idx: Vec::new(),
            topk_weights: Vec::new(),
        };
        if !fwd {
            return out;
        }
        let pw = f32::from_bits(u32::from_ne_bytes([p; 4]));
        let pi = i64::from_ne_bytes([p; 8]);
        let end = self.reset_end(d);
        match self.cfg.layout {
            Layout::Flat => {
                out.topk_idx = vec![pi; out_rows * k];
                out.topk_weights = vec![pw; out_rows * k];
                out.topk_idx[..end * k].fill(-1);
                out.topk_weights[..end * k].fill(0.0);
                for (i, slot) in meta.slots.iter().enumerate() {
                    let HtSlot::Token {
                        src_rank,
                        src_token,
                        experts,
                    } = slot
                    else {
                        unreachable!("FLAT rows are tokens")
                    };
                    for (j, &(l, kk)) in experts.iter().enumerate() {
                        out.topk_idx[i * k + j] = match inp.recv_kind {
                            ExpertIdKind::Local => l as i64,
                            ExpertIdKind::Global => (d * l_n + l) as i64,
                        };
                        out.topk_weights[i * k + j] = inp.weights[*src_rank][src_token * k + kk];
                    }
                }
            }
            _ => {
                out.topk_weights = vec![pw; out_rows];
                out.topk_weights[..end].fill(0.0);
                for (i, slot) in meta.slots.iter().enumerate() {
                    if let HtSlot::Expert {
                        src_rank,
                        src_token,
                        k: kk,
                        ..
                    } = *slot
                    {
                        out.topk_weights[i] = inp.weights[src_rank][src_token * k + kk];
                    }
                }
            }
        }
        out
    }

    /// Every rank's dispatch outputs, each with `max(S, count_r)` rows.
    /// Rank d's received rows of a byte matrix every rank sends, `rows[s]` = `[T_s, row_bytes]`:
    /// `[out_rows, row_bytes]` with rows `[0, count)` copied from their sources (EM padding rows
    /// zero) and the rest `poison`. This is the token move of every dispatch, and with
    /// NCCL_EP_DISP_QUANT_FWD both the caller's raw token rows (any wire type: FP8, packed FP4,
    /// ...) and their scale rows, which travel with them and are never converted.
    pub fn dispatch_rows(&self, d: usize, rows: &[Vec<u8>], row_bytes: usize, out_rows: usize, poison: u8) -> Vec<u8> {
        let meta = &self.ranks[d];
        assert!(
            out_rows >= meta.count,
            "rank {d}: {out_rows} output rows < count {}",
            meta.count
        );
        assert_eq!(rows.len(), self.cfg.nranks, "rows of every rank");
        for (s, x) in rows.iter().enumerate() {
            assert_eq!(
                x.len(),
                self.num_tokens(s) * row_bytes,
                "rank {s}: rows are [T, row_bytes]"
            );
        }
        let rb = row_bytes;
        let mut out = vec![poison; out_rows * rb];
        for (i, slot) in meta.slots.iter().enumerate() {
            let row = &mut out[i * rb..(i + 1) * rb];
            match *slot {
                HtSlot::Token {
                    src_rank, src_token, ..
                }
                | HtSlot::Expert {
                    src_rank, src_token, ..
                } => row.copy_from_slice(&rows[src_rank][src_token * rb..(src_token + 1) * rb]),
                HtSlot::Padding => row.fill(0),
            }
        }
        out
    }

    pub fn dispatch_all(&self, inp: &HtDispatchIn<'_>) -> Vec<HtDispatchOut> {
        (0..self.cfg.nranks)
            .map(|d| self.dispatch(d, inp, self.reset_end(d)))
            .collect()
    }

    /// Rank s's combine outputs: `out[t] = round(Σ x_d[slot])` over the token's destinations in
    /// combine order (FLAT: rank ascending; EM: (rank, local expert) ascending), f32 adds from
    /// +0.0 and one rounding to the call's type; backward also gathers the weight gradients.
    pub fn combine(&self, s: usize, inp: &HtCombineIn<'_>) -> HtCombineOut {
        let (n, k, l_n) = (self.cfg.nranks, self.cfg.topk, self.cfg.local_experts());
        let h = inp.hidden;
        let rb = h * inp.dtype.bytes();
        assert_eq!(inp.tokens.len(), n, "tokens of every rank");
        for (d, x) in inp.tokens.iter().enumerate() {
            assert!(
                x.len() >= self.ranks[d].count * rb && x.len().is_multiple_of(rb.max(1)),
                "rank {d}: combine input is [>= count, H]"
            );
        }
        let t_s = self.num_tokens(s);
        let mut tokens = vec![0u8; t_s * rb];
        let mut acc = vec![0f32; h];
        for t in 0..t_s {
            acc.fill(0.0);
            for x in &self.sends[s][t] {
                let Some(slot) = x.slot else { continue };
                let row = &inp.tokens[x.rank][slot * rb..(slot + 1) * rb];
                for (i, a) in acc.iter_mut().enumerate() {
                    *a += inp.dtype.load(row, i);
                }
            }
            let out = &mut tokens[t * rb..(t + 1) * rb];
            for (i, &a) in acc.iter().enumerate() {
                inp.dtype.store(out, i, a);
            }
        }
        let mut topk_weights = Vec::new();
        if inp.pass == PassDir::Backward {
            assert_eq!(inp.weights.len(), n, "backward: weights of every rank");
            topk_weights = vec![0f32; t_s * k];
            for t in 0..t_s {
                for kk in 0..k {
                    let e = self.routing[s][t * k + kk];
                    if e < 0 {
                        continue;
                    }
                    let (d, l) = (e as usize / l_n, e as usize % l_n);
                    let Some(slot) = self.slot_of(s, t, d, l) else { continue };
                    topk_weights[t * k + kk] = match &self.ranks[d].slots[slot] {
                        HtSlot::Token { experts, .. } => {
                            let j = experts
                                .iter()
                                .position(|&(x, _)| x == l)
                                .expect("the expert is in its row");
                            inp.weights[d][slot * k + j]
                        }
                        _ => inp.weights[d][slot],
                    };
                }
            }
        }
        HtCombineOut { tokens, topk_weights }
    }

    /// Every rank's combine outputs.
    pub fn combine_all(&self, inp: &HtCombineIn<'_>) -> Vec<HtCombineOut> {
        (0..self.cfg.nranks).map(|s| self.combine(s, inp)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch and combine calls

/// One dispatch call of the whole group.
#[derive(Clone, Copy, Debug)]
pub struct HtDispatchIn<'a> {
    pub dtype: HtDtype,
    /// H (elements per row).
    pub hidden: usize,
    pub pass: PassDir,
    /// `layout_info->recv_topk_idx_kind` of the dispatch call (FLAT forward only).
    pub recv_kind: ExpertIdKind,
    /// Every rank's `inputs.tokens` `[T_r, H]`. (QUANT_FWD: [`HtPlan::dispatch_rows`] moves the
    /// raw token and scale rows; this struct's call gives the top-k outputs.)
    pub tokens: &'a [Vec<u8>],
    /// Forward: every rank's `inputs.topk_weights` `[T_r, K]`; backward: empty.
    pub weights: &'a [Vec<f32>],
    /// The byte the tests fill outputs with first: what every element the call leaves alone
    /// holds in the result.
    pub poison: u8,
}

/// One NCCL_EP_DISP_QUANT_FWD ("scales forwarded") dispatch of the whole group: the caller's
/// raw token rows and one scale row per token, moved as bytes (never converted).
#[derive(Clone, Copy, Debug)]
pub struct HtQuantFwdIn<'a> {
    /// Bytes of a token row (H · element size, H/2 for packed FP4): a multiple of 16.
    pub token_row_bytes: usize,
    /// Bytes of a scale row (S_t · element size): a multiple of 16.
    pub scale_row_bytes: usize,
    pub pass: PassDir,
    pub recv_kind: ExpertIdKind,
    /// Every rank's `inputs.tokens` `[T_r, token_row_bytes]` and `inputs.scales`
    /// `[T_r, scale_row_bytes]`, raw.
    pub tokens: &'a [Vec<u8>],
    pub scales: &'a [Vec<u8>],
    /// Forward: every rank's `inputs.topk_weights` `[T_r, K]`; backward: empty.
    pub weights: &'a [Vec<f32>],
    pub poison: u8,
}

/// One rank's QUANT_FWD dispatch outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct HtQuantFwdOut {
    /// `[out_rows, token_row_bytes]` and `[out_rows, scale_row_bytes]`: a received row's scales
    /// sit at the same row as its tokens (FLAT and EXPERT_MAJOR alike; EM padding rows are zero
    /// in both); rows at or past `count` poison.
    pub tokens: Vec<u8>,
    pub scales: Vec<u8>,
    /// As [`HtDispatchOut`] (the recipe does not change them).
    pub topk_idx: Vec<i64>,
    pub topk_weights: Vec<f32>,
}

impl HtPlan {
    /// Rank d's outputs of a QUANT_FWD dispatch with `out_rows` rows on both outputs.
    pub fn dispatch_quant_fwd(&self, d: usize, inp: &HtQuantFwdIn<'_>, out_rows: usize) -> HtQuantFwdOut {
        assert!(
            inp.token_row_bytes.is_multiple_of(16) && inp.scale_row_bytes.is_multiple_of(16),
            "QUANT_FWD rows are multiples of 16 bytes"
        );
        // The top-k outputs do not depend on the token type: a bf16 view of the raw rows.
        let base = self.dispatch(
            d,
            &HtDispatchIn {
                dtype: HtDtype::Bf16,
                hidden: inp.token_row_bytes / 2,
                pass: inp.pass,
                recv_kind: inp.recv_kind,
                tokens: inp.tokens,
                weights: inp.weights,
                poison: inp.poison,
            },
            out_rows,
        );
        HtQuantFwdOut {
            tokens: base.tokens,
            scales: self.dispatch_rows(d, inp.scales, inp.scale_row_bytes, out_rows, inp.poison),
            topk_idx: base.topk_idx,
            topk_weights: base.topk_weights,
        }
    }
}

/// One rank's dispatch outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct HtDispatchOut {
    /// `[out_rows, H]`: rows `[0, count)` written (EM padding rows zero), the rest poison.
    pub tokens: Vec<u8>,
    /// FLAT forward `[out_rows, K]`: per row the local (or global) experts ascending, then −1;
    /// rows `[count, S)` −1; rows past `max(count, S)` poison. Empty otherwise.
    pub topk_idx: Vec<i64>,
    /// FLAT forward `[out_rows, K]` (aligned with `topk_idx`, 0.0 tail); EM forward `[out_rows]`
    /// (padding 0.0); rows `[count, S)` 0.0, past `max(count, S)` poison. Empty for backward.
    pub topk_weights: Vec<f32>,
}

/// One combine call of the whole group.
#[derive(Clone, Copy, Debug)]
pub struct HtCombineIn<'a> {
    pub dtype: HtDtype,
    pub hidden: usize,
    pub pass: PassDir,
    /// Every rank's `inputs.tokens` `[≥ count_r, H]`.
    pub tokens: &'a [Vec<u8>],
    /// Backward: every rank's `inputs.topk_weights` (FLAT `[≥ count_r, K]` in forward's
    /// compacted ascending layout, EM `[≥ count_r]`); forward: empty.
    pub weights: &'a [Vec<f32>],
}

/// One rank's combine outputs.
#[derive(Clone, Debug, PartialEq)]
pub struct HtCombineOut {
    /// `[T, H]`.
    pub tokens: Vec<u8>,
    /// Backward `[T, K]`: the gradient supplied for (t, `topk_idx[t][k]`), in the source's k
    /// order (every occurrence of a repeated expert), 0.0 for −1 and dropped rows. Forward: empty.
    pub topk_weights: Vec<f32>,
}
