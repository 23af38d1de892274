//! Dispatch quantisation recipes of LOW_LATENCY (docs/LL.md, "Quantisation recipes"), checked
//! as NCCL EP v2's `validateDispatchRecipe` checks them, in its order and with its codes (all
//! `ncclInvalidArgument`; the pass direction is checked after them, by ll_rules):
//! `NCCL_EP_DISP_QUANT_FWD` moves the caller's quantised rows and their scales as raw bytes;
//! `NCCL_EP_DISP_QUANT_DS_FP8E3M4` quantises bf16 rows to E4M3 with one fp32 scale per 128
//! elements. Both carry the scales in the message payload after the token bytes, so token bytes
//! plus scale bytes must fit `max_token_bytes` and the buffer does not change.

use crate::config::GroupParams;
use crate::enums::{DType, Layout, dtype};
use crate::error::Result;
use crate::handle_rules::HandleParams;
use crate::ll_rules::{ensure_none, same_dtype};
use crate::op_args::DispatchArgs;
use crate::tensor::{Dim, TensorView};

/// Token types `NCCL_EP_DISP_QUANT_FWD` moves (raw bytes; `ncclFloat4x2` rows are H/2 bytes).
pub const FWD_TOKEN_DTYPES: [DType; 6] = [
    dtype::FLOAT32,
    dtype::FLOAT16,
    dtype::BFLOAT16,
    dtype::FLOAT8E4M3,
    dtype::FLOAT8E5M2,
    dtype::FLOAT4X2,
];

/// Scale types `NCCL_EP_DISP_QUANT_FWD` moves (raw bytes; uint8 for UE8M0 block scales).
pub const FWD_SCALE_DTYPES: [DType; 6] = [
    dtype::FLOAT32,
    dtype::FLOAT16,
    dtype::BFLOAT16,
    dtype::FLOAT8E4M3,
    dtype::FLOAT8E5M2,
    dtype::UINT8,
];

/// Elements per fp32 scale of `NCCL_EP_DISP_QUANT_DS_FP8E3M4`.
pub const DS_FP8_BLOCK: usize = 128;

/// The dispatch quantisation recipe of an LL call (`config->quant_recipe`; the kernels'
/// `LlParams::quant` carries the same numbers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LlRecipe {
    /// Rows move unconverted, no scales (and every combine).
    #[default]
    None = 0,
    /// `NCCL_EP_DISP_QUANT_FWD`: the caller's token bytes, then its scale bytes.
    Forward = 1,
    /// `NCCL_EP_DISP_QUANT_DS_FP8E3M4`: bf16 in, E4M3 bytes then fp32 scales out.
    DsFp8 = 2,
}

/// What a dispatch recipe sets: the recipe, the type and width of `outputs->tokens`, the bytes
/// of a travelling token row and of its scales.
pub(crate) struct RecipeShape {
    pub recipe: LlRecipe,
    pub out_dtype: DType,
    pub out_width: usize,
    pub row_bytes: usize,
    pub scale_bytes: usize,
}

/// Rows and slots of an LL output for the handle's layout: EM [L, N·B], RM [N, B].
fn out_rows(p: &GroupParams, h: &HandleParams) -> Result<(usize, usize)> {
    let (n, b, l) = (p.nranks as usize, p.max_tokens as usize, p.local_experts as usize);
    match h.layout {
        Layout::ExpertMajor => Ok((l, n * b)),
        Layout::RankMajor => Ok((n, b)),
        Layout::Flat => Err(crate::invalid_usage!("FLAT is not a LOW_LATENCY layout")),
    }
}

/// The 16-byte storage QUANT_FWD asks of every token and scale tensor, in both modes (NCCL EP
/// moves their rows as 16-byte words): `data`, and `win_offset` when the tensor is window-backed
/// (`ncclInvalidArgument`). An empty tensor may have no data.
pub fn aligned16(t: &TensorView, name: &str) -> Result<()> {
    crate::ensure_arg!(
        t.data.is_multiple_of(16),
        "{name}: data {:#x} is not 16-byte aligned (NCCL_EP_DISP_QUANT_FWD moves rows in 16-byte words)",
        t.data
    );
    crate::ensure_arg!(
        t.window.is_none_or(|w| w.offset.is_multiple_of(16)),
        "{name}: win_offset {} is not a multiple of 16 (NCCL_EP_DISP_QUANT_FWD moves rows in 16-byte words)",
        t.window.map_or(0, |w| w.offset)
    );
    Ok(())
}

