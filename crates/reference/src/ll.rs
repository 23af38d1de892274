//! The CPU reference of low-latency dispatch and combine (docs/LL.md, "Dispatch" and "Combine"):
//! the test oracle the GPU kernels are compared against, bit for bit.
//!
//! It computes a whole world (all N ranks) at once from every rank's inputs, so it needs no
//! messages: each rule of docs/LL.md is applied directly. Malformed inputs are test bugs, so
//! they panic instead of returning errors.
//!
//! Tokens are held as the bits of their element type ([`TokenElem`]): `u16` is bf16 (the
//! default of every generic type here), [`Fp16`] and [`Fp32`] are the other types that LL moves
//! without a quantisation recipe. Dispatch copies bits; combine converts to f32 exactly and rounds
//! once to the output type, which is the input type.

use crate::ht::{f16_to_f32, f32_to_f16_rne};
use ep_core::enums::{DType, ExpertIdKind, Layout, dtype};

// ---------------------------------------------------------------------------------------------
// bf16

/// bf16 bits to f32 (exact; NaN stays NaN with its payload).
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 to bf16 bits, round to nearest, ties to even (what `__float2bfloat16_rn` does). NaN gives
/// a quiet NaN of the same sign: plain rounding could carry a low-bit payload into infinity.
pub fn f32_to_bf16_rne(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) as u16) | 0x0040;
    }
    let lsb = (bits >> 16) & 1;
    (bits.wrapping_add(0x7FFF + lsb) >> 16) as u16
}

// ---------------------------------------------------------------------------------------------
// Token element types

/// One element of a token row, held as its bits (so equality is bitwise, NaNs included).
pub trait TokenElem: Copy + PartialEq + std::fmt::Debug + Default + Send + Sync + 'static {
    /// The `ncclDataType_t` of this type. (A function, not an associated const: cbindgen would
    /// put the type into nccl_ep.h for a const.)
    fn nccl_dtype() -> DType;
    /// The value as f32 (exact for all three types).
    fn to_f32(self) -> f32;
    /// `v` rounded once to this type: nearest, ties to even (identity for fp32).
    fn from_f32(v: f32) -> Self;
}

/// bf16: the bits of a `__nv_bfloat16`.
impl TokenElem for u16 {
    fn nccl_dtype() -> DType {
        dtype::BFLOAT16
    }
    fn to_f32(self) -> f32 {
        bf16_to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f32_to_bf16_rne(v)
    }
}

/// IEEE binary16 (`ncclFloat16`), as bits.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Fp16(pub u16);

impl TokenElem for Fp16 {
    fn nccl_dtype() -> DType {
        dtype::FLOAT16
    }
    fn to_f32(self) -> f32 {
        f16_to_f32(self.0)
    }
    fn from_f32(v: f32) -> Self {
        Fp16(f32_to_f16_rne(v))
    }
}

/// IEEE binary32 (`ncclFloat32`), as bits.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Fp32(pub u32);

impl TokenElem for Fp32 {
    fn nccl_dtype() -> DType {
        dtype::FLOAT32
    }
    fn to_f32(self) -> f32 {
        f32::from_bits(self.0)
    }
    fn from_f32(v: f32) -> Self {
        Fp32(v.to_bits())
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic random numbers (SplitMix64: tiny, no dependency, same stream on every host).

#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, n) (multiply-shift; the bias is far below what tests can notice).
    pub fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }
    /// Uniform in [0, 1).
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u32 << 24) as f32
    }
    /// True with probability 1/n.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs

/// The group-wide sizes of one LL call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlShape {
    /// N.
    pub nranks: usize,
    /// E (a multiple of N).
    pub num_experts: usize,
    /// B: most tokens a rank dispatches.
    pub max_tokens: usize,
    /// H: elements per token.
    pub hidden: usize,
    /// K.
    pub topk: usize,
}

impl LlShape {
    /// L = E / N.
    pub fn local_experts(&self) -> usize {
        self.num_experts / self.nranks
    }
}

/// One rank's dispatch inputs (tokens of type `T`, bf16 by default).
#[derive(Clone, Debug, PartialEq)]
pub struct LlRankInput<T = u16> {
    /// T <= B.
    pub num_tokens: usize,
    /// [T, H] elements (bits).
    pub tokens: Vec<T>,
    /// [T, K]; −1 = no expert, otherwise a global id < E.
    pub topk_idx: Vec<i64>,
    /// [T, K] (dispatched with the tokens; rank-major outputs copy them).
    pub weights: Vec<f32>,
}

/// Every rank's inputs of one call.
#[derive(Clone, Debug, PartialEq)]
pub struct LlWorld<T = u16> {
    pub shape: LlShape,
    pub ranks: Vec<LlRankInput<T>>,
}

/// How a generated world routes its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// K distinct experts per token, uniform over all E.
    Uniform,
    /// Every token picks only experts of this rank (distinct; −1 where K > L).
    Skewed { rank: usize },
    /// Several of a token's K experts live on one rank, and some tokens name one expert id two
    /// or three times in their top-k row (docs/LL.md, "Duplicate experts in one top-k row").
    SameRankDups,
}

impl<T: TokenElem> LlWorld<T> {
    /// Panics unless every input has its documented shape and range.
    pub fn check(&self) {
        let s = &self.shape;
        assert!(s.nranks > 0 && s.num_experts > 0 && s.topk > 0 && s.max_tokens > 0);
        assert!(s.num_experts.is_multiple_of(s.nranks), "E % N != 0");
        assert_eq!(self.ranks.len(), s.nranks, "one input per rank");
        for (r, x) in self.ranks.iter().enumerate() {
            let t = x.num_tokens;
            assert!(t <= s.max_tokens, "rank {r}: {t} tokens > B");
            assert_eq!(x.tokens.len(), t * s.hidden, "rank {r}: tokens shape");
            assert_eq!(x.topk_idx.len(), t * s.topk, "rank {r}: topk_idx shape");
            assert_eq!(x.weights.len(), t * s.topk, "rank {r}: weights shape");
            for &e in &x.topk_idx {
                assert!(e >= -1 && e < s.num_experts as i64, "rank {r}: expert id {e}");
            }
        }
    }

