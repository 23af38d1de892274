//! Argument rules of low-latency dispatch and combine (no GPU): shapes, data types and which
//! optional tensors each layout takes. The result is the call's shape, ready for a launch.
//!
//! Token types (no quantisation recipe), as NCCL EP: bf16, fp16 or fp32, and one type per call:
//! dispatch moves rows unconverted, so `outputs->tokens` has the type of `inputs->tokens` (NCCL
//! EP returns `ncclInvalidArgument` otherwise); combine reduces in fp32 and rounds once to the
//! type of its expert outputs, which `outputs->tokens` must share (NCCL EP asserts it). A row is
//! H · element size bytes: a multiple of 16 and at most `max_token_bytes`.
//!
//! Dispatch quantisation recipes: crate::ll_recipes, checked first.

use crate::config::GroupParams;
use crate::enums::{DType, Layout, PassDir, dtype};
use crate::error::Result;
use crate::handle_rules::HandleParams;
use crate::op_args::{CombineArgs, DispatchArgs};
use crate::tensor::{Dim, TensorView};

use crate::ll_recipes::dispatch_recipe;
pub use crate::ll_recipes::{DS_FP8_BLOCK, FWD_SCALE_DTYPES, FWD_TOKEN_DTYPES, LlRecipe};

/// Token types of LOW_LATENCY dispatch and combine (`quant_recipe` NONE), as NCCL EP.
pub const LL_TOKEN_DTYPES: [DType; 3] = [dtype::BFLOAT16, dtype::FLOAT16, dtype::FLOAT32];

/// A checked low-latency call: what the kernels need besides pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlCall {
    /// T: tokens of this rank in this call.
    pub tokens: usize,
    /// Bytes of one token row as it travels and lands in `outputs->tokens`: H · element size
    /// (DS_FP8E3M4: H, one E4M3 byte per bf16 input element).
    pub row_bytes: usize,
    /// The type of `inputs->tokens` (one of [`LL_TOKEN_DTYPES`] without a recipe, of
    /// [`FWD_TOKEN_DTYPES`] with QUANT_FWD, bf16 with DS_FP8E3M4).
    pub dtype: DType,
    pub send_only: bool,
    /// Dispatch recipe (None for combine).
    pub recipe: LlRecipe,
    /// Scale bytes per token, carried after the token bytes (0 without a recipe).
    pub scale_bytes: usize,
    /// DS_FP8E3M4: power-of-two scales (`config->round_scales`).
    pub round_scales: bool,
}

impl LlCall {
    /// Bytes of one message payload: token bytes then scale bytes (at most `max_token_bytes`).
    pub fn payload_bytes(&self) -> usize {
        self.row_bytes + self.scale_bytes
    }
}

pub(crate) fn ensure_none(t: &Option<TensorView>, name: &str, why: &str) -> Result<()> {
    crate::ensure_arg!(t.is_none(), "{name} must be NULL {why}");
    Ok(())
}

fn common(pass: PassDir, quant: i32, what: &str) -> Result<()> {
    crate::ensure_usage!(
        pass == PassDir::Forward,
        "{what}: LOW_LATENCY supports only NCCL_EP_FWD_PASS (use HIGH_THROUGHPUT for the backward pass)"
    );
    match quant {
        0 => {}
        1 | 2 => {
            return Err(crate::invalid_usage!(
                "{what}: quantisation recipe {quant} is not supported by this library yet (use NONE)"
            ));
        }
        q => return Err(crate::invalid_arg!("{what}: config->quant_recipe {q} is not a recipe")),
    }
    Ok(())
}

/// Checks a token matrix [T, H] of one of the LL token types; returns its row bytes.
fn row_bytes(p: &GroupParams, t: &TensorView, name: &str, rows: usize) -> Result<usize> {
    t.expect(name, &[Dim::Eq(rows), Dim::Any], &LL_TOKEN_DTYPES)?;
    let h = t.dim(1);
    let rb = h * t.elem_bytes()?;
    crate::ensure_arg!(
        rb > 0 && rb.is_multiple_of(16),
        "{name}: a row of {h} {} values ({rb} bytes) is not a multiple of 16 bytes",
        t.type_name()
    );
    crate::ensure_arg!(
        rb <= p.max_token_bytes as usize,
        "{name}: a row of {h} {} values ({rb} bytes) exceeds config->max_token_bytes ({})",
        t.type_name(),
        p.max_token_bytes
    );
    Ok(rb)
}

