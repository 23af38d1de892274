//! LOW_LATENCY dispatch quantisation recipes on the GPU (docs/LL.md, "Quantisation recipes"):
//! the recipe tensors of one rank, their inputs (the same on every rank for a shared random
//! stream, so multi-process ranks can compute the whole world's reference), the dispatch call
//! and the bit-for-bit check of `outputs->tokens` and `outputs->scales`. Shared by
//! tests/gpu_ll.rs and tests/gpu_multi.rs, which include it after `harness`.
#![allow(dead_code)]

use crate::ep_ok;
use crate::harness::*;
use ep_core::enums::{DType, ExpertIdKind, Layout, dtype};
use ep_reference::ll::*;
use nccl_ep::abi::guard::struct_default;
use nccl_ep::abi::ops::ncclEpDispatch;
use nccl_ep::abi::types::*;

/// Output bytes the dispatch must leave alone are poisoned with this byte first.
pub const POISON_BYTE: u8 = 0xA5;

/// A dispatch recipe of one round.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Recipe {
    /// `NCCL_EP_DISP_QUANT_FWD`: rows of `tok_w` elements of `tok` (`ncclFloat4x2`: H/2 bytes)
    /// and `sc_w` scales of `sc` per token, random bytes, moved unconverted.
    Fwd {
        tok: DType,
        tok_w: usize,
        sc: DType,
        sc_w: usize,
    },
    /// `NCCL_EP_DISP_QUANT_DS_FP8E3M4` of the world's bf16 tokens.
    Ds { round: bool },
}

impl Recipe {
    pub fn quant(&self) -> i32 {
        match self {
            Recipe::Fwd { .. } => 1,
            Recipe::Ds { .. } => 2,
        }
    }
    /// (type, width) of `outputs->tokens` rows and of scale rows, for hidden size `h`.
    pub fn widths(&self, h: usize) -> ((DType, usize), (DType, usize)) {
        match *self {
            Recipe::Fwd { tok, tok_w, sc, sc_w } => ((tok, tok_w), (sc, sc_w)),
            Recipe::Ds { .. } => ((dtype::FLOAT8E4M3, h), (dtype::FLOAT32, h / DS_FP8_BLOCK)),
        }
    }
    /// Token bytes + scale bytes of one message payload.
    pub fn payload_bytes(&self, h: usize) -> usize {
        let ((t, tw), (s, sw)) = self.widths(h);
        tw * t.elem_bytes() + sw * s.elem_bytes()
    }
}

/// The QUANT_FWD recipes the tests run for hidden size `h` (a multiple of 1024): E4M3 with
/// fp32 per-128 scales (DeepSeek's layout, forwarded), MXFP8 (E4M3 + UE8M0 bytes per 32),
/// packed FP4 with UE8M0 per 32 and with E4M3 per 16 (NVFP4's block scales), E5M2 with fp16
/// scales, bf16 with one 16-byte bf16 scale row, fp32 with 4 fp32 scales, and bf16 rows with
/// scales long enough to span two payload segments.
pub fn fwd_recipes(h: usize) -> Vec<Recipe> {
    let f = |tok, tok_w, sc, sc_w| Recipe::Fwd { tok, tok_w, sc, sc_w };
    vec![
        f(dtype::FLOAT8E4M3, h, dtype::FLOAT32, h / 128),
        f(dtype::FLOAT8E4M3, h, dtype::UINT8, h / 32),
        f(dtype::FLOAT4X2, h / 2, dtype::UINT8, h / 32),
        f(dtype::FLOAT4X2, h / 2, dtype::FLOAT8E4M3, h / 16),
        f(dtype::FLOAT8E5M2, h, dtype::FLOAT16, h / 128),
        f(dtype::BFLOAT16, h, dtype::BFLOAT16, 8),
        f(dtype::FLOAT32, h, dtype::FLOAT32, 4),
        f(dtype::BFLOAT16, h / 2, dtype::FLOAT32, h / 2),
    ]
}

/// A group config for hidden size `h` whose `max_token_bytes` fits every recipe above (fp32
/// rows plus scales).
pub fn quant_config(c: &Case) -> ncclEpGroupConfig_t {
    let mut cfg = c.group_config();
    cfg.max_token_bytes = (4 * c.hidden + 512) as u32;
    cfg
}

/// Every rank's recipe inputs as bytes: [T_r, token bytes] and [T_r, scale bytes]. QUANT_FWD:
/// random bytes (NaN patterns and all: nothing may be converted). DS_FP8E3M4: the world's bf16
/// tokens (the scales are the library's).
pub struct QuantInputs {
    pub tokens: Vec<Vec<u8>>,
    pub token_bytes: usize,
    pub scales: Vec<Vec<u8>>,
    pub scale_bytes: usize,
}