    /// A random world: T_r uniform in [0, B] (rank 0 always sends B tokens), tokens in [−4, 4)
    /// rounded to `T`, weights in [0, 1), about one selection in eight −1. The random stream is
    /// the same for every `T`.
    pub fn random_of(rng: &mut SplitMix64, shape: LlShape, routing: Routing) -> Self {
        let ranks = (0..shape.nranks)
            .map(|r| {
                let t = if r == 0 {
                    shape.max_tokens
                } else {
                    rng.below(shape.max_tokens + 1)
                };
                let tokens = (0..t * shape.hidden)
                    .map(|_| T::from_f32(rng.unit_f32() * 8.0 - 4.0))
                    .collect();
                let weights = (0..t * shape.topk).map(|_| rng.unit_f32()).collect();
                LlRankInput {
                    num_tokens: t,
                    tokens,
                    topk_idx: gen_routing(rng, shape, t, routing),
                    weights,
                }
            })
            .collect();
        let w = Self { shape, ranks };
        w.check();
        w
    }
}

impl LlWorld {
    /// [`LlWorld::random_of`] with bf16 tokens.
    pub fn random(rng: &mut SplitMix64, shape: LlShape, routing: Routing) -> Self {
        Self::random_of(rng, shape, routing)
    }
}

/// `k` distinct values of `0..n` (partial Fisher–Yates).
fn distinct(rng: &mut SplitMix64, n: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    for i in 0..k.min(n) {
        let j = i + rng.below(n - i);
        all.swap(i, j);
    }
    all.truncate(k.min(n));
    all
}