/// The call's other token tensor must have the type of `first` (LL converts no type).
pub(crate) fn same_dtype(t: &TensorView, name: &str, first: &TensorView, first_name: &str, why: &str) -> Result<()> {
    crate::ensure_arg!(
        t.raw_dtype() == first.raw_dtype(),
        "{name} is {} but {first_name} is {}: {why}, so both must have one type",
        t.type_name(),
        first.type_name()
    );
    Ok(())
}

/// Sizes one call works with: N, B, L, K, this call's T, and H (elements and row bytes).
struct CallShape {
    n: usize,
    b: usize,
    l: usize,
    k: usize,
    t: usize,
    rb: usize,
    h_elems: usize,
}

/// The checks dispatch and combine share; `rows` is the call's [T, H] token tensor.
fn call_shape(
    p: &GroupParams,
    h: &HandleParams,
    topk: &TensorView,
    (pass, quant, what): (PassDir, i32, &str),
    rows: (&TensorView, &str),
    in_scales: &Option<TensorView>,
) -> Result<CallShape> {
    common(pass, quant, what)?;
    let t = topk.dim(0);
    let rb = row_bytes(p, rows.0, rows.1, t)?;
    ensure_none(in_scales, "inputs->scales", "without a quantisation recipe")?;
    Ok(CallShape {
        n: p.nranks as usize,
        b: p.max_tokens as usize,
        l: p.local_experts as usize,
        k: h.num_topk as usize,
        t,
        rb,
        h_elems: rows.0.dim(1),
    })
}

/// `topk` is the handle's routing tensor [T, K]. The recipe comes first (NCCL EP checks it
/// before the pass direction).
pub fn check_dispatch(p: &GroupParams, h: &HandleParams, topk: &TensorView, a: &DispatchArgs) -> Result<LlCall> {
    let r = dispatch_recipe(p, h, a)?;
    common(a.pass, 0, "ncclEpDispatch")?;
    let (n, b, l, k) = (
        p.nranks as usize,
        p.max_tokens as usize,
        p.local_experts as usize,
        h.num_topk as usize,
    );
    let t = topk.dim(0);
    let (rb, dt) = match r.recipe {
        LlRecipe::None => {
            let rb = row_bytes(p, &a.tokens, "inputs->tokens", t)?;
            let why = "LOW_LATENCY dispatch moves token rows unconverted";
            same_dtype(&a.out_tokens, "outputs->tokens", &a.tokens, "inputs->tokens", why)?;
            (rb, a.tokens.dtype()?)
        }
        LlRecipe::Forward => {
            a.tokens
                .expect("inputs->tokens", &[Dim::Eq(t), Dim::Any], &FWD_TOKEN_DTYPES)?;
            (r.row_bytes, a.tokens.dtype()?)
        }
        // The bf16 input row itself must fit too (NCCL EP asserts 2H <= max_token_bytes).
        LlRecipe::DsFp8 => {
            row_bytes(p, &a.tokens, "inputs->tokens", t)?;
            (r.row_bytes, dtype::BFLOAT16)
        }
    };
    let (dt_out, h_elems) = (r.out_dtype, r.out_width);
    match h.layout {
        Layout::ExpertMajor => {
            a.out_tokens.expect(
                "outputs->tokens",
                &[Dim::Eq(l), Dim::Eq(n * b), Dim::Eq(h_elems)],
                &[dt_out],
            )?;
            ensure_none(&a.out_weights, "outputs->topk_weights", "for EXPERT_MAJOR")?;
            ensure_none(&a.out_topk_idx, "outputs->topk_idx", "for EXPERT_MAJOR")?;
            ensure_none(
                &a.src_rank_counters,
                "layout_info->src_rank_counters",
                "for EXPERT_MAJOR",
            )?;
            if let Some(w) = &a.in_weights {
                w.expect("inputs->topk_weights", &[Dim::Eq(t), Dim::Eq(k)], &[dtype::FLOAT32])?;
            }
            let c = a.expert_counters.as_ref().ok_or_else(|| {
                crate::invalid_arg!("EXPERT_MAJOR dispatch needs layout_info->expert_counters [{l}] int32")
            })?;
            c.expect("layout_info->expert_counters", &[Dim::AtLeast(l)], &[dtype::INT32])?;
        }
        Layout::RankMajor => {
            a.out_tokens.expect(
                "outputs->tokens",
                &[Dim::Eq(n), Dim::Eq(b), Dim::Eq(h_elems)],
                &[dt_out],
            )?;
            let w = a.in_weights.as_ref().ok_or_else(|| {
                crate::invalid_arg!("RANK_MAJOR dispatch needs inputs->topk_weights [{t}, {k}] float32")
            })?;
            w.expect("inputs->topk_weights", &[Dim::Eq(t), Dim::Eq(k)], &[dtype::FLOAT32])?;
            let idx = a.out_topk_idx.as_ref().ok_or_else(|| {
                crate::invalid_arg!("RANK_MAJOR dispatch needs outputs->topk_idx [{n}, {b}, {k}] int32")
            })?;
            idx.expect(
                "outputs->topk_idx",
                &[Dim::Eq(n), Dim::Eq(b), Dim::Eq(k)],
                &[dtype::INT32],
            )?;
            if let Some(ow) = &a.out_weights {
                ow.expect(
                    "outputs->topk_weights",
                    &[Dim::Eq(n), Dim::Eq(b), Dim::Eq(k)],
                    &[dtype::FLOAT32],
                )?;
            }
            if let Some(c) = &a.src_rank_counters {
                c.expect("layout_info->src_rank_counters", &[Dim::AtLeast(n)], &[dtype::INT32])?;
            }
            ensure_none(&a.expert_counters, "layout_info->expert_counters", "for RANK_MAJOR")?;
        }
        Layout::Flat => return Err(crate::invalid_usage!("FLAT is not a LOW_LATENCY layout")),
    }
    Ok(LlCall {
        tokens: t,
        row_bytes: rb,
        dtype: dt,
        send_only: a.send_only,
        recipe: r.recipe,
        scale_bytes: r.scale_bytes,
        round_scales: r.recipe == LlRecipe::DsFp8 && a.round_scales,
    })
}