/// `config->quant_recipe` of a dispatch, checked in NCCL EP v2's order (before the pass
/// direction, all `ncclInvalidArgument`).
pub(crate) fn dispatch_recipe(p: &GroupParams, h: &HandleParams, a: &DispatchArgs) -> Result<RecipeShape> {
    const FWD: &str = "with NCCL_EP_DISP_QUANT_FWD";
    const DS: &str = "with NCCL_EP_DISP_QUANT_DS_FP8E3M4";
    let hb = p.max_token_bytes as usize;
    match a.quant {
        0 => {
            // The token checks follow in check_dispatch (row_bytes, same_dtype).
            ensure_none(&a.in_scales, "inputs->scales", "without a quantisation recipe")?;
            ensure_none(&a.out_scales, "outputs->scales", "without a quantisation recipe")?;
            let w = a.tokens.dim(1);
            Ok(RecipeShape {
                recipe: LlRecipe::None,
                out_dtype: a.tokens.dtype().unwrap_or(dtype::BFLOAT16),
                out_width: w,
                row_bytes: 0,
                scale_bytes: 0,
            })
        }
        1 => {
            crate::ensure_arg!(
                !a.round_scales,
                "config->round_scales must be 0 {FWD}: the caller's scales travel unchanged"
            );
            let x = &a.tokens;
            let dt = DType::from_raw(x.raw_dtype())
                .filter(|d| FWD_TOKEN_DTYPES.contains(d))
                .ok_or_else(|| {
                    crate::invalid_arg!(
                        "inputs->tokens {FWD} must be ncclFloat32, ncclFloat16, ncclBfloat16, ncclFloat8e4m3, \
                         ncclFloat8e5m2 or ncclFloat4x2, got {}",
                        x.type_name()
                    )
                })?;
            crate::ensure_arg!(
                x.ndim() == 2,
                "inputs->tokens must be 2-D [tokens, hidden], got {}-D {:?}",
                x.ndim(),
                x.sizes()
            );
            let tb = x.dim(1) * dt.elem_bytes();
            crate::ensure_arg!(
                tb > 0 && tb.is_multiple_of(16),
                "inputs->tokens {FWD}: a row of {} {} values ({tb} bytes) must be a non-zero multiple of 16 bytes",
                x.dim(1),
                dt.name()
            );
            let si = a.in_scales.as_ref().ok_or_else(|| {
                crate::invalid_arg!("inputs->scales is required {FWD} (2-D [tokens, scales per token])")
            })?;
            let so = a.out_scales.as_ref().ok_or_else(|| {
                crate::invalid_arg!("outputs->scales is required {FWD} (3-D, the layout's rows by scales per token)")
            })?;
            aligned16(x, "inputs->tokens")?;
            aligned16(si, "inputs->scales")?;
            aligned16(&a.out_tokens, "outputs->tokens")?;
            aligned16(so, "outputs->scales")?;
            crate::ensure_arg!(
                si.ndim() == 2,
                "inputs->scales {FWD} must be 2-D [tokens, scales per token], got {}-D {:?}",
                si.ndim(),
                si.sizes()
            );
            let sdt = DType::from_raw(si.raw_dtype())
                .filter(|d| FWD_SCALE_DTYPES.contains(d))
                .ok_or_else(|| {
                    crate::invalid_arg!(
                        "inputs->scales {FWD} must be ncclFloat32, ncclFloat16, ncclBfloat16, ncclFloat8e4m3, \
                         ncclFloat8e5m2 or ncclUint8, got {}",
                        si.type_name()
                    )
                })?;
            crate::ensure_arg!(
                si.dim(0) == x.dim(0),
                "inputs->scales {FWD}: dimension 0 ({}) must equal the token count of inputs->tokens ({})",
                si.dim(0),
                x.dim(0)
            );
            crate::ensure_arg!(
                si.dim(1) > 0,
                "inputs->scales {FWD}: dimension 1 (scales per token) must be non-zero"
            );
            let sb = si.dim(1) * sdt.elem_bytes();
            crate::ensure_arg!(
                sb.is_multiple_of(16),
                "inputs->scales {FWD}: {} {} scales per token ({sb} bytes) must be a multiple of 16 bytes",
                si.dim(1),
                sdt.name()
            );
            crate::ensure_arg!(
                tb + sb <= hb,
                "{FWD}: token bytes ({tb}) plus scale bytes ({sb}) per token exceed config->max_token_bytes ({hb}); \
                 one message carries both"
            );
            let (rows, slots) = out_rows(p, h)?;
            same_dtype(
                &a.out_tokens,
                "outputs->tokens",
                x,
                "inputs->tokens",
                "NCCL_EP_DISP_QUANT_FWD moves token bytes unconverted",
            )?;
            a.out_tokens.expect(
                "outputs->tokens",
                &[Dim::Eq(rows), Dim::Eq(slots), Dim::Eq(x.dim(1))],
                &[dt],
            )?;
            same_dtype(
                so,
                "outputs->scales",
                si,
                "inputs->scales",
                "NCCL_EP_DISP_QUANT_FWD moves scale bytes unconverted",
            )?;
            so.expect(
                "outputs->scales",
                &[Dim::Eq(rows), Dim::Eq(slots), Dim::Eq(si.dim(1))],
                &[sdt],
            )?;
            Ok(RecipeShape {
                recipe: LlRecipe::Forward,
                out_dtype: dt,
                out_width: x.dim(1),
                row_bytes: tb,
                scale_bytes: sb,
            })
        }
        2 => {
            let x = &a.tokens;
            crate::ensure_arg!(
                x.is(dtype::BFLOAT16),
                "inputs->tokens {DS} must be ncclBfloat16 (the library quantises them), got {}",
                x.type_name()
            );
            crate::ensure_arg!(
                a.out_tokens.is(dtype::FLOAT8E4M3),
                "outputs->tokens {DS} must be ncclFloat8e4m3 (one byte per element), got {}",
                a.out_tokens.type_name()
            );
            let hid = x.dim(1);
            crate::ensure_arg!(
                x.ndim() == 2 && hid.is_multiple_of(4 * DS_FP8_BLOCK),
                "inputs->tokens {DS} must be 2-D with a hidden size divisible by 512, got {:?}",
                x.sizes()
            );
            ensure_none(&a.in_scales, "inputs->scales", DS)?;
            let so = a
                .out_scales
                .as_ref()
                .ok_or_else(|| crate::invalid_arg!("outputs->scales is required {DS} (fp32, one per 128 elements)"))?;
            let (rows, slots) = out_rows(p, h)?;
            let ns = hid / DS_FP8_BLOCK;
            so.expect(
                "outputs->scales",
                &[Dim::Eq(rows), Dim::Eq(slots), Dim::Eq(ns)],
                &[dtype::FLOAT32],
            )?;
            crate::ensure_arg!(
                hid + 4 * ns <= hb,
                "{DS}: token bytes ({hid}) plus scale bytes ({}) per token exceed config->max_token_bytes ({hb}); \
                 one message carries both",
                4 * ns
            );
            Ok(RecipeShape {
                recipe: LlRecipe::DsFp8,
                out_dtype: dtype::FLOAT8E4M3,
                out_width: hid,
                row_bytes: hid,
                scale_bytes: 4 * ns,
            })
        }
        q => Err(crate::invalid_arg!(
            "ncclEpDispatch: config->quant_recipe {q} is not a recipe"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enums::{Algorithm, PassDir};
    use crate::handle_rules::{check_handle, tests_support::params};
    use crate::ll_rules::tests::{em_args, tv};
    use crate::ll_rules::{LlCall, check_dispatch};

    // -----------------------------------------------------------------------------------------
    // Quantisation recipes (NCCL EP v2's validateDispatchRecipe; docs/LL.md)

    /// An FWD dispatch of T tokens: `tt` tokens of `tw` elements, `st` scales `sw` per token.
    fn fwd_args(layout: Layout, t: usize, (tt, tw): (DType, usize), (st, sw): (DType, usize)) -> DispatchArgs {
        let (r, c) = if layout == Layout::ExpertMajor {
            (32, 1024)
        } else {
            (8, 128)
        };
        let mut a = em_args(t);
        a.quant = 1;
        a.tokens = tv(&[t, tw], tt);
        a.out_tokens = tv(&[r, c, tw], tt);
        a.in_scales = Some(tv(&[t, sw], st));
        a.out_scales = Some(tv(&[r, c, sw], st));
        if layout == Layout::RankMajor {
            a.expert_counters = None;
            a.in_weights = Some(tv(&[t, 8], dtype::FLOAT32));
            a.out_topk_idx = Some(tv(&[8, 128, 8], dtype::INT32));
        }
        a
    }

    fn ds_args(layout: Layout, t: usize, hidden: usize) -> DispatchArgs {
        let mut a = fwd_args(
            layout,
            t,
            (dtype::BFLOAT16, hidden),
            (dtype::FLOAT32, hidden / DS_FP8_BLOCK),
        );
        a.quant = 2;
        a.in_scales = None;
        let s = a.out_tokens.sizes().to_vec();
        a.out_tokens = tv(&s, dtype::FLOAT8E4M3);
        a
    }

    fn rejects(p: &GroupParams, h: &HandleParams, a: &DispatchArgs, code: i32, needles: &[&str]) {
        let topk = tv(&[a.tokens.dim(0), 8], dtype::INT64);
        let e = check_dispatch(p, h, &topk, a).unwrap_err();
        assert_eq!(e.code(), code, "{}", e.msg);
        for n in needles {
            assert!(e.msg.contains(n), "{n:?} not in {:?}", e.msg);
        }
    }

    fn accepts(p: &GroupParams, h: &HandleParams, a: &DispatchArgs) -> LlCall {
        let topk = tv(&[a.tokens.dim(0), 8], dtype::INT64);
        check_dispatch(p, h, &topk, a).unwrap_or_else(|e| panic!("{}", e.msg))
    }

    /// Every token type and every scale type QUANT_FWD moves, both layouts; the call carries the
    /// wire row and scale bytes, and the payload fits the slot the buffer already has.
    #[test]
    fn fwd_accepts_every_token_and_scale_type() {
        let p = params(Algorithm::LowLatency);
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            let h = check_handle(&p, Some(layout), 8, 0).unwrap();
            // E4M3 with fp32 per-128 scales; FP4 (H/2 bytes) with UE8M0 per-16 scales; MXFP8.
            for ((tt, tw, tb), (st, sw, sb)) in [
                ((dtype::FLOAT8E4M3, 7168, 7168), (dtype::FLOAT32, 56, 224)),
                ((dtype::FLOAT8E5M2, 7168, 7168), (dtype::FLOAT16, 56, 112)),
                ((dtype::FLOAT4X2, 3584, 3584), (dtype::UINT8, 448, 448)),
                ((dtype::FLOAT8E4M3, 7168, 7168), (dtype::UINT8, 224, 224)),
                ((dtype::BFLOAT16, 4096, 8192), (dtype::BFLOAT16, 8, 16)),
                ((dtype::FLOAT32, 2048, 8192), (dtype::FLOAT8E4M3, 16, 16)),
                ((dtype::FLOAT16, 16, 32), (dtype::FLOAT8E5M2, 32, 32)),
            ] {
                for t in [0, 1, 77, 128] {
                    let c = accepts(&p, &h, &fwd_args(layout, t, (tt, tw), (st, sw)));
                    assert_eq!(
                        (c.tokens, c.row_bytes, c.scale_bytes, c.dtype, c.recipe),
                        (t, tb, sb, tt, LlRecipe::Forward)
                    );
                    assert!(!c.round_scales);
                    assert!(c.payload_bytes() <= p.max_token_bytes as usize);
                }
            }
        }
    }

    /// Each QUANT_FWD rule rejects with ncclInvalidArgument and names the tensor and the rule.
    #[test]
    fn fwd_rules_reject_with_a_message() {
        let mut p = params(Algorithm::LowLatency);
        let h = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        let hr = check_handle(&p, Some(Layout::RankMajor), 8, 0).unwrap();
        let base = || {
            fwd_args(
                Layout::ExpertMajor,
                100,
                (dtype::FLOAT8E4M3, 7168),
                (dtype::FLOAT32, 56),
            )
        };
        let mut a = base();
        a.round_scales = true;
        rejects(&p, &h, &a, 4, &["round_scales must be 0", "QUANT_FWD"]);
        for bad in [dtype::INT8, dtype::UINT8, dtype::INT32, dtype::FLOAT64] {
            let mut a = base();
            a.tokens = tv(&[100, 7168], bad);
            rejects(
                &p,
                &h,
                &a,
                4,
                &["inputs->tokens", "QUANT_FWD", bad.name(), "ncclFloat4x2"],
            );
        }
        a = base();
        a.tokens = tv(&[100, 7160], dtype::FLOAT8E4M3);
        rejects(&p, &h, &a, 4, &["inputs->tokens", "7160 bytes", "multiple of 16"]);
        a = base();
        a.tokens = tv(&[100, 0], dtype::FLOAT8E4M3);
        rejects(&p, &h, &a, 4, &["inputs->tokens", "non-zero multiple of 16"]);
        // FP4 with an odd byte count per row: 3580 bytes is not a multiple of 16.
        a = fwd_args(Layout::ExpertMajor, 100, (dtype::FLOAT4X2, 3580), (dtype::UINT8, 448));
        rejects(&p, &h, &a, 4, &["ncclFloat4x2", "3580 bytes"]);
        a = base();
        a.in_scales = None;
        rejects(&p, &h, &a, 4, &["inputs->scales is required"]);
        a = base();
        a.out_scales = None;
        rejects(&p, &h, &a, 4, &["outputs->scales is required"]);
        for which in 0..4 {
            let mut a = base();
            let t = match which {
                0 => &mut a.tokens,
                1 => a.in_scales.as_mut().unwrap(),
                2 => &mut a.out_tokens,
                _ => a.out_scales.as_mut().unwrap(),
            };
            t.data = 0x1008;
            let name = ["inputs->tokens", "inputs->scales", "outputs->tokens", "outputs->scales"][which];
            rejects(&p, &h, &a, 4, &[name, "16-byte aligned", "0x1008"]);
        }
        a = base();
        a.in_scales = Some(tv(&[100, 56, 1], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["inputs->scales", "must be 2-D"]);
        for bad in [dtype::INT8, dtype::INT32, dtype::FLOAT4X2, dtype::INT64] {
            let mut a = base();
            a.in_scales = Some(tv(&[100, 64], bad));
            rejects(&p, &h, &a, 4, &["inputs->scales", bad.name(), "ncclUint8"]);
        }
        a = base();
        a.in_scales = Some(tv(&[99, 56], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["inputs->scales", "dimension 0 (99)", "token count"]);
        a = base();
        a.in_scales = Some(tv(&[100, 0], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["inputs->scales", "must be non-zero"]);
        a = base();
        a.in_scales = Some(tv(&[100, 55], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["inputs->scales", "220 bytes", "multiple of 16"]);
        // Token bytes + scale bytes against max_token_bytes (exactly full is fine).
        p.max_token_bytes = 7168 + 224;
        assert_eq!(accepts(&p, &h, &base()).payload_bytes(), 7392);
        p.max_token_bytes = 7168 + 223;
        rejects(
            &p,
            &h,
            &base(),
            4,
            &["token bytes (7168)", "scale bytes (224)", "max_token_bytes (7391)"],
        );
        p.max_token_bytes = 14336;
        // Output types and shapes.
        a = base();
        a.out_tokens = tv(&[32, 1024, 7168], dtype::FLOAT8E5M2);
        rejects(
            &p,
            &h,
            &a,
            4,
            &["outputs->tokens is ncclFloat8e5m2 but inputs->tokens is ncclFloat8e4m3"],
        );
        a = base();
        a.out_tokens = tv(&[32, 1024, 3584], dtype::FLOAT8E4M3);
        rejects(&p, &h, &a, 4, &["outputs->tokens must have shape [32, 1024, 7168]"]);
        a = base();
        a.out_scales = Some(tv(&[32, 1024, 56], dtype::UINT8));
        rejects(
            &p,
            &h,
            &a,
            4,
            &["outputs->scales is ncclUint8 but inputs->scales is ncclFloat32"],
        );
        a = base();
        a.out_scales = Some(tv(&[32, 1024, 28], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["outputs->scales must have shape [32, 1024, 56]"]);
        a = base();
        a.out_scales = Some(tv(&[1024, 56], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["outputs->scales must be 3-D"]);
        // Rank-major shapes: [N, B, ..]; an expert-major shape is wrong there.
        a = fwd_args(Layout::RankMajor, 100, (dtype::FLOAT8E4M3, 7168), (dtype::FLOAT32, 56));
        accepts(&p, &hr, &a);
        a.out_scales = Some(tv(&[32, 1024, 56], dtype::FLOAT32));
        rejects(&p, &hr, &a, 4, &["outputs->scales must have shape [8, 128, 56]"]);
        // The pass direction comes after the recipe: a valid FWD call backward is ncclInvalidUsage.
        a = base();
        a.pass = PassDir::Backward;
        rejects(&p, &h, &a, 5, &["NCCL_EP_FWD_PASS"]);
        a.round_scales = true;
        rejects(&p, &h, &a, 4, &["round_scales"]);
    }

    /// DS_FP8E3M4: bf16 in, E4M3 and fp32 per-128 scales out, both layouts; every rule.
    #[test]
    fn ds_fp8_rules() {
        let mut p = params(Algorithm::LowLatency);
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            let h = check_handle(&p, Some(layout), 8, 0).unwrap();
            for round in [false, true] {
                let mut a = ds_args(layout, 100, 7168);
                a.round_scales = round;
                let c = accepts(&p, &h, &a);
                assert_eq!(
                    (c.row_bytes, c.scale_bytes, c.dtype, c.recipe, c.round_scales),
                    (7168, 224, dtype::BFLOAT16, LlRecipe::DsFp8, round)
                );
            }
            assert_eq!(accepts(&p, &h, &ds_args(layout, 0, 512)).payload_bytes(), 512 + 16);
        }
        let h = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        let base = || ds_args(Layout::ExpertMajor, 100, 7168);
        let mut a = base();
        a.tokens = tv(&[100, 7168], dtype::FLOAT16);
        rejects(
            &p,
            &h,
            &a,
            4,
            &["inputs->tokens", "DS_FP8E3M4", "ncclBfloat16", "ncclFloat16"],
        );
        a = base();
        a.out_tokens = tv(&[32, 1024, 7168], dtype::BFLOAT16);
        rejects(
            &p,
            &h,
            &a,
            4,
            &["outputs->tokens", "ncclFloat8e4m3", "got ncclBfloat16"],
        );
        a = ds_args(Layout::ExpertMajor, 100, 7168 - 128);
        rejects(&p, &h, &a, 4, &["inputs->tokens", "divisible by 512", "7040"]);
        a = base();
        a.in_scales = Some(tv(&[100, 56], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["inputs->scales must be NULL", "DS_FP8E3M4"]);
        a = base();
        a.out_scales = None;
        rejects(&p, &h, &a, 4, &["outputs->scales is required", "DS_FP8E3M4"]);
        a = base();
        a.out_scales = Some(tv(&[32, 1024, 56], dtype::FLOAT16));
        rejects(&p, &h, &a, 4, &["outputs->scales", "ncclFloat16", "ncclFloat32"]);
        a = base();
        a.out_scales = Some(tv(&[32, 1024, 224], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["outputs->scales must have shape [32, 1024, 56]"]);
        a = base();
        a.out_scales = Some(tv(&[8, 128, 56], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["outputs->scales must have shape [32, 1024, 56]"]);
        a = base();
        a.out_tokens = tv(&[32, 1024, 3584], dtype::FLOAT8E4M3);
        rejects(&p, &h, &a, 4, &["outputs->tokens must have shape [32, 1024, 7168]"]);
        // H + 4·H/128 <= max_token_bytes, and the bf16 row itself (2H) must fit as well.
        a = ds_args(Layout::ExpertMajor, 100, 1024);
        p.max_token_bytes = 2048;
        accepts(&p, &h, &a);
        p.max_token_bytes = 2047;
        rejects(
            &p,
            &h,
            &a,
            4,
            &["inputs->tokens", "2048 bytes", "max_token_bytes (2047)"],
        );
        p.max_token_bytes = 14336;
        a = ds_args(Layout::ExpertMajor, 100, 7168);
        p.max_token_bytes = 7168 + 223;
        rejects(
            &p,
            &h,
            &a,
            4,
            &["token bytes (7168)", "scale bytes (224)", "max_token_bytes (7391)"],
        );
        // Backward: recipe fine, then ncclInvalidUsage as every LL backward dispatch.
        p.max_token_bytes = 14336;
        a = base();
        a.pass = PassDir::Backward;
        rejects(&p, &h, &a, 5, &["NCCL_EP_FWD_PASS"]);
    }

    /// Without a recipe scales are refused, and an unknown recipe is ncclInvalidArgument.
    #[test]
    fn no_recipe_takes_no_scales() {
        let p = params(Algorithm::LowLatency);
        let h = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        let mut a = em_args(100);
        a.in_scales = Some(tv(&[100, 56], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["inputs->scales must be NULL"]);
        a = em_args(100);
        a.out_scales = Some(tv(&[32, 1024, 56], dtype::FLOAT32));
        rejects(&p, &h, &a, 4, &["outputs->scales must be NULL"]);
        a = em_args(100);
        a.quant = 3;
        rejects(&p, &h, &a, 4, &["quant_recipe 3"]);
        let c = accepts(&p, &h, &em_args(100));
        assert_eq!((c.recipe, c.scale_bytes, c.round_scales), (LlRecipe::None, 0, false));
    }

    /// The buffer and the handle block need nothing per recipe: for every call a recipe accepts,
    /// at the tightest max_token_bytes it accepts, the message payload (token bytes + scale
    /// bytes) fits the slot of the layout `ncclEpxBufferSize` reports (dmsg = header + slot),
    /// and the handle block (`ncclEpHandleMemSize`) depends on N, B and K only.
    #[test]
    fn buffer_and_handle_sizes_cover_every_recipe() {
        use crate::config::ll_slot_bytes;
        use crate::handle_rules::handle_mem_bytes;
        use crate::ll_layout::LlLayout;
        let mut cases: Vec<(Layout, DispatchArgs)> = Vec::new();
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            for (tt, tw, st, sw) in [
                (dtype::FLOAT8E4M3, 7168, dtype::FLOAT32, 56),
                (dtype::FLOAT4X2, 3584, dtype::UINT8, 224),
                (dtype::FLOAT32, 2048, dtype::FLOAT32, 4),
                (dtype::BFLOAT16, 1024, dtype::FLOAT32, 1024),
            ] {
                cases.push((layout, fwd_args(layout, 128, (tt, tw), (st, sw))));
            }
            for hid in [512, 7168] {
                for round in [false, true] {
                    let mut a = ds_args(layout, 128, hid);
                    a.round_scales = round;
                    cases.push((layout, a));
                }
            }
        }
        let mut p = params(Algorithm::LowLatency);
        for (layout, a) in cases {
            let topk = tv(&[128, 8], dtype::INT64);
            // The smallest bound the call passes: payload, or the bf16 row for DS_FP8E3M4.
            p.max_token_bytes = 1 << 20;
            let h = check_handle(&p, Some(layout), 8, 0).unwrap();
            let c = check_dispatch(&p, &h, &topk, &a).unwrap();
            let need = c.payload_bytes().max(if c.recipe == LlRecipe::DsFp8 {
                2 * c.row_bytes
            } else {
                0
            });
            p.max_token_bytes = need as u32;
            let c = check_dispatch(&p, &h, &topk, &a).unwrap_or_else(|e| panic!("{}", e.msg));
            p.max_token_bytes = need as u32 - 1;
            assert!(
                check_dispatch(&p, &h, &topk, &a).is_err(),
                "{need} is the tightest bound"
            );
            for hb in [need, need + 1, need + 15] {
                p.max_token_bytes = hb as u32;
                let lay = LlLayout::new(
                    p.nranks,
                    p.num_experts,
                    p.max_tokens,
                    ll_slot_bytes(p.max_token_bytes),
                    8,
                )
                .unwrap();
                assert!(lay.dmsg_bytes - lay.hdr_bytes >= c.payload_bytes(), "{layout:?} {c:?}");
                assert!(lay.dmsg_bytes.is_multiple_of(16));
                let h = check_handle(&p, Some(layout), 8, 0).unwrap();
                assert_eq!(
                    handle_mem_bytes(&p, &h),
                    crate::ll_layout::handle_mem_bytes(p.nranks, p.max_tokens, 8)
                );
            }
        }
    }
}