/// Routing [T, K] for one rank of a T-token call. Duplicate ids in a row need no bound: a token
/// reaches each expert once however often its row names it, so no expert gets more than N·B rows.
pub fn gen_routing(rng: &mut SplitMix64, shape: LlShape, t: usize, routing: Routing) -> Vec<i64> {
    let (n, e, k, l) = (shape.nranks, shape.num_experts, shape.topk, shape.local_experts());
    let mut out = Vec::with_capacity(t * k);
    for _ in 0..t {
        let mut row: Vec<i64> = match routing {
            Routing::Uniform => distinct(rng, e, k).into_iter().map(|x| x as i64).collect(),
            Routing::Skewed { rank } => {
                assert!(rank < n);
                let mut r: Vec<i64> = distinct(rng, l, k).into_iter().map(|x| (rank * l + x) as i64).collect();
                r.resize(k, -1);
                r
            }
            Routing::SameRankDups => {
                let rank = rng.below(n);
                let m = (k / 2).max(2).min(k).min(l);
                let mut r: Vec<i64> = distinct(rng, l, m).into_iter().map(|x| (rank * l + x) as i64).collect();
                for x in distinct(rng, e, e) {
                    if r.len() == k {
                        break;
                    }
                    if !r.contains(&(x as i64)) {
                        r.push(x as i64);
                    }
                }
                // True duplicate ids: about one row in three names r[0] again at another
                // position, and half of those a third time (where K allows).
                if k >= 2 && rng.one_in(3) {
                    let dup = r[0];
                    r[1 + rng.below(k - 1)] = dup;
                    if k >= 3 && rng.one_in(2) {
                        r[1 + rng.below(k - 1)] = dup;
                    }
                }
                // Shuffle so same-rank and duplicate selections land at any top-k position.
                let order = distinct(rng, k, k);
                order.into_iter().map(|i| r[i]).collect()
            }
        };
        for x in row.iter_mut() {
            if *x >= 0 && rng.one_in(8) {
                *x = -1;
            }
        }
        out.extend(row);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Masks

/// Which pairs of ranks exchange data in one operation (docs/LL.md, "Masks and timeouts").
/// With rank masks, source s sends to d only while d is active in s's mask, and d reads from s
/// only while s is active in d's mask; so s's tokens reach d (and d's expert outputs come back
/// to s) exactly when each has the other active. Tests keep masks fixed between a dispatch and
/// its combine and give no rank a peer that waits for it in vain (that would be a timeout, which
/// this model does not cover).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LlLinks {
    /// [s][d].
    linked: Vec<Vec<bool>>,
}

impl LlLinks {
    /// No masks: every pair linked.
    pub fn all(nranks: usize) -> Self {
        Self {
            linked: vec![vec![true; nranks]; nranks],
        }
    }

    /// From every rank's mask: `masks[r][x]` is rank r's view of rank x (true = active).
    pub fn from_masks(masks: &[Vec<bool>]) -> Self {
        let n = masks.len();
        assert!(masks.iter().all(|m| m.len() == n), "one mask entry per rank");
        Self {
            linked: (0..n)
                .map(|s| (0..n).map(|d| masks[s][d] && masks[d][s]).collect())
                .collect(),
        }
    }

    /// Ranks in `absent` neither send nor receive; the others all have each other active.
    pub fn without(nranks: usize, absent: &[usize]) -> Self {
        let masks: Vec<Vec<bool>> = (0..nranks)
            .map(|r| {
                (0..nranks)
                    .map(|x| !absent.contains(&r) && !absent.contains(&x))
                    .collect()
            })
            .collect();
        Self::from_masks(&masks)
    }

    pub fn nranks(&self) -> usize {
        self.linked.len()
    }

    /// Whether source s's tokens reach rank d (and d's outputs come back to s).
    pub fn linked(&self, s: usize, d: usize) -> bool {
        self.linked[s][d]
    }
}

// ---------------------------------------------------------------------------------------------
// Routing as docs/LL.md defines it

/// Where every selection goes, computed once from the world.
///
/// Duplicate experts in one top-k row (docs/LL.md): when a row names expert e at k1 < k2, the
/// token reaches e once, at its first occurrence k1. `pos` and `expert_count` count distinct
/// (token, expert) pairs, so an expert gets at most N·B expert-major rows, and [`LlRoute::em_row`]
/// gives every occurrence the row of the first one ([`LlRoute::em_first_k`] tells them apart).
#[derive(Clone, Debug)]
pub struct LlRoute {
    shape: LlShape,
    /// [s][t]: (destination rank, slot) in order of first appearance in the top-k row.
    dest: Vec<Vec<Vec<(usize, usize)>>>,
    /// [s][d]: tokens s sends to d (n_d of the dispatch flag).
    sent: Vec<Vec<usize>>,
    /// [s][t·K + k]: earlier tokens t' < t of s that selected the same expert (−1: no expert).
    pos: Vec<Vec<i64>>,
    /// [s][t·K + k]: the first top-k position of row t holding the same expert (−1: no expert).
    first: Vec<Vec<i64>>,
    /// [d][s][l]: distinct (token, expert) pairs s sends to local expert l of d (`expert_count`).
    expert_count: Vec<Vec<Vec<usize>>>,
    /// Which sources reach which ranks (all pairs without masks).
    links: LlLinks,
}

impl LlRoute {
    pub fn new<T: TokenElem>(world: &LlWorld<T>) -> Self {
        Self::with_links(world, LlLinks::all(world.shape.nranks))
    }

    /// The routing when only the pairs `links` allows exchange data: slots, `pos` and counts
    /// are what each source computes (over all its tokens); a receiver only places the rows of
    /// linked sources, so its expert-major bases sum linked sources only.
    pub fn with_links<T: TokenElem>(world: &LlWorld<T>, links: LlLinks) -> Self {
        world.check();
        assert_eq!(links.nranks(), world.shape.nranks, "links of every rank");
        let sh = world.shape;
        let (n, l, k) = (sh.nranks, sh.local_experts(), sh.topk);
        let mut dest = Vec::with_capacity(n);
        let mut sent = vec![vec![0usize; n]; n];
        let mut pos = Vec::with_capacity(n);
        let mut first = Vec::with_capacity(n);
        let mut expert_count = vec![vec![vec![0usize; l]; n]; n];
        for (s, inp) in world.ranks.iter().enumerate() {
            // seen[e]: tokens of s so far that selected e (each token once).
            let mut seen = vec![0usize; sh.num_experts];
            let mut p = vec![-1i64; inp.num_tokens * k];
            let mut f = vec![-1i64; inp.num_tokens * k];
            let mut ds = Vec::with_capacity(inp.num_tokens);
            for t in 0..inp.num_tokens {
                let ids = &inp.topk_idx[t * k..(t + 1) * k];
                let mut row_dest: Vec<(usize, usize)> = Vec::new();
                for (kk, &e) in ids.iter().enumerate() {
                    if e < 0 {
                        continue;
                    }
                    let k1 = ids.iter().position(|&x| x == e).expect("e is in its own row");
                    f[t * k + kk] = k1 as i64;
                    let e = e as usize;
                    if k1 < kk {
                        // A repeat: same expert, same row, same pos as the first occurrence.
                        p[t * k + kk] = p[t * k + k1];
                        continue;
                    }
                    let d = e / l;
                    p[t * k + kk] = seen[e] as i64;
                    seen[e] += 1;
                    expert_count[d][s][e % l] += 1;
                    if !row_dest.iter().any(|&(dd, _)| dd == d) {
                        row_dest.push((d, sent[s][d]));
                        sent[s][d] += 1;
                    }
                }
                ds.push(row_dest);
            }
            dest.push(ds);
            pos.push(p);
            first.push(f);
        }
        Self {
            shape: sh,
            dest,
            sent,
            pos,
            first,
            expert_count,
            links,
        }
    }

    /// Whether source s's tokens reach rank d.
    pub fn linked(&self, s: usize, d: usize) -> bool {
        self.links.linked(s, d)
    }

    /// (destination rank, slot) pairs of token t of rank s, in first-appearance order.
    pub fn dests(&self, s: usize, t: usize) -> &[(usize, usize)] {
        &self.dest[s][t]
    }

    /// n_d: tokens rank s sends to rank d.
    pub fn sent(&self, s: usize, d: usize) -> usize {
        self.sent[s][d]
    }

    /// `expert_count[s][l]` as rank d receives it: distinct (token, expert) pairs, so a row that
    /// names the expert twice counts once.
    pub fn expert_count(&self, d: usize, s: usize, l: usize) -> usize {
        self.expert_count[d][s][l]
    }

    /// The `pos` header field of selection (t, k) of rank s: the number of earlier tokens of s
    /// that selected the same expert (−1 for no expert). Every occurrence of an expert in one
    /// row has the same `pos`.
    pub fn pos(&self, s: usize, t: usize, k: usize) -> i64 {
        self.pos[s][t * self.shape.topk + k]
    }

    /// The first top-k position of token t of rank s that holds the same expert as position k:
    /// `Some(k)` for a first occurrence, `Some(k1)` with k1 < k for a duplicate, `None` for −1.
    pub fn em_first_k(&self, s: usize, t: usize, k: usize) -> Option<usize> {
        let f = self.first[s][t * self.shape.topk + k];
        (f >= 0).then_some(f as usize)
    }

    /// Expert-major destination of selection (t, k) of rank s: (rank d, local expert l, row),
    /// row = base[l][s] + pos with base[l][s] = Σ_{s' < s} expert_count[s'][l] over the sources
    /// s' linked to d. A duplicate k gets the row of its first occurrence (the one row the token
    /// fills at that expert), which is the row expert-major combine reads for it; `None` for no
    /// expert or when s is not linked to d.
    pub fn em_row<T: TokenElem>(
        &self,
        world: &LlWorld<T>,
        s: usize,
        t: usize,
        k: usize,
    ) -> Option<(usize, usize, usize)> {
        let e = world.ranks[s].topk_idx[t * self.shape.topk + k];
        if e < 0 {
            return None;
        }
        let l_n = self.shape.local_experts();
        let (d, l) = (e as usize / l_n, e as usize % l_n);
        if !self.linked(s, d) {
            return None;
        }
        let base: usize = (0..s)
            .filter(|&s2| self.linked(s2, d))
            .map(|s2| self.expert_count[d][s2][l])
            .sum();
        Some((d, l, base + self.pos(s, t, k) as usize))
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch

/// Values written into output elements the operation must leave untouched, so that tests can
/// tell "untouched" from "written".
#[derive(Clone, Copy, Debug)]
pub struct LlPoison<T = u16> {
    pub token: T,
    pub weight: f32,
}

/// One rank's dispatch outputs.
#[derive(Clone, Debug, PartialEq)]
pub enum LlDispatchOut<T = u16> {
    ExpertMajor {
        /// [L, N·B, H]; one row per distinct (source token, expert) pair; rows at or past
        /// `expert_counters[l]` hold the poison.
        tokens: Vec<T>,
        /// [L].
        expert_counters: Vec<i32>,
    },
    RankMajor {
        /// [N, B, H]; row [s][i] is the i-th token source s sent here; rows i >= n_s poison.
        tokens: Vec<T>,
        /// [N, B, K]: local or global id where the expert lives here, else −1 (rows i >= n_s: −1).
        /// A duplicate expert id is listed at every position that names it.
        topk_idx: Vec<i32>,
        /// [N, B, K]: the source's weights for every k of received rows; other rows poison.
        topk_weights: Vec<f32>,
        /// [N]: n_s.
        src_rank_counters: Vec<i32>,
    },
}

impl<T> LlDispatchOut<T> {
    pub fn tokens(&self) -> &[T] {
        match self {
            Self::ExpertMajor { tokens, .. } | Self::RankMajor { tokens, .. } => tokens,
        }
    }
}

/// Dispatch for every rank at once; element r of the result is rank r's output.
pub fn ll_dispatch_ref<T: TokenElem>(
    world: &LlWorld<T>,
    layout: Layout,
    recv_kind: ExpertIdKind,
    poison: LlPoison<T>,
) -> Vec<LlDispatchOut<T>> {
    ll_dispatch_ref_masked(world, layout, recv_kind, poison, &LlLinks::all(world.shape.nranks))
}

/// Dispatch with rank masks: a source not linked to a rank is absent there (0 tokens, no rows,
/// expert-major rows of the other sources packed without it).
pub fn ll_dispatch_ref_masked<T: TokenElem>(
    world: &LlWorld<T>,
    layout: Layout,
    recv_kind: ExpertIdKind,
    poison: LlPoison<T>,
    links: &LlLinks,
) -> Vec<LlDispatchOut<T>> {
    let route = LlRoute::with_links(world, links.clone());
    let sh = world.shape;
    let (n, b, h, k, l) = (sh.nranks, sh.max_tokens, sh.hidden, sh.topk, sh.local_experts());
    let token = |s: usize, t: usize| &world.ranks[s].tokens[t * h..(t + 1) * h];
    match layout {
        Layout::ExpertMajor => {
            let mut outs: Vec<_> = (0..n)
                .map(|d| {
                    // Distinct (token, expert) pairs: at most one per source token, so <= N·B.
                    let counters: Vec<i32> = (0..l)
                        .map(|le| {
                            (0..n)
                                .filter(|&s| route.linked(s, d))
                                .map(|s| route.expert_count(d, s, le))
                                .sum::<usize>() as i32
                        })
                        .collect();
                    (vec![poison.token; l * n * b * h], counters)
                })
                .collect();
            for s in 0..n {
                for t in 0..world.ranks[s].num_tokens {
                    // First occurrences only: a duplicate expert id names the same row again.
                    for kk in (0..k).filter(|&kk| route.em_first_k(s, t, kk) == Some(kk)) {
                        if let Some((d, le, row)) = route.em_row(world, s, t, kk) {
                            let at = (le * n * b + row) * h;
                            outs[d].0[at..at + h].copy_from_slice(token(s, t));
                        }
                    }
                }
            }
            outs.into_iter()
                .map(|(tokens, expert_counters)| LlDispatchOut::ExpertMajor {
                    tokens,
                    expert_counters,
                })
                .collect()
        }
        Layout::RankMajor => (0..n)
            .map(|d| {
                let mut tokens = vec![poison.token; n * b * h];
                let mut topk_idx = vec![-1i32; n * b * k];
                let mut topk_weights = vec![poison.weight; n * b * k];
                for (s, inp) in world.ranks.iter().enumerate() {
                    if !route.linked(s, d) {
                        continue;
                    }
                    for t in 0..inp.num_tokens {
                        let Some(&(_, i)) = route.dests(s, t).iter().find(|&&(dd, _)| dd == d) else {
                            continue;
                        };
                        let row = s * b + i;
                        tokens[row * h..(row + 1) * h].copy_from_slice(token(s, t));
                        for kk in 0..k {
                            let e = inp.topk_idx[t * k + kk];
                            let here = e >= 0 && e as usize / l == d;
                            topk_idx[row * k + kk] = match (here, recv_kind) {
                                (false, _) => -1,
                                (true, ExpertIdKind::Local) => (e as usize - d * l) as i32,
                                (true, ExpertIdKind::Global) => e as i32,
                            };
                            topk_weights[row * k + kk] = inp.weights[t * k + kk];
                        }
                    }
                }
                let src_rank_counters = (0..n)
                    .map(|s| if route.linked(s, d) { route.sent(s, d) as i32 } else { 0 })
                    .collect();
                LlDispatchOut::RankMajor {
                    tokens,
                    topk_idx,
                    topk_weights,
                    src_rank_counters,
                }
            })
            .collect(),
        Layout::Flat => panic!("LOW_LATENCY has no FLAT layout"),
    }
}

// ---------------------------------------------------------------------------------------------
// Combine

/// Every rank's combine inputs (of the output's type `T`: LL combine does not convert types).
#[derive(Clone, Copy, Debug)]
pub enum LlCombineIn<'a, T = u16> {
    /// Per rank: expert outputs `x` [L, N·B, H] (rows as dispatch placed them: one per distinct
    /// (token, expert) pair) and the combine weights `w` [T, K] of the rank's own tokens.
    ExpertMajor { x: &'a [Vec<T>], weights: &'a [Vec<f32>] },
    /// Per rank: `y` [N, B, H], already reduced over the rank's local experts by the caller.
    RankMajor { y: &'a [Vec<T>] },
}

impl<T> LlCombineIn<'_, T> {
    /// Rank d's rows of expert outputs (EM `x[d]`, RM `y[d]`).
    fn rows(&self, d: usize) -> &[T] {
        match self {
            LlCombineIn::ExpertMajor { x, .. } => &x[d],
            LlCombineIn::RankMajor { y } => &y[d],
        }
    }

    /// The contributions to token t of source s, in the order combine accumulates them: (rank d,
    /// row of d's [`rows`](Self::rows), weight). EM: each valid top-k entry with its weight (a
    /// duplicate expert reads its first occurrence's row); RM: each linked destination rank's
    /// pre-reduced row, weight 1.
    fn contributions<W: TokenElem>(
        &self,
        world: &LlWorld<W>,
        route: &LlRoute,
        s: usize,
        t: usize,
    ) -> Vec<(usize, usize, f32)> {
        let sh = world.shape;
        let (n, b, k) = (sh.nranks, sh.max_tokens, sh.topk);
        match self {
            LlCombineIn::ExpertMajor { weights, .. } => (0..k)
                .filter_map(|kk| {
                    let (d, le, row) = route.em_row(world, s, t, kk)?;
                    Some((d, le * n * b + row, weights[s][t * k + kk]))
                })
                .collect(),
            LlCombineIn::RankMajor { .. } => route
                .dests(s, t)
                .iter()
                .filter(|&&(d, _)| route.linked(s, d))
                .map(|&(d, slot)| (d, s * b + slot, 1.0))
                .collect(),
        }
    }
}

/// Combine for every rank at once; element r is rank r's output [T_r, H] (bits of `T`).
/// EM: out[t] = Σ_k w[t][k]·x_row(t,k) over valid k, fused multiply-add in increasing k, where
/// a duplicate expert id reads the row of its first occurrence (each occurrence adds its own
/// weight times that one expert output).
/// RM: out[t] = Σ y_d[me][slot_d(t)] over the distinct destination ranks d in first-appearance
/// order. Both accumulate in f32 from +0 and round once to `T` (bf16 and fp16: nearest, ties
/// to even; fp32: no rounding); no valid expert gives +0.
pub fn ll_combine_ref<T: TokenElem>(world: &LlWorld<T>, input: LlCombineIn<'_, T>) -> Vec<Vec<T>> {
    ll_combine_ref_masked(world, input, &LlLinks::all(world.shape.nranks))
}

/// Combine with rank masks: contributions of expert ranks not linked to the token's source are
/// left out, with no renormalisation of the remaining weights.
pub fn ll_combine_ref_masked<T: TokenElem>(
    world: &LlWorld<T>,
    input: LlCombineIn<'_, T>,
    links: &LlLinks,
) -> Vec<Vec<T>> {
    let route = LlRoute::with_links(world, links.clone());
    let sh = world.shape;
    let (n, b, h, k) = (sh.nranks, sh.max_tokens, sh.hidden, sh.topk);
    let l = sh.local_experts();
    match input {
        LlCombineIn::ExpertMajor { x, weights } => {
            assert_eq!(x.len(), n, "one x per rank");
            assert_eq!(weights.len(), n, "one weight tensor per rank");
            for (s, ws) in weights.iter().enumerate() {
                assert_eq!(ws.len(), world.ranks[s].num_tokens * k, "rank {s}: weights shape");
            }
            for (d, xd) in x.iter().enumerate() {
                assert_eq!(xd.len(), l * n * b * h, "rank {d}: x shape");
            }
        }
        LlCombineIn::RankMajor { y } => {
            assert_eq!(y.len(), n, "one y per rank");
            for (d, yd) in y.iter().enumerate() {
                assert_eq!(yd.len(), n * b * h, "rank {d}: y shape");
            }
        }
    }
    (0..n)
        .map(|s| {
            let t_s = world.ranks[s].num_tokens;
            let mut out = vec![T::default(); t_s * h];
            let mut acc = vec![0f32; h];
            for t in 0..t_s {
                acc.fill(0.0);
                // RM rows have weight 1: fma(1, v, a) is the rounded a + v, the plain sum.
                for (d, row, w) in input.contributions(world, &route, s, t) {
                    let src = &input.rows(d)[row * h..][..h];
                    for (a, &v) in acc.iter_mut().zip(src) {
                        *a = w.mul_add(v.to_f32(), *a);
                    }
                }
                for (o, &a) in out[t * h..(t + 1) * h].iter_mut().zip(&acc) {
                    *o = T::from_f32(a);
                }
            }
            out
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Dispatch quantisation recipes (docs/LL.md, "Quantisation recipes")
//
// Both recipes place rows exactly as a dispatch without a recipe does; only what a row holds
// differs. QUANT_FWD: the caller's token bytes and scale bytes, unconverted. DS_FP8E3M4: the
// bf16 row quantised to E4M3 bytes plus one fp32 scale per 128 elements, from NCCL EP v2's
// definition (written here from the definition, independently of the kernel's bit tricks).

/// Elements per DS_FP8E3M4 scale.
pub const DS_FP8_BLOCK: usize = 128;

/// The finite magnitude of E4M3 (fn) code `c` (0..=0x7E): exponent bias 7, subnormals m·2^-9.
fn e4m3_magnitude(c: u8) -> f64 {
    let (e, m) = ((c >> 3) as i32, (c & 7) as f64);
    if e == 0 {
        m * 2f64.powi(-9)
    } else {
        (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

/// E4M3 bits to f32 (exact); 0x7F and 0xFF are NaN.
pub fn e4m3_to_f32(c: u8) -> f32 {
    if c & 0x7F == 0x7F {
        return f32::NAN;
    }
    let v = e4m3_magnitude(c & 0x7F) as f32;
    if c & 0x80 != 0 { -v } else { v }
}

/// f32 to E4M3 (fn) bits: the nearest finite value, ties to the even code, magnitudes past 448
/// (infinity too) saturated to 448, NaN to 0x7F; the sign is kept (−0 and negative values that
/// round to zero give 0x80). A search over the 127 finite magnitudes, in f64 (exact).
pub fn f32_to_e4m3_satfinite(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = (x as f64).abs();
    // The largest code whose magnitude does not exceed |x|.
    let below = (0u8..=0x7E).rev().find(|&c| e4m3_magnitude(c) <= a).unwrap_or(0);
    if below == 0x7E {
        return sign | 0x7E;
    }
    let (lo, hi) = (a - e4m3_magnitude(below), e4m3_magnitude(below + 1) - a);
    let code = if lo < hi || (lo == hi && below % 2 == 0) {
        below
    } else {
        below + 1
    };
    sign | code
}

/// One bf16 row quantised by DS_FP8E3M4: (E4M3 bytes [H], fp32 scales [H/128]). Per block of
/// 128: amax = max(1e-4, |x|) (the float nearest 1e-4, as NCCL EP's constant, converted from the
/// double); without round_scales scale_inv = amax · fl(1/448) and scale = 448 / amax, each
/// one f32 rounding; with round_scales scale_inv = 2^e and scale = 2^−e for the smallest e with
/// 2^e ≥ amax · fl(1/448). The bytes are E4M3(x · scale); the stored scale is scale_inv.
pub fn ds_fp8_quantize(row: &[u16], round_scales: bool) -> (Vec<u8>, Vec<f32>) {
    assert!(row.len().is_multiple_of(DS_FP8_BLOCK), "H % 128 != 0");
    let margin = 1e-4f64 as f32;
    let inv448 = 1.0f32 / 448.0f32;
    let mut bytes = Vec::with_capacity(row.len());
    let mut scales = Vec::with_capacity(row.len() / DS_FP8_BLOCK);
    for blk in row.chunks(DS_FP8_BLOCK) {
        let amax = blk.iter().fold(margin, |m, &b| m.max(bf16_to_f32(b).abs()));
        let y = amax * inv448;
        let (scale, scale_inv) = if round_scales {
            // Smallest power of two >= y (y is a normal float here: amax >= 1e-4).
            let mut e = -150i32;
            while 2f64.powi(e) < y as f64 {
                e += 1;
            }
            (2f64.powi(-e) as f32, 2f64.powi(e) as f32)
        } else {
            (448.0f32 / amax, y)
        };
        bytes.extend(blk.iter().map(|&b| f32_to_e4m3_satfinite(bf16_to_f32(b) * scale)));
        scales.push(scale_inv);
    }
    (bytes, scales)
}

/// Places byte rows as a dispatch places token rows: `rows[s]` is rank s's [T_s, `row_bytes`]
/// rows; element d of the result is rank d's output, EM [L, N·B, row_bytes] (one row per
/// distinct (token, local expert) pair), RM [N, B, row_bytes]; untouched bytes are `poison`.
/// The routing (and masks, `links`) are the world's; its token values are not read.
pub fn ll_dispatch_rows_ref<T: TokenElem>(
    world: &LlWorld<T>,
    layout: Layout,
    links: &LlLinks,
    rows: &[Vec<u8>],
    row_bytes: usize,
    poison: u8,
) -> Vec<Vec<u8>> {
    let route = LlRoute::with_links(world, links.clone());
    let sh = world.shape;
    let (n, b, k, l) = (sh.nranks, sh.max_tokens, sh.topk, sh.local_experts());
    assert_eq!(rows.len(), n, "rows of every rank");
    for (s, r) in rows.iter().enumerate() {
        assert_eq!(r.len(), world.ranks[s].num_tokens * row_bytes, "rank {s}: rows shape");
    }
    let row = |s: usize, t: usize| &rows[s][t * row_bytes..(t + 1) * row_bytes];
    let out_rows = if layout == Layout::ExpertMajor {
        l * n * b
    } else {
        n * b
    };
    let mut outs = vec![vec![poison; out_rows * row_bytes]; n];
    for s in 0..n {
        for t in 0..world.ranks[s].num_tokens {
            match layout {
                Layout::ExpertMajor => {
                    for kk in (0..k).filter(|&kk| route.em_first_k(s, t, kk) == Some(kk)) {
                        if let Some((d, le, r)) = route.em_row(world, s, t, kk) {
                            let at = (le * n * b + r) * row_bytes;
                            outs[d][at..at + row_bytes].copy_from_slice(row(s, t));
                        }
                    }
                }
                Layout::RankMajor => {
                    for &(d, i) in route.dests(s, t).iter().filter(|&&(d, _)| route.linked(s, d)) {
                        let at = (s * b + i) * row_bytes;
                        outs[d][at..at + row_bytes].copy_from_slice(row(s, t));
                    }
                }
                Layout::Flat => panic!("LOW_LATENCY has no FLAT layout"),
            }
        }
    }
    outs
}

/// One rank's outputs of a dispatch with a recipe: `outputs->tokens` and `outputs->scales` as
/// bytes (EM [L, N·B, row] / RM [N, B, row]); counters, ids and weights are those of
/// [`ll_dispatch_ref`] on the same routing.
#[derive(Clone, Debug, PartialEq)]
pub struct LlQuantOut {
    pub tokens: Vec<u8>,
    pub scales: Vec<u8>,
}

/// QUANT_FWD for every rank: `tokens[s]` [T_s, token_bytes] and `scales[s]` [T_s, scale_bytes]
/// travel unconverted; untouched output bytes are `poison`.
#[allow(clippy::too_many_arguments)]
pub fn ll_dispatch_fwd_ref<T: TokenElem>(
    world: &LlWorld<T>,
    layout: Layout,
    links: &LlLinks,
    (tokens, token_bytes): (&[Vec<u8>], usize),
    (scales, scale_bytes): (&[Vec<u8>], usize),
    poison: u8,
) -> Vec<LlQuantOut> {
    let t = ll_dispatch_rows_ref(world, layout, links, tokens, token_bytes, poison);
    let s = ll_dispatch_rows_ref(world, layout, links, scales, scale_bytes, poison);
    t.into_iter()
        .zip(s)
        .map(|(tokens, scales)| LlQuantOut { tokens, scales })
        .collect()
}

/// DS_FP8E3M4 for every rank of a bf16 world: each token row quantised by [`ds_fp8_quantize`],
/// its E4M3 bytes to `outputs->tokens` and its fp32 scales (little-endian bytes) to
/// `outputs->scales`; untouched output bytes are `poison`.
pub fn ll_dispatch_ds_fp8_ref(
    world: &LlWorld<u16>,
    layout: Layout,
    links: &LlLinks,
    round_scales: bool,
    poison: u8,
) -> Vec<LlQuantOut> {
    let h = world.shape.hidden;
    let (mut tok, mut sc) = (Vec::new(), Vec::new());
    for r in &world.ranks {
        let (mut tb, mut sb) = (Vec::new(), Vec::new());
        for row in r.tokens.chunks(h.max(1)).take(r.num_tokens) {
            let (q, s) = ds_fp8_quantize(row, round_scales);
            tb.extend(q);
            sb.extend(s.iter().flat_map(|v| v.to_le_bytes()));
        }
        tok.push(tb);
        sc.push(sb);
    }
    ll_dispatch_fwd_ref(world, layout, links, (&tok, h), (&sc, 4 * (h / DS_FP8_BLOCK)), poison)
}
// NVFP4 combine (docs/LL.md, "NVFP4 combine")
//
// Written from the format definitions, not from the kernel: the conversions pick the nearest
// representable value by searching the value tables (ties to the even code), where the kernel
// uses comparisons and bit arithmetic.

/// E2M1 magnitudes by code 0..=7 (sign in bit 3).
const E2M1_VALUES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The value of an E2M1 code (low 4 bits).
pub fn e2m1_to_f32(code: u8) -> f32 {
    let v = E2M1_VALUES[(code & 7) as usize];
    if code & 8 != 0 { -v } else { v }
}

/// The code among `codes` (ascending magnitudes, value of code i = `value(i)`) nearest to
/// `a` >= 0, ties to the even code; `a` above the largest saturates to it.
fn nearest_code(a: f32, count: u8, value: impl Fn(u8) -> f32) -> u8 {
    let a = a as f64;
    let mut best = 0u8;
    for c in 1..count {
        let (db, dc) = ((value(best) as f64 - a).abs(), (value(c) as f64 - a).abs());
        if dc < db || (dc == db && c % 2 == 0) {
            best = c;
        }
    }
    best
}

/// f32 to E2M1: nearest, ties to even, saturating to ±6 (`cvt.rn.satfinite.e2m1x2.f32`).
/// The sign is kept (a negative value that rounds to 0 gives −0, code 8); NaN (which finite
/// rows and scales never produce) gives 7, whatever its sign bit.
pub fn f32_to_e2m1(x: f32) -> u8 {
    if x.is_nan() {
        return 7;
    }
    let sign = if x.is_sign_negative() { 8 } else { 0 };
    let a = x.abs();
    if a >= 6.0 {
        return 7 | sign;
    }
    nearest_code(a, 8, |c| E2M1_VALUES[c as usize]) | sign
}

/// f32 to E4M3: nearest, ties to even, saturating to ±448 (`cvt.rn.satfinite.e4m3x2.f32`);
/// NaN gives 0x7F with its sign bit.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return 0x7F | sign;
    }
    if a >= 448.0 {
        return 0x7E | sign;
    }
    nearest_code(a, 0x7F, e4m3_to_f32) | sign
}

/// Elements per NVFP4 block.
pub const NVFP4_BLOCK: usize = 16;

/// The global scale NCCL EP's contract asks of the caller for one expert-output row:
/// 2688 / amax(row) (2688 = 448 · 6), or 0 when the row is all zeros.
pub fn nvfp4_global_scale(row: &[u16]) -> f32 {
    let amax = row.iter().map(|&b| bf16_to_f32(b).abs()).fold(0f32, f32::max);
    if amax == 0.0 { 0.0 } else { 2688.0 / amax }
}

/// Bytes of one NVFP4 message of H elements: align16(H/2 + H/16 + 4).
pub fn nvfp4_slot_bytes(hidden: usize) -> usize {
    (hidden / 2 + hidden / NVFP4_BLOCK + 4).next_multiple_of(16)
}

/// The reciprocal the sender uses: NCCL EP's kernel (and our kernel, to stay bit-compatible with
/// it and with its `ep_bench --validate`) uses `rcp.approx.ftz.f32`, which is within 1 ulp of
/// 1/x but not always the nearest float, and which no CPU computes. The reference therefore
/// takes the reciprocal as a function: [`nvfp4_rcp_rn`] here, the GPU's own results in the GPU
/// tests (tests/gpu/harness.rs, `GpuRcp`).
pub type Nvfp4Rcp<'a> = &'a dyn Fn(f32) -> f32;

/// 1/x rounded to nearest, with the flush-to-zero of `rcp.approx.ftz.f32`: a subnormal x counts
/// as ±0 (giving ±inf) and a subnormal result becomes ±0.
pub fn nvfp4_rcp_rn(x: f32) -> f32 {
    let x = if x.is_subnormal() { 0.0f32.copysign(x) } else { x };
    let r = 1.0 / x;
    if r.is_subnormal() { 0.0f32.copysign(r) } else { r }
}

/// The wire message of one bf16 row with global scale `g` (padding zero), with
/// [`nvfp4_rcp_rn`] as the sender's reciprocal ([`nvfp4_encode_row_with`]).
pub fn nvfp4_encode_row(row: &[u16], g: f32) -> Vec<u8> {
    nvfp4_encode_row_with(row, g, &nvfp4_rcp_rn)
}

/// The wire message of one bf16 row with global scale `g` (padding zero):
/// bytes [0, H/2): E2M1 pairs, element 2i in the low nibble of byte i;
/// [H/2, H/2 + H/16): E4M3 block scales, block j = elements 16j..16j+16;
/// then `g` as 4 little-endian bytes.
/// Per block, in f32 with one rounding per operation (rcp: the sender's reciprocal):
///   m = max |x|; s = g · (m · rcp(6)); sc = E4M3(s); rg = rcp(g) (0 if g = 0);
///   d = value(sc) · rg; inv = rcp(d) (0 if value(sc) = 0); code_i = E2M1(x_i · inv).
pub fn nvfp4_encode_row_with(row: &[u16], g: f32, rcp: Nvfp4Rcp<'_>) -> Vec<u8> {
    let h = row.len();
    assert!(h.is_multiple_of(NVFP4_BLOCK), "H is whole blocks");
    let mut out = vec![0u8; nvfp4_slot_bytes(h)];
    let rcp6 = rcp(6.0);
    let rg = if g != 0.0 { rcp(g) } else { 0.0 };
    for (j, blk) in row.chunks(NVFP4_BLOCK).enumerate() {
        let m = blk.iter().map(|&b| bf16_to_f32(b).abs()).fold(0f32, f32::max);
        let sc = f32_to_e4m3(g * (m * rcp6));
        let inv = if e4m3_to_f32(sc) != 0.0 {
            rcp(e4m3_to_f32(sc) * rg)
        } else {
            0.0
        };
        out[h / 2 + j] = sc;
        for (i, &b) in blk.iter().enumerate() {
            let code = f32_to_e2m1(bf16_to_f32(b) * inv);
            let e = j * NVFP4_BLOCK + i;
            out[e / 2] |= code << (4 * (e % 2));
        }
    }
    out[h / 2 + h / NVFP4_BLOCK..][..4].copy_from_slice(&g.to_le_bytes());
    out
}

/// Every value the sender passes to its reciprocal for rows with global scales `gs`, given
/// rcp(g) for each (`rg`): 6, each g, and value(sc) · rg for every E4M3 code sc > 0 (a superset
/// of what the rows need, which the GPU tests evaluate on the GPU in two rounds).
pub fn nvfp4_rcp_inputs(gs: &[f32], rg: impl Fn(f32) -> f32) -> Vec<f32> {
    let mut v = vec![6.0f32];
    for &g in gs.iter().filter(|&&g| g != 0.0) {
        v.push(g);
        let r = rg(g);
        v.extend((1..0x7Fu8).map(|c| e4m3_to_f32(c) * r));
    }
    v
}

/// Adds `w` times the row a message decodes to into `acc` [H]: rg = 1/g (1 when that is
/// infinite, i.e. g = 0), f = (value(sc) · rg) · w per block, acc_i = fma(value(code_i), f,
/// acc_i).
pub fn nvfp4_decode_add(msg: &[u8], w: f32, acc: &mut [f32]) {
    let h = acc.len();
    let g = f32::from_le_bytes(msg[h / 2 + h / NVFP4_BLOCK..][..4].try_into().unwrap());
    let rg = match 1.0 / g {
        r if r.is_infinite() => 1.0,
        r => r,
    };
    for (e, a) in acc.iter_mut().enumerate() {
        let f = (e4m3_to_f32(msg[h / 2 + e / NVFP4_BLOCK]) * rg) * w;
        let v = e2m1_to_f32(msg[e / 2] >> (4 * (e % 2)));
        *a = v.mul_add(f, *a);
    }
}

/// NVFP4 combine for every rank: as [`ll_combine_ref`] (bf16 only), except that each expert
/// output is encoded with its row's global scale (`scales[d]`, one per row of rank d's
/// `x`/`y`: [L·N·B] or [N·B]) and decoded on the receiving side, where the contributions are
/// accumulated in f32 in the same order with the decode's fused multiply-add. The sender's
/// reciprocal is [`nvfp4_rcp_rn`].
pub fn ll_combine_nvfp4_ref(world: &LlWorld, input: LlCombineIn<'_>, scales: &[Vec<f32>]) -> Vec<Vec<u16>> {
    ll_combine_nvfp4_ref_masked(world, input, scales, &LlLinks::all(world.shape.nranks), &nvfp4_rcp_rn)
}

/// [`ll_combine_nvfp4_ref`] with rank masks (contributions of unlinked pairs left out) and the
/// sender's reciprocal `rcp`.
pub fn ll_combine_nvfp4_ref_masked(
    world: &LlWorld,
    input: LlCombineIn<'_>,
    scales: &[Vec<f32>],
    links: &LlLinks,
    rcp: Nvfp4Rcp<'_>,
) -> Vec<Vec<u16>> {
    let route = LlRoute::with_links(world, links.clone());
    let sh = world.shape;
    let (n, b, h) = (sh.nranks, sh.max_tokens, sh.hidden);
    let l = sh.local_experts();
    assert_eq!(scales.len(), n, "one scale tensor per rank");
    let rows_per_rank = match input {
        LlCombineIn::ExpertMajor { .. } => l * n * b,
        LlCombineIn::RankMajor { .. } => n * b,
    };
    for (d, sd) in scales.iter().enumerate() {
        assert_eq!(sd.len(), rows_per_rank, "rank {d}: scales shape");
    }
    // (rank d, row index) -> the message it sends.
    let msg = |src: &[u16], d: usize, row: usize| nvfp4_encode_row_with(&src[row * h..][..h], scales[d][row], rcp);
    (0..n)
        .map(|s| {
            let t_s = world.ranks[s].num_tokens;
            let mut out = vec![0u16; t_s * h];
            let mut acc = vec![0f32; h];
            for t in 0..t_s {
                acc.fill(0.0);
                for (d, row, w) in input.contributions(world, &route, s, t) {
                    nvfp4_decode_add(&msg(input.rows(d), d, row), w, &mut acc);
                }
                for (o, &a) in out[t * h..(t + 1) * h].iter_mut().zip(&acc) {
                    *o = f32_to_bf16_rne(a);
                }
            }
            out
        })
        .collect()
}