/// `topk` is the handle's routing tensor [T, K]. The expert outputs `inputs->tokens` set the
/// type (checked first, as NCCL EP does); the combined rows `outputs->tokens` [T, H] share it.
/// `quant_recipe` NVFP4 has its own rules ([`check_combine_nvfp4`]).
pub fn check_combine(p: &GroupParams, h: &HandleParams, topk: &TensorView, a: &CombineArgs) -> Result<LlCall> {
    if a.quant == COMB_QUANT_NVFP4 {
        return check_combine_nvfp4(p, h, topk, a);
    }
    let dt = DType::from_raw(a.tokens.raw_dtype())
        .filter(|d| LL_TOKEN_DTYPES.contains(d))
        .ok_or_else(|| {
            crate::invalid_arg!(
                "inputs->tokens must be ncclBfloat16, ncclFloat16 or ncclFloat32 (no quantisation recipe), got {}",
                a.tokens.type_name()
            )
        })?;
    let why = "LOW_LATENCY combine rounds its fp32 sums to the type of the expert outputs";
    same_dtype(&a.out_tokens, "outputs->tokens", &a.tokens, "inputs->tokens", why)?;
    let CallShape {
        n,
        b,
        l,
        k,
        t,
        rb,
        h_elems,
    } = call_shape(
        p,
        h,
        topk,
        (a.pass, a.quant, "ncclEpCombine"),
        (&a.out_tokens, "outputs->tokens"),
        &a.in_scales,
    )?;
    match h.layout {
        Layout::ExpertMajor => {
            a.tokens
                .expect("inputs->tokens", &[Dim::Eq(l), Dim::Eq(n * b), Dim::Eq(h_elems)], &[dt])?;
            let w = a.out_weights.as_ref().ok_or_else(|| {
                crate::invalid_arg!(
                    "EXPERT_MAJOR combine needs outputs->topk_weights [{t}, {k}] float32 (the routing weights)"
                )
            })?;
            w.expect("outputs->topk_weights", &[Dim::Eq(t), Dim::Eq(k)], &[dtype::FLOAT32])?;
        }
        Layout::RankMajor => {
            a.tokens
                .expect("inputs->tokens", &[Dim::Eq(n), Dim::Eq(b), Dim::Eq(h_elems)], &[dt])?;
        }
        Layout::Flat => return Err(crate::invalid_usage!("FLAT is not a LOW_LATENCY layout")),
    }
    Ok(LlCall {
        tokens: t,
        row_bytes: rb,
        dtype: dt,
        send_only: a.send_only,
        recipe: LlRecipe::None,
        scale_bytes: 0,
        round_scales: false,
    })
}

