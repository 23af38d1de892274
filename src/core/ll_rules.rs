//! Argument rules of low-latency dispatch and combine (no GPU): shapes, data types and which
//! optional tensors each layout takes. The result is the call's shape, ready for a launch.

use crate::abi::enums::{Layout, PassDir, dtype};
use crate::core::config::GroupParams;
use crate::core::error::Result;
use crate::core::handle_rules::HandleParams;
use crate::core::op_args::{CombineArgs, DispatchArgs};
use crate::core::tensor::{Dim, TensorView};

/// A checked low-latency call: what the kernels need besides pointers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LlCall {
    /// T: tokens of this rank in this call.
    pub tokens: usize,
    /// Bytes of one token row (H * 2 for bf16).
    pub row_bytes: usize,
    pub send_only: bool,
}

fn ensure_none(t: &Option<TensorView>, name: &str, why: &str) -> Result<()> {
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

/// Checks a token matrix [T, H] and returns H's byte size.
fn row_bytes(p: &GroupParams, t: &TensorView, name: &str, rows: usize) -> Result<usize> {
    t.expect(name, &[Dim::Eq(rows), Dim::Any], &[dtype::BFLOAT16])?;
    let rb = t.dim(1) * 2;
    crate::ensure_arg!(
        rb > 0 && rb.is_multiple_of(16),
        "{name}: a row of {} bf16 values is not a multiple of 16 bytes",
        t.dim(1)
    );
    crate::ensure_arg!(
        rb <= p.max_token_bytes as usize,
        "{name}: a row of {} bf16 values ({rb} bytes) exceeds config->max_token_bytes ({})",
        t.dim(1),
        p.max_token_bytes
    );
    Ok(rb)
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
        h_elems: rb / 2,
    })
}

/// `topk` is the handle's routing tensor [T, K].
pub fn check_dispatch(p: &GroupParams, h: &HandleParams, topk: &TensorView, a: &DispatchArgs) -> Result<LlCall> {
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
        (a.pass, a.quant, "ncclEpDispatch"),
        (&a.tokens, "inputs->tokens"),
        &a.in_scales,
    )?;
    ensure_none(&a.out_scales, "outputs->scales", "without a quantisation recipe")?;
    match h.layout {
        Layout::ExpertMajor => {
            a.out_tokens.expect(
                "outputs->tokens",
                &[Dim::Eq(l), Dim::Eq(n * b), Dim::Eq(h_elems)],
                &[dtype::BFLOAT16],
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
                &[dtype::BFLOAT16],
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
        send_only: a.send_only,
    })
}

pub fn check_combine(p: &GroupParams, h: &HandleParams, topk: &TensorView, a: &CombineArgs) -> Result<LlCall> {
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
            a.tokens.expect(
                "inputs->tokens",
                &[Dim::Eq(l), Dim::Eq(n * b), Dim::Eq(h_elems)],
                &[dtype::BFLOAT16],
            )?;
            let w = a.out_weights.as_ref().ok_or_else(|| {
                crate::invalid_arg!(
                    "EXPERT_MAJOR combine needs outputs->topk_weights [{t}, {k}] float32 (the routing weights)"
                )
            })?;
            w.expect("outputs->topk_weights", &[Dim::Eq(t), Dim::Eq(k)], &[dtype::FLOAT32])?;
        }
        Layout::RankMajor => {
            a.tokens.expect(
                "inputs->tokens",
                &[Dim::Eq(n), Dim::Eq(b), Dim::Eq(h_elems)],
                &[dtype::BFLOAT16],
            )?;
        }
        Layout::Flat => return Err(crate::invalid_usage!("FLAT is not a LOW_LATENCY layout")),
    }
    Ok(LlCall {
        tokens: t,
        row_bytes: rb,
        send_only: a.send_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::enums::{Algorithm, ExpertIdKind};
    use crate::core::handle_rules::{check_handle, tests_support::params};

    fn tv(s: &[usize], dt: i32) -> TensorView {
        TensorView {
            dtype: dt,
            sizes: s.to_vec(),
            data: 0x100,
        }
    }

    fn em_args(t: usize) -> DispatchArgs {
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
}