fn random_bytes(rng: &mut SplitMix64, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

pub fn quant_inputs(c: &Case, world: &LlWorld, rec: Recipe, rng: &mut SplitMix64) -> QuantInputs {
    match rec {
        Recipe::Fwd { tok, tok_w, sc, sc_w } => {
            let (tb, sb) = (tok_w * tok.elem_bytes(), sc_w * sc.elem_bytes());
            let mut tokens = Vec::new();
            let mut scales = Vec::new();
            for r in &world.ranks {
                tokens.push(random_bytes(rng, r.num_tokens * tb));
                scales.push(random_bytes(rng, r.num_tokens * sb));
            }
            QuantInputs {
                tokens,
                token_bytes: tb,
                scales,
                scale_bytes: sb,
            }
        }
        Recipe::Ds { .. } => QuantInputs {
            tokens: world
                .ranks
                .iter()
                .map(|r| r.tokens.iter().flat_map(|v| v.to_le_bytes()).collect())
                .collect(),
            token_bytes: 2 * c.hidden,
            scales: Vec::new(),
            scale_bytes: 0,
        },
    }
}

/// Every rank's expected `outputs->tokens` and `outputs->scales` bytes.
pub fn quant_ref(c: &Case, world: &LlWorld, rec: Recipe, inp: &QuantInputs, links: &LlLinks) -> Vec<LlQuantOut> {
    match rec {
        Recipe::Fwd { .. } => ll_dispatch_fwd_ref(
            world,
            c.layout,
            links,
            (&inp.tokens, inp.token_bytes),
            (&inp.scales, inp.scale_bytes),
            POISON_BYTE,
        ),
        Recipe::Ds { round } => ll_dispatch_ds_fp8_ref(world, c.layout, links, round, POISON_BYTE),
    }
}

/// The recipe tensors of one rank: QUANT_FWD inputs (DS_FP8E3M4 reads the bf16
/// `RankBufs::tokens`) and both outputs.
pub struct QuantBufs {
    pub tokens: Option<DevTensor>,
    pub scales: Option<DevTensor>,
    pub out: DevTensor,
    pub out_scales: DevTensor,
}

/// Allocates rank `me`'s recipe tensors, uploads its inputs and poisons both outputs.
pub fn load_quant(
    c: &Case,
    device: i32,
    rec: Recipe,
    inp: &QuantInputs,
    me: usize,
    t: usize,
) -> Result<QuantBufs, String> {
    let (n, l, b, h) = (c.nranks, c.local_experts, c.max_tokens, c.hidden);
    let (rows, slots) = match c.layout {
        Layout::ExpertMajor => (l, n * b),
        _ => (n, b),
    };
    let ((tdt, tw), (sdt, sw)) = rec.widths(h);
    let (tokens, scales) = match rec {
        Recipe::Fwd { .. } => {
            let tk = DevTensor::new(device, tdt, &[t, tw])?;
            tk.upload(&inp.tokens[me])?;
            let sc = DevTensor::new(device, sdt, &[t, sw])?;
            sc.upload(&inp.scales[me])?;
            (Some(tk), Some(sc))
        }
        Recipe::Ds { .. } => (None, None),
    };
    let out = DevTensor::new(device, tdt, &[rows, slots, tw])?;
    out.fill(POISON_BYTE)?;
    let out_scales = DevTensor::new(device, sdt, &[rows, slots, sw])?;
    out_scales.fill(POISON_BYTE)?;
    Ok(QuantBufs {
        tokens,
        scales,
        out,
        out_scales,
    })
}

/// Issues rank r's dispatch with the recipe: routing, weights and counters from `b` (as
/// `harness::dispatch`), tokens and scales from `q` (DS_FP8E3M4: tokens from `b`).
pub fn dispatch_quant(
    c: &Case,
    h: ncclEpHandle_t,
    b: &mut RankBufs,
    q: &mut QuantBufs,
    rec: Recipe,
    s: &Stream,
    send_only: bool,
) -> Result<(), String> {
    let mut inp: ncclEpDispatchInputs_t = struct_default();
    let mut out: ncclEpDispatchOutputs_t = struct_default();
    let mut li: ncclEpLayoutInfo_t = struct_default();
    let mut cfg: ncclEpDispatchConfig_t = struct_default();
    cfg.send_only = send_only as u32;
    cfg.quant_recipe = ncclEpDispQuant_t(rec.quant());
    cfg.round_scales = matches!(rec, Recipe::Ds { round: true }) as u32;
    inp.tokens = match q.tokens.as_mut() {
        Some(t) => t.ptr(),
        None => b.tokens.ptr(),
    };
    if let Some(sc) = q.scales.as_mut() {
        inp.scales = sc.ptr();
    }
    out.tokens = q.out.ptr();
    out.scales = q.out_scales.ptr();
    layout_tensors(c, b, &mut inp, &mut out, &mut li);
    // SAFETY: the four structs are live locals and every tensor pointer a descriptor boxed in `b`
    // or `q` with its sizes array, all read during the call; the device buffers they name belong
    // to `b` and `q`, and freeing one (cuMemFree) waits for the device, so they outlive the
    // queued work; `h` is the caller's live handle, `s` a live stream.
    ep_ok!(unsafe { ncclEpDispatch(h, &inp, &out, &li, &cfg, s.raw()) });
    Ok(())
}

/// Rank `who`'s recipe outputs against the reference, bit for bit (poisoned bytes included),
/// then its counters, ids and weights against the plain dispatch reference of the same routing.
#[allow(clippy::too_many_arguments)]
pub fn check_quant(
    who: &str,
    c: &Case,
    world: &LlWorld,
    me: usize,
    b: &RankBufs,
    q: &QuantBufs,
    want: &LlQuantOut,
    links: &LlLinks,
) -> Result<(), String> {
    compare(
        &format!("{who} outputs->tokens bytes"),
        &q.out.download::<u8>()?,
        &want.tokens,
    )?;
    compare(
        &format!("{who} outputs->scales bytes"),
        &q.out_scales.download::<u8>()?,
        &want.scales,
    )?;
    let kind = if c.global_ids {
        ExpertIdKind::Global
    } else {
        ExpertIdKind::Local
    };
    let poison = LlPoison {
        token: POISON_TOKEN,
        weight: POISON_WEIGHT,
    };
    let meta = ll_dispatch_ref_masked(world, c.layout, kind, poison, links);
    check_dispatch_meta(who, b, &meta[me])
}