// ---------------------------------------------------------------------------------------------
// NVFP4 combine (docs/LL.md, "NVFP4 combine")

/// `ncclEpCombQuant_t` NCCL_EP_COMB_QUANT_NVFP4.
pub const COMB_QUANT_NVFP4: i32 = 1;

/// Elements per NVFP4 block (one E4M3 block scale each).
pub const NVFP4_BLOCK: usize = 16;

/// H must be a multiple of this: NCCL EP's sender quantises whole iterations of a warp
/// (32 lanes × 8 bf16 × 2 or 4 unrolls), so it rejects any H that is not a multiple of 512.
pub const NVFP4_HIDDEN_MULTIPLE: usize = 512;

/// Bytes of one NVFP4 combine message for H elements: H/2 bytes of E2M1 pairs, H/16 E4M3 block
/// scales, the f32 global scale, rounded up to 16 (NCCL EP's `nvfp4_slot_bytes`).
pub fn nvfp4_slot_bytes(hidden: usize) -> usize {
    (hidden / 2 + hidden / NVFP4_BLOCK + 4).next_multiple_of(16)
}

/// LOW_LATENCY combine with `quant_recipe` NVFP4, NCCL EP's checks in its order: bf16 expert
/// outputs and bf16 result (`ncclInvalidArgument` otherwise), `inputs->scales` fp32 3-D (one
/// global scale per expert-output row: [L, N·B, 1] expert-major, [N, B, 1] rank-major), H a
/// multiple of 512; then the checks every LL combine has. NCCL EP also requires an FP4 GPU
/// (sm_100 and later; `ncclInvalidUsage` on Hopper); we do not: the kernels convert in software
/// where the GPU has no FP4 instructions. The message (`nvfp4_slot_bytes`) is smaller than the
/// bf16 row the buffer is sized for, so the buffer does not change.
pub fn check_combine_nvfp4(p: &GroupParams, h: &HandleParams, topk: &TensorView, a: &CombineArgs) -> Result<LlCall> {
    let why = "NCCL_EP_COMB_QUANT_NVFP4 combines ncclBfloat16 expert outputs into ncclBfloat16 rows";
    for (t, name) in [(&a.tokens, "inputs->tokens"), (&a.out_tokens, "outputs->tokens")] {
        crate::ensure_arg!(t.is(dtype::BFLOAT16), "{name} is {}: {why}", t.type_name());
    }
    let scales = a.in_scales.as_ref().ok_or_else(|| {
        crate::invalid_arg!(
            "NCCL_EP_COMB_QUANT_NVFP4 needs inputs->scales: float32 [rows, 1], one global scale \
             (2688 / amax of the row, or 0) per expert-output row"
        )
    })?;
    crate::ensure_arg!(
        scales.is(dtype::FLOAT32) && scales.ndim() == 3,
        "inputs->scales for NCCL_EP_COMB_QUANT_NVFP4 must be a 3-D float32 tensor, got {} with {} dims",
        scales.type_name(),
        scales.ndim()
    );
    // The rest as for NONE (pass direction, shapes, weights), on the same tensors; the recipe
    // is done with here, so the shared checks see none.
    let plain = CombineArgs {
        quant: 0,
        in_scales: None,
        ..a.clone()
    };
    let call = check_combine(p, h, topk, &plain)?;
    let hidden = a.out_tokens.dim(1);
    let (n, b, l) = (p.nranks as usize, p.max_tokens as usize, p.local_experts as usize);
    let rows = match h.layout {
        Layout::ExpertMajor => [l, n * b, 1],
        _ => [n, b, 1],
    };
    crate::ensure_arg!(
        hidden.is_multiple_of(NVFP4_HIDDEN_MULTIPLE),
        "NCCL_EP_COMB_QUANT_NVFP4 needs H a multiple of {NVFP4_HIDDEN_MULTIPLE} (whole send iterations), got {hidden}"
    );
    scales.expect(
        "inputs->scales (NCCL_EP_COMB_QUANT_NVFP4 global scales)",
        &rows.map(Dim::Eq),
        &[dtype::FLOAT32],
    )?;
    debug_assert!(nvfp4_slot_bytes(hidden) <= call.row_bytes);
    Ok(call)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::enums::{Algorithm, ExpertIdKind};
    use crate::handle_rules::{check_handle, tests_support::params};

    pub(crate) fn tv(s: &[usize], dt: impl Into<i32>) -> TensorView {
        TensorView::new(dt.into(), s, 0x100).unwrap()
    }

    /// An expert-major bf16 dispatch of T tokens, H = 7168, no recipe (the group of `params`).
    pub(crate) fn em_args(t: usize) -> DispatchArgs {
        DispatchArgs {
            tokens: tv(&[t, 7168], dtype::BFLOAT16),
            in_weights: None,
            in_scales: None,
            out_tokens: tv(&[32, 1024, 7168], dtype::BFLOAT16),
            out_weights: None,
            out_scales: None,
            out_topk_idx: None,
            expert_counters: Some(tv(&[32], dtype::INT32)),
            src_rank_counters: None,
            expert_offsets: None,
            recv_total_counter: None,
            has_layout_info: true,
            recv_kind: ExpertIdKind::Local,
            send_only: false,
            round_scales: false,
            pass: PassDir::Forward,
            quant: 0,
        }
    }

    #[test]
    fn expert_major_dispatch_rules() {
        let p = params(Algorithm::LowLatency);
        let h = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        let topk = tv(&[100, 8], dtype::INT64);
        let c = check_dispatch(&p, &h, &topk, &em_args(100)).unwrap();
        assert_eq!((c.tokens, c.row_bytes), (100, 14336));
        let mut a = em_args(99);
        assert_eq!(check_dispatch(&p, &h, &topk, &a).unwrap_err().code(), 4);
        a = em_args(100);
        a.expert_counters = None;
        assert!(
            check_dispatch(&p, &h, &topk, &a)
                .unwrap_err()
                .msg
                .contains("expert_counters")
        );
        a = em_args(100);
        a.pass = PassDir::Backward;
        assert_eq!(check_dispatch(&p, &h, &topk, &a).unwrap_err().code(), 5);
        a = em_args(100);
        a.out_tokens = tv(&[32, 1024, 4096], dtype::BFLOAT16);
        assert_eq!(check_dispatch(&p, &h, &topk, &a).unwrap_err().code(), 4);
        a = em_args(100);
        a.tokens = tv(&[100, 7168], dtype::FLOAT32);
        assert_eq!(check_dispatch(&p, &h, &topk, &a).unwrap_err().code(), 4);
        a = em_args(100);
        a.quant = 9;
        assert_eq!(check_dispatch(&p, &h, &topk, &a).unwrap_err().code(), 4);
    }

    #[test]
    fn rank_major_dispatch_and_combine_rules() {
        let p = params(Algorithm::LowLatency);
        let h = check_handle(&p, Some(Layout::RankMajor), 8, 0).unwrap();
        let topk = tv(&[0, 8], dtype::INT64);
        let mut a = em_args(0);
        a.out_tokens = tv(&[8, 128, 7168], dtype::BFLOAT16);
        a.expert_counters = None;
        assert!(
            check_dispatch(&p, &h, &topk, &a)
                .unwrap_err()
                .msg
                .contains("inputs->topk_weights")
        );
        a.in_weights = Some(tv(&[0, 8], dtype::FLOAT32));
        assert!(
            check_dispatch(&p, &h, &topk, &a)
                .unwrap_err()
                .msg
                .contains("outputs->topk_idx")
        );
        a.out_topk_idx = Some(tv(&[8, 128, 8], dtype::INT32));
        assert_eq!(check_dispatch(&p, &h, &topk, &a).unwrap().tokens, 0);
        let c = CombineArgs {
            tokens: tv(&[8, 128, 7168], dtype::BFLOAT16),
            in_weights: None,
            in_scales: None,
            out_tokens: tv(&[0, 7168], dtype::BFLOAT16),
            out_weights: None,
            send_only: true,
            pass: PassDir::Forward,
            quant: 0,
        };
        assert!(check_combine(&p, &h, &topk, &c).unwrap().send_only);
        let he = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        assert!(check_combine(&p, &he, &topk, &c).is_err());
    }

    fn combine_args(x: TensorView, out: TensorView) -> CombineArgs {
        CombineArgs {
            tokens: x,
            in_weights: None,
            in_scales: None,
            out_weights: Some(tv(&[out.dim(0), 8], dtype::FLOAT32)),
            out_tokens: out,
            send_only: false,
            pass: PassDir::Forward,
            quant: 0,
        }
    }

    /// bf16, fp16 and fp32 rows in both directions; a row is H · element size bytes.
    #[test]
    fn token_types_of_both_directions() {
        let mut p = params(Algorithm::LowLatency);
        p.max_token_bytes = 4 * 7168;
        let h = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        let topk = tv(&[100, 8], dtype::INT64);
        for (dt, eb) in [(dtype::BFLOAT16, 2), (dtype::FLOAT16, 2), (dtype::FLOAT32, 4)] {
            let mut a = em_args(100);
            a.tokens = tv(&[100, 7168], dt);
            a.out_tokens = tv(&[32, 1024, 7168], dt);
            let c = check_dispatch(&p, &h, &topk, &a).unwrap();
            assert_eq!((c.tokens, c.row_bytes, c.dtype), (100, 7168 * eb, dt));
            let x = tv(&[32, 1024, 7168], dt);
            let c = check_combine(&p, &h, &topk, &combine_args(x, tv(&[100, 7168], dt))).unwrap();
            assert_eq!((c.tokens, c.row_bytes, c.dtype), (100, 7168 * eb, dt));
        }
        // Rank-major takes the same types.
        let hr = check_handle(&p, Some(Layout::RankMajor), 8, 0).unwrap();
        let x = tv(&[8, 128, 7168], dtype::FLOAT16);
        let mut c = combine_args(x, tv(&[100, 7168], dtype::FLOAT16));
        c.out_weights = None;
        assert_eq!(check_combine(&p, &hr, &topk, &c).unwrap().row_bytes, 14336);
    }

    /// The 16-byte row rule and max_token_bytes count bytes, not elements.
    #[test]
    fn row_bytes_follow_the_element_size() {
        let mut p = params(Algorithm::LowLatency);
        p.max_token_bytes = 32;
        let h = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        let topk = tv(&[3, 8], dtype::INT32);
        let run = |p: &GroupParams, dt: DType, hidden: usize| {
            let mut a = em_args(3);
            a.tokens = tv(&[3, hidden], dt);
            a.out_tokens = tv(&[32, 1024, hidden], dt);
            check_dispatch(p, &h, &topk, &a)
        };
        assert_eq!(run(&p, dtype::FLOAT32, 4).unwrap().row_bytes, 16);
        assert_eq!(run(&p, dtype::FLOAT32, 8).unwrap().row_bytes, 32);
        assert_eq!(run(&p, dtype::FLOAT16, 8).unwrap().row_bytes, 16);
        assert_eq!(run(&p, dtype::BFLOAT16, 16).unwrap().row_bytes, 32);
        // 6 fp32 values are 24 bytes, 12 fp16 values too.
        for (dt, hidden) in [(dtype::FLOAT32, 6), (dtype::FLOAT16, 12), (dtype::BFLOAT16, 4)] {
            let e = run(&p, dt, hidden).unwrap_err();
            assert_eq!(e.code(), 4);
            assert!(
                e.msg.contains("inputs->tokens") && e.msg.contains("multiple of 16"),
                "{}",
                e.msg
            );
            assert!(e.msg.contains(dt.name()), "{}", e.msg);
        }
        // 12 fp32 values (48 bytes) pass the 16-byte rule but not max_token_bytes = 32, which
        // 24 bf16 values (48 bytes) fail too, and 16 bf16 values (32 bytes) fit.
        let e = run(&p, dtype::FLOAT32, 12).unwrap_err();
        assert!(
            e.msg.contains("48 bytes") && e.msg.contains("max_token_bytes (32)"),
            "{}",
            e.msg
        );
        assert!(run(&p, dtype::BFLOAT16, 24).is_err());
        p.max_token_bytes = 48;
        assert_eq!(run(&p, dtype::FLOAT32, 12).unwrap().row_bytes, 48);
    }

    /// Other types (no recipe) are rejected naming the tensor; in/out types must agree (NCCL
    /// EP: ncclInvalidArgument for dispatch, an assertion for combine).
    #[test]
    fn other_and_mismatched_token_types() {
        let mut p = params(Algorithm::LowLatency);
        p.max_token_bytes = 4 * 7168;
        let h = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        let topk = tv(&[100, 8], dtype::INT64);
        for dt in [
            dtype::INT8,
            dtype::UINT8,
            dtype::FLOAT8E4M3,
            dtype::FLOAT8E5M2,
            dtype::FLOAT64,
            dtype::INT32,
        ] {
            let mut a = em_args(100);
            a.tokens = tv(&[100, 7168], dt);
            a.out_tokens = tv(&[32, 1024, 7168], dt);
            let e = check_dispatch(&p, &h, &topk, &a).unwrap_err();
            assert_eq!(e.code(), 4);
            assert!(
                e.msg.contains("inputs->tokens") && e.msg.contains(dt.name()),
                "{}",
                e.msg
            );
            assert!(e.msg.contains("ncclFloat16"), "names what is accepted: {}", e.msg);
            let x = tv(&[32, 1024, 7168], dt);
            let e = check_combine(&p, &h, &topk, &combine_args(x, tv(&[100, 7168], dt))).unwrap_err();
            assert_eq!(e.code(), 4);
            assert!(
                e.msg.contains("inputs->tokens") && e.msg.contains(dt.name()),
                "{}",
                e.msg
            );
        }
        let mut a = em_args(100);
        a.tokens = tv(&[100, 7168], dtype::FLOAT16);
        let e = check_dispatch(&p, &h, &topk, &a).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(
            e.msg
                .contains("outputs->tokens is ncclBfloat16 but inputs->tokens is ncclFloat16"),
            "{}",
            e.msg
        );
        let x = tv(&[32, 1024, 7168], dtype::FLOAT32);
        let e = check_combine(&p, &h, &topk, &combine_args(x, tv(&[100, 7168], dtype::BFLOAT16))).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(
            e.msg
                .contains("outputs->tokens is ncclBfloat16 but inputs->tokens is ncclFloat32"),
            "{}",
            e.msg
        );
        // A valid type on the output does not excuse an invalid input.
        let x = tv(&[32, 1024, 7168], dtype::INT8);
        let e = check_combine(&p, &h, &topk, &combine_args(x, tv(&[100, 7168], dtype::BFLOAT16))).unwrap_err();
        assert!(e.msg.contains("inputs->tokens must be"), "{}", e.msg);
    }

    fn nvfp4_args(layout: Layout, t: usize, hidden: usize) -> CombineArgs {
        let (x, sc) = match layout {
            Layout::ExpertMajor => (vec![32, 1024, hidden], vec![32, 1024, 1]),
            _ => (vec![8, 128, hidden], vec![8, 128, 1]),
        };
        let mut a = combine_args(tv(&x, dtype::BFLOAT16), tv(&[t, hidden], dtype::BFLOAT16));
        if layout == Layout::RankMajor {
            a.out_weights = None;
        }
        a.quant = COMB_QUANT_NVFP4;
        a.in_scales = Some(tv(&sc, dtype::FLOAT32));
        a
    }

    /// NVFP4 combine: NCCL EP's checks (bf16 in and out, fp32 3-D scales of one value per
    /// expert-output row, H a multiple of 512), and none about the GPU's architecture.
    #[test]
    fn nvfp4_combine_rules() {
        let p = params(Algorithm::LowLatency);
        let topk = tv(&[100, 8], dtype::INT64);
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            let h = check_handle(&p, Some(layout), 8, 0).unwrap();
            for hidden in [512, 1024, 2560, 7168] {
                let c = check_combine(&p, &h, &topk, &nvfp4_args(layout, 100, hidden)).unwrap();
                assert_eq!((c.tokens, c.row_bytes, c.dtype), (100, 2 * hidden, dtype::BFLOAT16));
                assert!(nvfp4_slot_bytes(hidden) <= c.row_bytes);
            }
            // H not a multiple of 512 (but a valid bf16 row otherwise).
            for hidden in [256, 768, 6912] {
                let e = check_combine(&p, &h, &topk, &nvfp4_args(layout, 100, hidden)).unwrap_err();
                assert_eq!(e.code(), 4, "{layout:?} H={hidden}");
                assert!(e.msg.contains("multiple of 512"), "{}", e.msg);
            }
            // Other token types, in or out.
            for dt in [dtype::FLOAT16, dtype::FLOAT32, dtype::FLOAT8E4M3] {
                let mut a = nvfp4_args(layout, 100, 7168);
                a.tokens = tv(a.tokens.sizes(), dt);
                let e = check_combine(&p, &h, &topk, &a).unwrap_err();
                assert_eq!(e.code(), 4);
                assert!(
                    e.msg.contains("inputs->tokens") && e.msg.contains("ncclBfloat16"),
                    "{}",
                    e.msg
                );
                let mut a = nvfp4_args(layout, 100, 7168);
                a.out_tokens = tv(&[100, 7168], dt);
                let e = check_combine(&p, &h, &topk, &a).unwrap_err();
                assert!(e.msg.contains("outputs->tokens"), "{}", e.msg);
            }
            // Scales: missing, wrong type, wrong rank, wrong shape.
            let mut a = nvfp4_args(layout, 100, 7168);
            a.in_scales = None;
            let e = check_combine(&p, &h, &topk, &a).unwrap_err();
            assert_eq!(e.code(), 4);
            assert!(e.msg.contains("inputs->scales"), "{}", e.msg);
            let sc = nvfp4_args(layout, 100, 7168).in_scales.unwrap();
            let bad = [
                tv(sc.sizes(), dtype::BFLOAT16),
                tv(&[sc.dim(0), sc.dim(1)], dtype::FLOAT32),
                tv(&[sc.dim(0), sc.dim(1), 2], dtype::FLOAT32),
                tv(&[sc.dim(0) + 1, sc.dim(1), 1], dtype::FLOAT32),
                tv(&[sc.dim(0), sc.dim(1) - 1, 1], dtype::FLOAT32),
            ];
            for s in bad {
                let mut a = nvfp4_args(layout, 100, 7168);
                a.in_scales = Some(s);
                let e = check_combine(&p, &h, &topk, &a).unwrap_err();
                assert_eq!(e.code(), 4, "{:?}", s.sizes());
                assert!(e.msg.contains("inputs->scales"), "{}", e.msg);
            }
            // The other layout's scale shape.
            let mut a = nvfp4_args(layout, 100, 7168);
            let other = if layout == Layout::ExpertMajor {
                Layout::RankMajor
            } else {
                Layout::ExpertMajor
            };
            a.in_scales = nvfp4_args(other, 100, 7168).in_scales;
            assert_eq!(check_combine(&p, &h, &topk, &a).unwrap_err().code(), 4);
            // The rules of every combine still hold: backward pass, the [T, H] output.
            let mut a = nvfp4_args(layout, 100, 7168);
            a.pass = PassDir::Backward;
            assert_eq!(check_combine(&p, &h, &topk, &a).unwrap_err().code(), 5);
            let a = nvfp4_args(layout, 99, 7168);
            assert_eq!(check_combine(&p, &h, &topk, &a).unwrap_err().code(), 4);
            // NONE still refuses scales.
            let mut a = nvfp4_args(layout, 100, 7168);
            a.quant = 0;
            assert!(
                check_combine(&p, &h, &topk, &a)
                    .unwrap_err()
                    .msg
                    .contains("inputs->scales")
            );
        }
        // EXPERT_MAJOR still needs the weights.
        let h = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        let mut a = nvfp4_args(Layout::ExpertMajor, 100, 7168);
        a.out_weights = None;
        assert!(
            check_combine(&p, &h, &topk, &a)
                .unwrap_err()
                .msg
                .contains("topk_weights")
        );
    }

    /// The message fits in a bf16 row for every accepted H (so the buffer needs nothing more),
    /// and has NCCL EP's size.
    #[test]
    fn nvfp4_slot_fits_the_combine_message() {
        assert_eq!(nvfp4_slot_bytes(7168), (3584 + 448 + 4usize).next_multiple_of(16));
        assert_eq!(nvfp4_slot_bytes(7168), 4048);
        assert_eq!(nvfp4_slot_bytes(512), 304);
        for hidden in (512..=65536).step_by(512) {
            assert!(nvfp4_slot_bytes(hidden) <= 2 * hidden);
            assert!(nvfp4_slot_bytes(hidden).is_multiple_of(16));
        }
    }
}
