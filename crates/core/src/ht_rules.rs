//! Argument rules of high-throughput dispatch and combine, and of the `layout_info` outputs of
//! `ncclEpCreateHandle`/`ncclEpUpdateHandle` (docs/HT.md; no GPU). The result of a call check is
//! what the launch needs besides pointers.
//!
//! Receive-side row counts: with a fixed budget S the dispatch outputs need at least S rows
//! (checked here). In eager mode (S = 0) the count is only known on the GPU, so the rules return
//! the rows the caller gave ([`HtCall::recv_rows`]) and the runtime compares them with the count
//! when it reads it. Combine's `inputs` need only `count` rows (docs/HT.md), so for combine
//! `recv_rows` is always left to the runtime.

use crate::config::GroupParams;
use crate::enums::{DType, ExpertIdKind, Layout, PassDir, dtype};
use crate::error::{Error, Result};
use crate::handle_rules::HandleParams;
use crate::ll_recipes::{FWD_SCALE_DTYPES, FWD_TOKEN_DTYPES, aligned16};
use crate::op_args::{CombineArgs, DispatchArgs};
use crate::tensor::{Dim, TensorView};

/// Token types of HT dispatch and combine (`quant_recipe` NONE).
pub const HT_TOKEN_DTYPES: [DType; 3] = [dtype::BFLOAT16, dtype::FLOAT16, dtype::FLOAT32];

// QUANT_FWD moves the same raw wire types in both modes (ll_recipes: FWD_TOKEN_DTYPES,
// FWD_SCALE_DTYPES; `ncclFloat4x2` is packed FP4, `ncclUint8` carries UE8M0 scales).

/// The scale rows of a QUANT_FWD dispatch: one row `[S_t]` per token row, moved with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtScales {
    /// S_t: scales per token (any width >= 1 whose bytes are a multiple of 16).
    pub width: usize,
    /// S_t · element size: a multiple of 16; token row bytes + this ≤ `max_token_bytes`.
    pub row_bytes: usize,
    pub dtype: DType,
    /// Device addresses of `inputs->scales` and `outputs->scales`.
    pub input: u64,
    pub output: u64,
}

/// A checked HT dispatch or combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HtCall {
    /// T: rows of this rank's routing (dispatch `inputs.tokens`, combine `outputs.tokens`).
    pub tokens: usize,
    /// H: elements per token row.
    pub hidden: usize,
    /// Bytes of one token row (H · element size): a multiple of 16, at most `max_token_bytes`.
    pub row_bytes: usize,
    /// `ncclBfloat16`, `ncclFloat16` or `ncclFloat32` (inputs and outputs alike); with
    /// QUANT_FWD any of [`FWD_TOKEN_DTYPES`].
    pub dtype: DType,
    pub elem_bytes: usize,
    /// The fewest rows among the receive-side tensors the call was given (dispatch: `outputs`
    /// tokens, and top-k ids and weights where given; combine: `inputs` tokens, and weights in
    /// backward). The runtime must touch no row at or past it: in eager mode it checks the
    /// count against it (`ncclInvalidArgument` when the count is larger), and combine reads
    /// rows `< count` only.
    pub recv_rows: usize,
    /// S = 0: the receive count is known only after the handle update.
    pub eager: bool,
    pub pass: PassDir,
    /// Dispatch: `layout_info->recv_topk_idx_kind` (FLAT forward `outputs.topk_idx`);
    /// combine: LOCAL.
    pub recv_kind: ExpertIdKind,
    /// Dispatch with QUANT_FWD: the scale rows that travel with the token rows. None otherwise.
    pub scales: Option<HtScales>,
}

/// Appends a hint to a shape or type error.
fn hint(mut e: Error, why: &str) -> Error {
    e.msg = format!("{} ({why})", e.msg);
    e
}

fn ensure_none(t: &Option<TensorView>, name: &str, why: &str) -> Result<()> {
    crate::ensure_arg!(t.is_none(), "{name} must be NULL {why}");
    Ok(())
}

/// The two HT layouts; anything else is a handle this module was not meant for.
fn ht_layout(h: &HandleParams, what: &str) -> Result<Layout> {
    match h.layout {
        Layout::Flat | Layout::ExpertMajor => Ok(h.layout),
        l => Err(crate::invalid_usage!(
            "{what}: layout {} is not a HIGH_THROUGHPUT layout (use FLAT or EXPERT_MAJOR)",
            l.name()
        )),
    }
}

/// NONE and QUANT_FWD; DS_FP8E3M4 is LOW_LATENCY-only in NCCL EP too (`ncclInvalidArgument`).
fn dispatch_recipe(quant: i32) -> Result<()> {
    match quant {
        0 | 1 => Ok(()),
        2 => Err(crate::invalid_arg!(
            "ncclEpDispatch: config->quant_recipe NCCL_EP_DISP_QUANT_DS_FP8E3M4 is a LOW_LATENCY recipe; \
             HIGH_THROUGHPUT takes NCCL_EP_DISP_QUANT_NONE"
        )),
        q => Err(crate::invalid_arg!(
            "ncclEpDispatch: config->quant_recipe {q} is not an ncclEpDispQuant_t"
        )),
    }
}

/// NVFP4 is rejected with `ncclInvalidUsage`: NCCL EP returns that code for it on GPUs without
/// FP4 (Hopper), and on FP4 GPUs accepts it in HT and combines unquantised; a caller that asks
/// for a quantised combine should learn that it does not get one.
fn combine_recipe(quant: i32) -> Result<()> {
    match quant {
        0 => Ok(()),
        1 => Err(crate::invalid_usage!(
            "ncclEpCombine: config->quant_recipe NCCL_EP_COMB_QUANT_NVFP4 is a LOW_LATENCY recipe that this library \
             does not support yet; HIGH_THROUGHPUT takes NCCL_EP_COMB_QUANT_NONE (NCCL EP returns ncclInvalidUsage \
             for NVFP4 on GPUs without FP4, and elsewhere combines unquantised)"
        )),
        q => Err(crate::invalid_arg!(
            "ncclEpCombine: config->quant_recipe {q} is not an ncclEpCombQuant_t"
        )),
    }
}

/// A token matrix `[rows, H]` of one of `dtypes`: returns (H, row bytes).
fn token_matrix(p: &GroupParams, t: &TensorView, name: &str, rows: Dim, dtypes: &[DType]) -> Result<(usize, usize)> {
    t.expect(name, &[rows, Dim::Any], dtypes)?;
    let h = t.dim(1);
    let eb = t.elem_bytes()?;
    let rb = h * eb;
    crate::ensure_arg!(h > 0, "{name} has rows of 0 elements (shape {:?})", t.sizes());
    crate::ensure_arg!(
        rb.is_multiple_of(16),
        "{name}: a row of {h} {} values is {rb} bytes, not a multiple of 16",
        t.type_name()
    );
    crate::ensure_arg!(
        rb <= p.max_token_bytes as usize,
        "{name}: a row of {h} {} values ({rb} bytes) exceeds config->max_token_bytes ({})",
        t.type_name(),
        p.max_token_bytes
    );
    Ok((h, rb))
}

/// The QUANT_FWD ("scales forwarded") rules of an HT dispatch, in NCCL EP's order (all
/// `ncclInvalidArgument`; docs/HT.md, "Quantisation recipes"): the caller's raw token rows and a
/// scale row per token, both moved as bytes. The token tensors' remaining rules (rows, output
/// rows ≥ S) are the common ones of [`check_dispatch`].
fn quant_fwd(p: &GroupParams, a: &DispatchArgs) -> Result<HtScales> {
    const R: &str = "with NCCL_EP_DISP_QUANT_FWD";
    crate::ensure_arg!(
        !a.round_scales,
        "config->round_scales must be 0 {R} (the library forwards the caller's scales, it computes none)"
    );
    a.tokens
        .expect("inputs->tokens", &[Dim::Any, Dim::Any], &FWD_TOKEN_DTYPES)
        .map_err(|e| {
            hint(
                e,
                "QUANT_FWD tokens are raw rows; ncclFloat4x2 packs two FP4 values per byte, sizes[1] = H/2",
            )
        })?;
    let tb = a.tokens.dim(1) * a.tokens.elem_bytes()?;
    crate::ensure_arg!(
        tb > 0 && tb.is_multiple_of(16),
        "inputs->tokens: a row of {} {} is {tb} bytes; {R} token rows must be a non-zero multiple of 16 bytes",
        a.tokens.dim(1),
        a.tokens.type_name()
    );
    let ins = a.in_scales.as_ref().ok_or_else(|| {
        crate::invalid_arg!("inputs->scales is NULL: {R} it is required ([T, S_t], one scale row per token)")
    })?;
    let outs = a.out_scales.as_ref().ok_or_else(|| {
        crate::invalid_arg!("outputs->scales is NULL: {R} it is required (2-D, as many rows as outputs->tokens)")
    })?;
    for (t, name) in [
        (&a.tokens, "inputs->tokens"),
        (ins, "inputs->scales"),
        (&a.out_tokens, "outputs->tokens"),
        (outs, "outputs->scales"),
    ] {
        aligned16(t, name)?;
    }
    ins.expect(
        "inputs->scales",
        &[Dim::Eq(a.tokens.dim(0)), Dim::Any],
        &FWD_SCALE_DTYPES,
    )
    .map_err(|e| hint(e, "one row of S_t scales per row of inputs->tokens"))?;
    let sw = ins.dim(1);
    crate::ensure_arg!(
        sw > 0,
        "inputs->scales has rows of 0 scales (shape {:?}); {R} S_t must be at least 1",
        ins.sizes()
    );
    let sdt = ins.dtype()?;
    let sb = sw * sdt.elem_bytes();
    crate::ensure_arg!(
        sb.is_multiple_of(16),
        "inputs->scales: a row of {sw} {} is {sb} bytes; {R} scale rows must be a multiple of 16 bytes",
        sdt.name()
    );
    crate::ensure_arg!(
        tb + sb <= p.max_token_bytes as usize,
        "inputs->tokens and inputs->scales: a token row ({tb} bytes) plus its scales ({sb} bytes) exceed \
         config->max_token_bytes ({}) {R}",
        p.max_token_bytes
    );
    outs.expect("outputs->scales", &[Dim::Any, Dim::Eq(sw)], &[sdt])
        .map_err(|e| hint(e, "2-D, same type and width as inputs->scales"))?;
    crate::ensure_arg!(
        outs.dim(0) == a.out_tokens.dim(0),
        "outputs->scales has {} rows but outputs->tokens has {}: {R} they hold the same received rows",
        outs.dim(0),
        a.out_tokens.dim(0)
    );
    crate::ensure_arg!(
        a.out_tokens.is_windowed() == outs.is_windowed(),
        "outputs->tokens is {} but outputs->scales is {}: HIGH_THROUGHPUT {R} needs both window-backed or both plain",
        if a.out_tokens.is_windowed() {
            "window-backed"
        } else {
            "plain"
        },
        if outs.is_windowed() { "window-backed" } else { "plain" }
    );
    Ok(HtScales {
        width: sw,
        row_bytes: sb,
        dtype: sdt,
        input: ins.data,
        output: outs.data,
    })
}

/// Rows the receive side must hold as far as the host can tell: S, or anything in eager mode.
fn recv_dim(p: &GroupParams) -> Dim {
    match p.max_recv_tokens {
        0 => Dim::Any,
        s => Dim::AtLeast(s as usize),
    }
}

/// HT dispatch. `topk` is the handle's routing tensor `[T, K]`.
pub fn check_dispatch(p: &GroupParams, h: &HandleParams, topk: &TensorView, a: &DispatchArgs) -> Result<HtCall> {
    let layout = ht_layout(h, "ncclEpDispatch")?;
    dispatch_recipe(a.quant)?;
    let scales = if a.quant == crate::ll_recipes::LlRecipe::Forward as i32 {
        Some(quant_fwd(p, a)?)
    } else {
        ensure_none(&a.in_scales, "inputs->scales", "without a quantisation recipe")?;
        ensure_none(&a.out_scales, "outputs->scales", "without a quantisation recipe")?;
        None
    };
    let dtypes: &[DType] = if scales.is_some() {
        &FWD_TOKEN_DTYPES
    } else {
        &HT_TOKEN_DTYPES
    };
    let (t, k) = (topk.dim(0), h.num_topk as usize);
    let (hidden, rb) = token_matrix(p, &a.tokens, "inputs->tokens", Dim::Eq(t), dtypes)?;
    let dt = a.tokens.dtype()?;
    let recv = recv_dim(p);
    a.out_tokens
        .expect("outputs->tokens", &[recv, Dim::Eq(hidden)], &[dt])
        .map_err(|e| match recv {
            Dim::AtLeast(_) => hint(
                e,
                "same type and width as inputs->tokens, max_recv_tokens_per_rank rows or more",
            ),
            _ => hint(e, "same type and width as inputs->tokens"),
        })?;
    let mut recv_rows = a.out_tokens.dim(0);
    if let Some(o) = &a.out_scales
        && scales.is_some()
    {
        // Same rows as outputs->tokens (quant_fwd): S or more, or the count when eager.
        recv_rows = recv_rows.min(o.dim(0));
    }
    match a.pass {
        PassDir::Forward => {
            let w = a.in_weights.as_ref().ok_or_else(|| {
                crate::invalid_arg!("forward ncclEpDispatch needs inputs->topk_weights [{t}, {k}] float32")
            })?;
            w.expect("inputs->topk_weights", &[Dim::Eq(t), Dim::Eq(k)], &[dtype::FLOAT32])?;
            match layout {
                Layout::Flat => {
                    if let Some(idx) = &a.out_topk_idx {
                        idx.expect("outputs->topk_idx", &[recv, Dim::Eq(k)], &[dtype::INT64])?;
                        recv_rows = recv_rows.min(idx.dim(0));
                    }
                    if let Some(ow) = &a.out_weights {
                        ow.expect("outputs->topk_weights", &[recv, Dim::Eq(k)], &[dtype::FLOAT32])?;
                        recv_rows = recv_rows.min(ow.dim(0));
                    }
                }
                _ => {
                    ensure_none(
                        &a.out_topk_idx,
                        "outputs->topk_idx",
                        "for EXPERT_MAJOR (each row belongs to one expert: its zone)",
                    )?;
                    if let Some(ow) = &a.out_weights {
                        ow.expect("outputs->topk_weights", &[recv], &[dtype::FLOAT32])?;
                        recv_rows = recv_rows.min(ow.dim(0));
                    }
                }
            }
        }
        PassDir::Backward => {
            let why = "in the backward pass (it moves tokens only)";
            ensure_none(&a.in_weights, "inputs->topk_weights", why)?;
            ensure_none(&a.out_weights, "outputs->topk_weights", why)?;
            ensure_none(&a.out_topk_idx, "outputs->topk_idx", why)?;
        }
    }
    Ok(HtCall {
        tokens: t,
        hidden,
        row_bytes: rb,
        dtype: dt,
        elem_bytes: a.tokens.elem_bytes()?,
        recv_rows,
        eager: p.max_recv_tokens == 0,
        pass: a.pass,
        recv_kind: a.recv_kind,
        scales,
    })
}

/// HT combine. `topk` is the handle's routing tensor `[T, K]`.
pub fn check_combine(p: &GroupParams, h: &HandleParams, topk: &TensorView, a: &CombineArgs) -> Result<HtCall> {
    let layout = ht_layout(h, "ncclEpCombine")?;
    combine_recipe(a.quant)?;
    ensure_none(&a.in_scales, "inputs->scales", "without a quantisation recipe")?;
    let (t, k) = (topk.dim(0), h.num_topk as usize);
    let (hidden, rb) = token_matrix(p, &a.out_tokens, "outputs->tokens", Dim::Eq(t), &HT_TOKEN_DTYPES)?;
    let dt = a.out_tokens.dtype()?;
    a.tokens
        .expect("inputs->tokens", &[Dim::Any, Dim::Eq(hidden)], &[dt])
        .map_err(|e| hint(e, "the rows this rank received, same type and width as outputs->tokens"))?;
    let mut recv_rows = a.tokens.dim(0);
    match a.pass {
        PassDir::Forward => {
            let why = "in the forward pass (combine applies no weights; the caller pre-weights)";
            ensure_none(&a.in_weights, "inputs->topk_weights", why)?;
            // outputs->topk_weights is ignored, as NCCL EP ignores it here (its ep_bench passes
            // the backward pass's [T, K] tensor to every combine): not checked, not written.
        }
        PassDir::Backward => {
            let w = a.in_weights.as_ref().ok_or_else(|| match layout {
                Layout::Flat => crate::invalid_arg!(
                    "backward ncclEpCombine needs inputs->topk_weights [>= count, {k}] float32 \
                     (per received row, in the layout of forward dispatch's outputs->topk_weights)"
                ),
                _ => crate::invalid_arg!(
                    "backward ncclEpCombine needs inputs->topk_weights [>= count] float32 (one per received row)"
                ),
            })?;
            match layout {
                Layout::Flat => w.expect("inputs->topk_weights", &[Dim::Any, Dim::Eq(k)], &[dtype::FLOAT32])?,
                _ => w.expect("inputs->topk_weights", &[Dim::Any], &[dtype::FLOAT32])?,
            }
            recv_rows = recv_rows.min(w.dim(0));
            let ow = a.out_weights.as_ref().ok_or_else(|| {
                crate::invalid_arg!(
                    "backward ncclEpCombine needs outputs->topk_weights [{t}, {k}] float32 (the weight gradients)"
                )
            })?;
            ow.expect("outputs->topk_weights", &[Dim::Eq(t), Dim::Eq(k)], &[dtype::FLOAT32])?;
        }
    }
    Ok(HtCall {
        tokens: t,
        hidden,
        row_bytes: rb,
        dtype: dt,
        elem_bytes: a.out_tokens.elem_bytes()?,
        recv_rows,
        eager: p.max_recv_tokens == 0,
        pass: a.pass,
        recv_kind: ExpertIdKind::Local,
        scales: None,
    })
}

// ---------------------------------------------------------------------------------------------
// layout_info at handle time

/// The tensors of a `layout_info` passed to `ncclEpCreateHandle`/`ncclEpUpdateHandle`.
#[derive(Clone, Debug, Default)]
pub struct HtLayoutInfoArgs {
    pub expert_counters: Option<TensorView>,
    pub src_rank_counters: Option<TensorView>,
    pub expert_offsets: Option<TensorView>,
    pub recv_total_counter: Option<TensorView>,
}

/// One integer output the update writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterOut {
    pub data: u64,
    /// `ncclInt32` or `ncclInt64`.
    pub dtype: DType,
}

impl CounterOut {
    fn of(t: &TensorView) -> Self {
        Self {
            data: t.data,
            dtype: t.dtype().expect("checked by the rule"),
        }
    }
}

/// What the handle update writes (each None when not asked for). Counters and offsets: the first
/// L entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HtLayoutOutputs {
    pub expert_counters: Option<CounterOut>,
    pub expert_offsets: Option<CounterOut>,
    pub recv_total_counter: Option<CounterOut>,
}

/// The `layout_info` rules of an HT handle (docs/HT.md, "`layout_info` outputs"):
/// FLAT `expert_counters` int32 `[>= L]`; EXPERT_MAJOR `expert_counters` and `expert_offsets`
/// int32 or int64 `[>= L]`; `recv_total_counter` int32 or int64 `[>= 1]`; every EM output and
/// `recv_total_counter` share one type (FLAT's int32 counters stand apart). FLAT's
/// `expert_offsets` and `src_rank_counters` (a LOW_LATENCY RANK_MAJOR output) are ignored, as
/// NCCL EP ignores them: not checked, not written.
pub fn check_layout_info(p: &GroupParams, h: &HandleParams, li: &HtLayoutInfoArgs) -> Result<HtLayoutOutputs> {
    let layout = ht_layout(h, "layout_info")?;
    let l = p.local_experts as usize;
    let ints = [dtype::INT32, dtype::INT64];
    if let Some(t) = &li.recv_total_counter {
        t.expect("layout_info->recv_total_counter", &[Dim::AtLeast(1)], &ints)?;
    }
    let mut shared: Vec<(&str, DType)> = Vec::new();
    match layout {
        Layout::Flat => {
            if let Some(t) = &li.expert_counters {
                t.expect("layout_info->expert_counters", &[Dim::AtLeast(l)], &[dtype::INT32])
                    .map_err(|e| hint(e, "FLAT counters are int32, one per local expert"))?;
            }
        }
        _ => {
            for (name, t) in [
                ("layout_info->expert_counters", &li.expert_counters),
                ("layout_info->expert_offsets", &li.expert_offsets),
            ] {
                if let Some(t) = t {
                    t.expect(name, &[Dim::AtLeast(l)], &ints)?;
                    shared.push((name, t.dtype()?));
                }
            }
        }
    }
    if let Some(t) = &li.recv_total_counter {
        shared.push(("layout_info->recv_total_counter", t.dtype()?));
    }
    if let Some(&(first, dt)) = shared.first()
        && let Some(&(other, odt)) = shared.iter().find(|&&(_, d)| d != dt)
    {
        return Err(crate::invalid_arg!(
            "{other} is {} but {first} is {}: the integer outputs of layout_info share one type",
            odt.name(),
            dt.name()
        ));
    }
    Ok(HtLayoutOutputs {
        expert_counters: li.expert_counters.as_ref().map(CounterOut::of),
        expert_offsets: match layout {
            Layout::Flat => None,
            _ => li.expert_offsets.as_ref().map(CounterOut::of),
        },
        recv_total_counter: li.recv_total_counter.as_ref().map(CounterOut::of),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enums::Algorithm;
    use crate::handle_rules::{check_handle, tests_support::params};

    // The group of tests_support::params(HT): N=8, E=256 (L=32), B=128, S=1024, Hb=14336.
    const S: usize = 1024;
    const I32: DType = dtype::INT32;
    const I64: DType = dtype::INT64;

    /// An edit of a valid call and a piece of the message its rejection must carry.
    type DCase = (fn(&mut DispatchArgs), &'static str);
    type CCase = (fn(&mut CombineArgs), &'static str);

    fn tv(s: &[usize], dt: impl Into<i32>) -> TensorView {
        TensorView::new(dt.into(), s, 0x100).unwrap()
    }

    fn setup(layout: Layout) -> (GroupParams, HandleParams, TensorView) {
        let p = params(Algorithm::HighThroughput);
        let h = check_handle(&p, Some(layout), 8, 0).unwrap();
        (p, h, tv(&[100, 8], dtype::INT64))
    }

    fn flat_fwd() -> DispatchArgs {
        DispatchArgs {
            tokens: tv(&[100, 7168], dtype::BFLOAT16),
            in_weights: Some(tv(&[100, 8], dtype::FLOAT32)),
            in_scales: None,
            out_tokens: tv(&[S, 7168], dtype::BFLOAT16),
            out_weights: Some(tv(&[S, 8], dtype::FLOAT32)),
            out_scales: None,
            out_topk_idx: Some(tv(&[S, 8], dtype::INT64)),
            expert_counters: None,
            src_rank_counters: None,
            expert_offsets: None,
            recv_total_counter: None,
            has_layout_info: false,
            recv_kind: ExpertIdKind::Local,
            send_only: false,
            round_scales: false,
            pass: PassDir::Forward,
            quant: 0,
        }
    }

    fn em_fwd() -> DispatchArgs {
        DispatchArgs {
            out_weights: Some(tv(&[S], dtype::FLOAT32)),
            out_topk_idx: None,
            ..flat_fwd()
        }
    }

    fn bwd(mut a: DispatchArgs) -> DispatchArgs {
        a.pass = PassDir::Backward;
        a.in_weights = None;
        a.out_weights = None;
        a.out_topk_idx = None;
        a
    }

    /// The error of a rejected dispatch: (code, message).
    fn d_err(p: &GroupParams, h: &HandleParams, topk: &TensorView, a: &DispatchArgs) -> (i32, String) {
        let e = check_dispatch(p, h, topk, a).unwrap_err();
        (e.code(), e.msg)
    }

    fn rejects(p: &GroupParams, h: &HandleParams, topk: &TensorView, a: &DispatchArgs, needle: &str) {
        let (code, msg) = d_err(p, h, topk, a);
        assert_eq!(code, 4, "{msg}");
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }

    #[test]
    fn dispatch_accepts_each_layout_direction_and_type() {
        let (p, h, topk) = setup(Layout::Flat);
        let c = check_dispatch(&p, &h, &topk, &flat_fwd()).unwrap();
        assert_eq!(
            c,
            HtCall {
                tokens: 100,
                hidden: 7168,
                row_bytes: 14336,
                dtype: dtype::BFLOAT16,
                elem_bytes: 2,
                recv_rows: S,
                eager: false,
                pass: PassDir::Forward,
                recv_kind: ExpertIdKind::Local,
                scales: None,
            }
        );
        // Optional outputs may go; send_only and dispatch-time counters are ignored.
        let mut a = flat_fwd();
        a.out_weights = None;
        a.out_topk_idx = None;
        a.send_only = true;
        a.expert_counters = Some(tv(&[3], dtype::FLOAT32));
        a.recv_kind = ExpertIdKind::Global;
        assert_eq!(
            check_dispatch(&p, &h, &topk, &a).unwrap().recv_kind,
            ExpertIdKind::Global
        );
        // fp32 at 3584 and fp16 at 7168 fit 14336 bytes.
        a = flat_fwd();
        a.tokens = tv(&[100, 3584], dtype::FLOAT32);
        a.out_tokens = tv(&[S + 5, 3584], dtype::FLOAT32);
        a.out_topk_idx = Some(tv(&[S + 1, 8], dtype::INT64));
        let c = check_dispatch(&p, &h, &topk, &a).unwrap();
        assert_eq!((c.row_bytes, c.elem_bytes, c.recv_rows), (14336, 4, S));
        a = flat_fwd();
        a.tokens = tv(&[100, 8], dtype::FLOAT16);
        a.out_tokens = tv(&[S, 8], dtype::FLOAT16);
        assert_eq!(check_dispatch(&p, &h, &topk, &a).unwrap().row_bytes, 16);
        assert!(check_dispatch(&p, &h, &topk, &bwd(flat_fwd())).is_ok());
        let (p, h, topk) = setup(Layout::ExpertMajor);
        assert!(check_dispatch(&p, &h, &topk, &em_fwd()).is_ok());
        let mut a = em_fwd();
        a.out_weights = None;
        assert!(check_dispatch(&p, &h, &topk, &a).is_ok());
        assert_eq!(
            check_dispatch(&p, &h, &topk, &bwd(em_fwd())).unwrap().pass,
            PassDir::Backward
        );
        // Zero tokens: empty inputs without data.
        let topk0 = tv(&[0, 8], dtype::INT32);
        let mut a = em_fwd();
        a.tokens = TensorView::new(dtype::BFLOAT16.raw(), vec![0, 7168], 0).unwrap();
        a.in_weights = Some(TensorView::new(dtype::FLOAT32.raw(), vec![0, 8], 0).unwrap());
        assert_eq!(check_dispatch(&p, &h, &topk0, &a).unwrap().tokens, 0);
    }

    #[test]
    fn dispatch_rejects_recipes_and_scales() {
        let (p, h, topk) = setup(Layout::Flat);
        for (q, needle) in [(2, "LOW_LATENCY recipe"), (9, "not an ncclEpDispQuant_t")] {
            let mut a = flat_fwd();
            a.quant = q;
            rejects(&p, &h, &topk, &a, needle);
        }
        // QUANT_FWD is implemented (it was ncclInvalidUsage "not supported by this library yet"):
        // without its scale tensors it is the recipe's ncclInvalidArgument, naming the tensor.
        let mut a = flat_fwd();
        a.quant = 1;
        let (code, msg) = d_err(&p, &h, &topk, &a);
        assert_eq!(code, 4, "{msg}");
        assert!(
            msg.contains("inputs->scales is NULL") && msg.contains("QUANT_FWD"),
            "{msg}"
        );
        let mut a = flat_fwd();
        a.in_scales = Some(tv(&[100, 56], dtype::FLOAT32));
        rejects(&p, &h, &topk, &a, "inputs->scales must be NULL");
        let mut a = flat_fwd();
        a.out_scales = Some(tv(&[S, 56], dtype::FLOAT32));
        rejects(&p, &h, &topk, &a, "outputs->scales must be NULL");
    }

    #[test]
    fn dispatch_rejects_bad_token_tensors() {
        let (p, h, topk) = setup(Layout::Flat);
        let cases: &[DCase] = &[
            (
                |a| a.tokens = tv(&[100, 7168], dtype::FLOAT8E4M3),
                "ncclBfloat16 or ncclFloat16 or ncclFloat32",
            ),
            (|a| a.tokens = tv(&[100, 7168], dtype::INT32), "inputs->tokens must be"),
            (
                |a| a.tokens = tv(&[99, 7168], dtype::BFLOAT16),
                "inputs->tokens must have shape [100, *]",
            ),
            (
                |a| a.tokens = tv(&[100, 7168, 1], dtype::BFLOAT16),
                "inputs->tokens must be 2-D",
            ),
            (|a| a.tokens = tv(&[100, 7], dtype::BFLOAT16), "not a multiple of 16"),
            (|a| a.tokens = tv(&[100, 0], dtype::BFLOAT16), "0 elements"),
            (
                |a| a.tokens = tv(&[100, 7168], dtype::FLOAT32),
                "exceeds config->max_token_bytes (14336)",
            ),
            (
                |a| a.out_tokens = tv(&[S, 7168], dtype::FLOAT16),
                "outputs->tokens must be ncclBfloat16",
            ),
            (
                |a| a.out_tokens = tv(&[S, 7160], dtype::BFLOAT16),
                "outputs->tokens must have shape [>=1024, 7168]",
            ),
            (
                |a| a.out_tokens = tv(&[S - 1, 7168], dtype::BFLOAT16),
                "max_recv_tokens_per_rank",
            ),
        ];
        for &(f, needle) in cases {
            let mut a = flat_fwd();
            f(&mut a);
            rejects(&p, &h, &topk, &a, needle);
        }
    }

    #[test]
    fn dispatch_rejects_bad_topk_tensors() {
        let (p, h, topk) = setup(Layout::Flat);
        let cases: &[DCase] = &[
            (|a| a.in_weights = None, "needs inputs->topk_weights [100, 8] float32"),
            (
                |a| a.in_weights = Some(tv(&[100, 7], dtype::FLOAT32)),
                "inputs->topk_weights must have shape [100, 8]",
            ),
            (
                |a| a.in_weights = Some(tv(&[100, 8], dtype::BFLOAT16)),
                "inputs->topk_weights must be ncclFloat32",
            ),
            (
                |a| a.out_topk_idx = Some(tv(&[S, 8], dtype::INT32)),
                "outputs->topk_idx must be ncclInt64",
            ),
            (
                |a| a.out_topk_idx = Some(tv(&[S - 1, 8], dtype::INT64)),
                "outputs->topk_idx must have shape [>=1024, 8]",
            ),
            (
                |a| a.out_topk_idx = Some(tv(&[S, 4], dtype::INT64)),
                "outputs->topk_idx must have shape",
            ),
            (
                |a| a.out_weights = Some(tv(&[S], dtype::FLOAT32)),
                "outputs->topk_weights must be 2-D",
            ),
            (
                |a| a.out_weights = Some(tv(&[S, 8], dtype::FLOAT64)),
                "outputs->topk_weights must be ncclFloat32",
            ),
        ];
        for &(f, needle) in cases {
            let mut a = flat_fwd();
            f(&mut a);
            rejects(&p, &h, &topk, &a, needle);
        }
        let (p, h, topk) = setup(Layout::ExpertMajor);
        let mut a = em_fwd();
        a.out_topk_idx = Some(tv(&[S, 8], dtype::INT64));
        rejects(&p, &h, &topk, &a, "outputs->topk_idx must be NULL for EXPERT_MAJOR");
        let mut a = em_fwd();
        a.out_weights = Some(tv(&[S, 8], dtype::FLOAT32));
        rejects(&p, &h, &topk, &a, "outputs->topk_weights must be 1-D [>=1024]");
        let mut a = em_fwd();
        a.out_weights = Some(tv(&[S - 1], dtype::FLOAT32));
        rejects(&p, &h, &topk, &a, "outputs->topk_weights must have shape [>=1024]");
    }

    #[test]
    fn backward_dispatch_moves_tokens_only() {
        for layout in [Layout::Flat, Layout::ExpertMajor] {
            let (p, h, topk) = setup(layout);
            let base = if layout == Layout::Flat { flat_fwd() } else { em_fwd() };
            let cases: &[DCase] = &[
                (
                    |a| a.in_weights = Some(tv(&[100, 8], dtype::FLOAT32)),
                    "inputs->topk_weights must be NULL",
                ),
                (
                    |a| a.out_weights = Some(tv(&[S, 8], dtype::FLOAT32)),
                    "outputs->topk_weights must be NULL",
                ),
                (
                    |a| a.out_topk_idx = Some(tv(&[S, 8], dtype::INT64)),
                    "outputs->topk_idx must be NULL",
                ),
            ];
            for &(f, needle) in cases {
                let mut a = bwd(base.clone());
                f(&mut a);
                rejects(&p, &h, &topk, &a, needle);
                assert!(d_err(&p, &h, &topk, &a).1.contains("backward"));
            }
        }
    }

    #[test]
    fn eager_dispatch_leaves_rows_to_the_runtime() {
        let (mut p, h, topk) = setup(Layout::Flat);
        p.max_recv_tokens = 0;
        let mut a = flat_fwd();
        a.out_tokens = tv(&[7, 7168], dtype::BFLOAT16);
        a.out_topk_idx = Some(tv(&[5, 8], dtype::INT64));
        a.out_weights = Some(tv(&[6, 8], dtype::FLOAT32));
        let c = check_dispatch(&p, &h, &topk, &a).unwrap();
        assert!(c.eager);
        assert_eq!(c.recv_rows, 5, "the fewest rows of the receive-side tensors");
        // Zero rows: empty tensors without data are fine.
        a.out_tokens = TensorView::new(dtype::BFLOAT16.raw(), vec![0, 7168], 0).unwrap();
        assert_eq!(check_dispatch(&p, &h, &topk, &a).unwrap().recv_rows, 0);
    }

    #[test]
    fn non_ht_layout_is_a_usage_error() {
        let (p, mut h, topk) = setup(Layout::Flat);
        h.layout = Layout::RankMajor;
        assert_eq!(d_err(&p, &h, &topk, &flat_fwd()).0, 5);
        assert_eq!(check_combine(&p, &h, &topk, &fwd_combine()).unwrap_err().code(), 5);
        assert_eq!(
            check_layout_info(&p, &h, &HtLayoutInfoArgs::default())
                .unwrap_err()
                .code(),
            5
        );
    }

    fn fwd_combine() -> CombineArgs {
        CombineArgs {
            tokens: tv(&[S, 7168], dtype::BFLOAT16),
            in_weights: None,
            in_scales: None,
            out_tokens: tv(&[100, 7168], dtype::BFLOAT16),
            out_weights: None,
            send_only: false,
            pass: PassDir::Forward,
            quant: 0,
        }
    }

    fn bwd_combine(layout: Layout) -> CombineArgs {
        CombineArgs {
            in_weights: Some(match layout {
                Layout::Flat => tv(&[S, 8], dtype::FLOAT32),
                _ => tv(&[S], dtype::FLOAT32),
            }),
            out_weights: Some(tv(&[100, 8], dtype::FLOAT32)),
            pass: PassDir::Backward,
            ..fwd_combine()
        }
    }

    fn c_rejects(p: &GroupParams, h: &HandleParams, topk: &TensorView, a: &CombineArgs, needle: &str) {
        let e = check_combine(p, h, topk, a).unwrap_err();
        assert_eq!(e.code(), 4, "{}", e.msg);
        assert!(e.msg.contains(needle), "{needle:?} not in {:?}", e.msg);
    }

    #[test]
    fn combine_accepts_forward_and_backward() {
        for layout in [Layout::Flat, Layout::ExpertMajor] {
            let (p, h, topk) = setup(layout);
            let c = check_combine(&p, &h, &topk, &fwd_combine()).unwrap();
            assert_eq!((c.tokens, c.hidden, c.row_bytes, c.recv_rows), (100, 7168, 14336, S));
            let mut a = bwd_combine(layout);
            a.tokens = tv(&[40, 7168], dtype::BFLOAT16);
            a.send_only = true;
            let c = check_combine(&p, &h, &topk, &a).unwrap();
            assert_eq!(
                (c.recv_rows, c.pass),
                (40, PassDir::Backward),
                "any rows: count is on the GPU"
            );
            let mut a = fwd_combine();
            a.tokens = tv(&[3, 16], dtype::FLOAT32);
            a.out_tokens = tv(&[100, 16], dtype::FLOAT32);
            assert_eq!(check_combine(&p, &h, &topk, &a).unwrap().dtype, dtype::FLOAT32);
        }
    }

    /// Forward combine ignores `outputs->topk_weights`, as NCCL EP does (its ep_bench passes the
    /// backward pass's `[T, K]` tensor to every combine). It was `ncclInvalidArgument`.
    #[test]
    fn forward_combine_ignores_output_weights() {
        for layout in [Layout::Flat, Layout::ExpertMajor] {
            let (p, h, topk) = setup(layout);
            let plain = check_combine(&p, &h, &topk, &fwd_combine()).unwrap();
            for w in [
                tv(&[100, 8], dtype::FLOAT32), // ep_bench's tensor
                tv(&[3], dtype::BFLOAT16),     // any shape and type: never read nor written
                TensorView::new(dtype::FLOAT32.raw(), vec![0, 8], 0).unwrap(),
            ] {
                let mut a = fwd_combine();
                a.out_weights = Some(w);
                assert_eq!(check_combine(&p, &h, &topk, &a).unwrap(), plain);
            }
        }
    }

    #[test]
    fn combine_rejections() {
        let (p, h, topk) = setup(Layout::Flat);
        // NVFP4: NCCL EP's code on GPUs without FP4 (was ncclInvalidArgument).
        let mut a = fwd_combine();
        a.quant = 1;
        let e = check_combine(&p, &h, &topk, &a).unwrap_err();
        assert_eq!(e.code(), 5, "{}", e.msg);
        assert!(e.msg.contains("NVFP4 is a LOW_LATENCY recipe"), "{}", e.msg);
        let cases: &[CCase] = &[
            (|a| a.quant = 4, "not an ncclEpCombQuant_t"),
            (
                |a| a.in_scales = Some(tv(&[S, 1], dtype::FLOAT32)),
                "inputs->scales must be NULL",
            ),
            (
                |a| a.out_tokens = tv(&[101, 7168], dtype::BFLOAT16),
                "outputs->tokens must have shape [100, *]",
            ),
            (
                |a| a.out_tokens = tv(&[100, 7168], dtype::FLOAT8E5M2),
                "outputs->tokens must be ncclBfloat16 or",
            ),
            (
                |a| a.out_tokens = tv(&[100, 4], dtype::BFLOAT16),
                "not a multiple of 16",
            ),
            (
                |a| a.tokens = tv(&[S, 7168], dtype::FLOAT32),
                "inputs->tokens must be ncclBfloat16",
            ),
            (
                |a| a.tokens = tv(&[S, 7176], dtype::BFLOAT16),
                "inputs->tokens must have shape [*, 7168]",
            ),
            (
                |a| a.tokens = tv(&[S * 7168], dtype::BFLOAT16),
                "inputs->tokens must be 2-D",
            ),
            (
                |a| a.in_weights = Some(tv(&[S, 8], dtype::FLOAT32)),
                "inputs->topk_weights must be NULL in the forward",
            ),
        ];
        for &(f, needle) in cases {
            let mut a = fwd_combine();
            f(&mut a);
            c_rejects(&p, &h, &topk, &a, needle);
        }
        let cases: &[CCase] = &[
            (
                |a| a.in_weights = None,
                "needs inputs->topk_weights [>= count, 8] float32",
            ),
            (
                |a| a.in_weights = Some(tv(&[S], dtype::FLOAT32)),
                "inputs->topk_weights must be 2-D",
            ),
            (|a| a.out_weights = None, "needs outputs->topk_weights [100, 8] float32"),
            (
                |a| a.out_weights = Some(tv(&[100, 7], dtype::FLOAT32)),
                "outputs->topk_weights must have shape [100, 8]",
            ),
            (
                |a| a.out_weights = Some(tv(&[100, 8], dtype::BFLOAT16)),
                "outputs->topk_weights must be ncclFloat32",
            ),
        ];
        for &(f, needle) in cases {
            let mut a = bwd_combine(Layout::Flat);
            f(&mut a);
            c_rejects(&p, &h, &topk, &a, needle);
        }
        let (p, h, topk) = setup(Layout::ExpertMajor);
        let mut a = bwd_combine(Layout::ExpertMajor);
        a.in_weights = Some(tv(&[S, 8], dtype::FLOAT32));
        c_rejects(&p, &h, &topk, &a, "inputs->topk_weights must be 1-D");
        a.in_weights = None;
        c_rejects(&p, &h, &topk, &a, "needs inputs->topk_weights [>= count] float32");
    }

    fn li(ec: Option<(usize, DType)>, eo: Option<(usize, DType)>, rt: Option<(usize, DType)>) -> HtLayoutInfoArgs {
        let m = |x: Option<(usize, DType)>| x.map(|(n, dt)| tv(&[n], dt));
        HtLayoutInfoArgs {
            expert_counters: m(ec),
            src_rank_counters: None,
            expert_offsets: m(eo),
            recv_total_counter: m(rt),
        }
    }

    fn li_err(layout: Layout, a: &HtLayoutInfoArgs, needle: &str) {
        let (p, h, _) = setup(layout);
        let e = check_layout_info(&p, &h, a).unwrap_err();
        assert_eq!(e.code(), 4, "{}", e.msg);
        assert!(e.msg.contains(needle), "{needle:?} not in {:?}", e.msg);
    }

    #[test]
    fn layout_info_accepts_the_documented_outputs() {
        let (p, h, _) = setup(Layout::Flat);
        assert_eq!(
            check_layout_info(&p, &h, &HtLayoutInfoArgs::default()).unwrap(),
            HtLayoutOutputs::default()
        );
        // FLAT: int32 counters stand apart from an int64 total.
        let o = check_layout_info(&p, &h, &li(Some((32, I32)), None, Some((1, I64)))).unwrap();
        assert_eq!(
            o.expert_counters,
            Some(CounterOut {
                data: 0x100,
                dtype: I32
            })
        );
        assert_eq!(o.recv_total_counter.unwrap().dtype, I64);
        assert!(check_layout_info(&p, &h, &li(Some((40, I32)), None, Some((4, I32)))).is_ok());
        let (p, h, _) = setup(Layout::ExpertMajor);
        for dt in [I32, I64] {
            let o = check_layout_info(&p, &h, &li(Some((32, dt)), Some((33, dt)), Some((1, dt)))).unwrap();
            assert_eq!(o.expert_offsets.unwrap().dtype, dt);
        }
        assert!(check_layout_info(&p, &h, &li(None, Some((32, I64)), None)).is_ok());
    }

    /// FLAT `expert_offsets` and `src_rank_counters` are ignored, as NCCL EP ignores them (both
    /// were `ncclInvalidArgument`): not checked, not written.
    #[test]
    fn layout_info_ignores_what_nccl_ep_ignores() {
        let (p, h, _) = setup(Layout::Flat);
        let mut a = li(Some((32, I32)), Some((1, dtype::FLOAT64)), Some((1, I64)));
        a.src_rank_counters = Some(tv(&[8], I32));
        let o = check_layout_info(&p, &h, &a).unwrap();
        assert_eq!(o.expert_offsets, None);
        assert_eq!(o.expert_counters.unwrap().dtype, I32);
        assert_eq!(o.recv_total_counter.unwrap().dtype, I64);
        let (p, h, _) = setup(Layout::ExpertMajor);
        let mut a = li(Some((32, I64)), Some((32, I64)), None);
        a.src_rank_counters = Some(tv(&[3], dtype::FLOAT32));
        let o = check_layout_info(&p, &h, &a).unwrap();
        assert_eq!(o.expert_offsets.unwrap().dtype, I64);
    }

    #[test]
    fn layout_info_rejections() {
        use Layout::{ExpertMajor as Em, Flat};
        li_err(
            Flat,
            &li(Some((32, I64)), None, None),
            "expert_counters must be ncclInt32",
        );
        li_err(
            Flat,
            &li(Some((31, I32)), None, None),
            "expert_counters must have shape [>=32]",
        );
        li_err(
            Flat,
            &li(None, None, Some((0, I32))),
            "recv_total_counter must have shape [>=1]",
        );
        li_err(
            Flat,
            &li(None, None, Some((1, dtype::UINT32))),
            "recv_total_counter must be ncclInt32 or",
        );
        li_err(
            Em,
            &li(Some((32, dtype::FLOAT32)), None, None),
            "expert_counters must be ncclInt32 or",
        );
        li_err(
            Em,
            &li(None, Some((16, I32)), None),
            "expert_offsets must have shape [>=32]",
        );
        li_err(Em, &li(Some((32, dtype::UINT8)), None, None), "expert_counters must be");
        li_err(Em, &li(Some((32, I64)), Some((32, I32)), None), "share one type");
        li_err(
            Em,
            &li(Some((32, I64)), None, Some((1, I32))),
            "recv_total_counter is ncclInt32",
        );
        li_err(Em, &li(None, Some((32, I32)), Some((1, I64))), "share one type");
        let mut a = li(Some((32, I32)), None, None);
        a.expert_counters.as_mut().unwrap().data = 0;
        li_err(Em, &a, "no data pointer");
    }

    // -----------------------------------------------------------------------------------------
    // QUANT_FWD ("scales forwarded")

    /// MXFP8-like: e4m3 tokens [100, 7168] with 224 uint8 scales (H/32), outputs [S, ...].
    fn q_fwd(layout: Layout) -> DispatchArgs {
        let base = if layout == Layout::Flat { flat_fwd() } else { em_fwd() };
        DispatchArgs {
            tokens: tv(&[100, 7168], dtype::FLOAT8E4M3),
            in_scales: Some(tv(&[100, 224], dtype::UINT8)),
            out_tokens: tv(&[S, 7168], dtype::FLOAT8E4M3),
            out_scales: Some(tv(&[S, 224], dtype::UINT8)),
            quant: 1,
            ..base
        }
    }

    /// Sets tokens of `dt` with `tb` row bytes and scales of `sdt` with `sb` row bytes.
    fn q_types(a: &mut DispatchArgs, dt: DType, tb: usize, sdt: DType, sb: usize) {
        let (tw, sw) = (tb / dt.elem_bytes(), sb / sdt.elem_bytes());
        a.tokens = tv(&[100, tw], dt);
        a.out_tokens = tv(&[S, tw], dt);
        a.in_scales = Some(tv(&[100, sw], sdt));
        a.out_scales = Some(tv(&[S, sw], sdt));
    }

    #[test]
    fn quant_fwd_accepts_every_type_pair_layout_and_direction() {
        for layout in [Layout::Flat, Layout::ExpertMajor] {
            let (p, h, topk) = setup(layout);
            for a in [q_fwd(layout), bwd(q_fwd(layout))] {
                let c = check_dispatch(&p, &h, &topk, &a).unwrap();
                assert_eq!(
                    (c.hidden, c.row_bytes, c.dtype, c.elem_bytes, c.recv_rows, c.pass),
                    (7168, 7168, dtype::FLOAT8E4M3, 1, S, a.pass)
                );
                assert_eq!(
                    c.scales,
                    Some(HtScales {
                        width: 224,
                        row_bytes: 224,
                        dtype: dtype::UINT8,
                        input: 0x100,
                        output: 0x100,
                    })
                );
            }
            for dt in FWD_TOKEN_DTYPES {
                for sdt in FWD_SCALE_DTYPES {
                    let mut a = q_fwd(layout);
                    q_types(&mut a, dt, 4096, sdt, 64);
                    let c = check_dispatch(&p, &h, &topk, &a)
                        .unwrap_or_else(|e| panic!("{} + {}: {}", dt.name(), sdt.name(), e.msg));
                    assert_eq!((c.dtype, c.row_bytes), (dt, 4096));
                    let sc = c.scales.unwrap();
                    assert_eq!((sc.dtype, sc.row_bytes, sc.width), (sdt, 64, 64 / sdt.elem_bytes()));
                }
            }
        }
        let (p, h, topk) = setup(Layout::Flat);
        // Packed FP4 (H = 7168 as 3584 bytes) with NVFP4-like H/16 e4m3 scales.
        let mut a = q_fwd(Layout::Flat);
        q_types(&mut a, dtype::FLOAT4X2, 3584, dtype::FLOAT8E4M3, 448);
        assert_eq!(check_dispatch(&p, &h, &topk, &a).unwrap().hidden, 3584);
        // Token bytes + scale bytes may fill max_token_bytes exactly (14336).
        q_types(&mut a, dtype::BFLOAT16, 14336 - 512, dtype::FLOAT32, 512);
        assert!(check_dispatch(&p, &h, &topk, &a).is_ok());
        // More output rows than S, the same on both; outputs both window-backed.
        let mut a = q_fwd(Layout::Flat);
        a.out_tokens = tv(&[S + 3, 7168], dtype::FLOAT8E4M3);
        a.out_scales = Some(tv(&[S + 3, 224], dtype::UINT8));
        a.out_tokens = a.out_tokens.with_window(0x7000, 4096);
        let s = a.out_scales.take().unwrap();
        a.out_scales = Some(s.with_window(0x7000, 1 << 20));
        assert_eq!(check_dispatch(&p, &h, &topk, &a).unwrap().recv_rows, S);
        // Eager: any row count, the same on both; the runtime checks it against the count.
        let mut pe = p.clone();
        pe.max_recv_tokens = 0;
        let mut a = q_fwd(Layout::Flat);
        a.out_tokens = tv(&[7, 7168], dtype::FLOAT8E4M3);
        a.out_scales = Some(tv(&[7, 224], dtype::UINT8));
        a.out_topk_idx = Some(tv(&[9, 8], dtype::INT64));
        a.out_weights = Some(tv(&[9, 8], dtype::FLOAT32));
        let c = check_dispatch(&pe, &h, &topk, &a).unwrap();
        assert_eq!((c.recv_rows, c.eager), (7, true));
        // Combine after a QUANT_FWD dispatch is an ordinary combine of the caller's outputs.
        let mut cb = fwd_combine();
        cb.quant = 0;
        assert!(check_combine(&p, &h, &topk, &cb).is_ok());
    }

    #[test]
    fn quant_fwd_rejects_each_rule_naming_the_tensor() {
        let (p, h, topk) = setup(Layout::Flat);
        let cases: &[DCase] = &[
            (|a| a.round_scales = true, "config->round_scales must be 0"),
            (|a| a.tokens = tv(&[100, 7168], dtype::INT32), "inputs->tokens must be"),
            (|a| a.tokens = tv(&[100, 7168], dtype::UINT8), "ncclFloat4x2"),
            (
                |a| a.tokens = tv(&[100, 7168, 1], dtype::FLOAT8E4M3),
                "inputs->tokens must be 2-D",
            ),
            (
                |a| a.tokens = tv(&[100, 7160], dtype::FLOAT8E4M3),
                "7160 bytes; with NCCL_EP_DISP_QUANT_FWD token rows",
            ),
            (
                |a| a.tokens = tv(&[100, 0], dtype::FLOAT8E4M3),
                "non-zero multiple of 16",
            ),
            (|a| a.in_scales = None, "inputs->scales is NULL"),
            (|a| a.out_scales = None, "outputs->scales is NULL"),
            (
                |a| a.tokens.data = 0x108,
                "inputs->tokens: data 0x108 is not 16-byte aligned",
            ),
            (
                |a| a.in_scales.as_mut().unwrap().data = 0x104,
                "inputs->scales: data 0x104",
            ),
            (|a| a.out_tokens.data = 0x101, "outputs->tokens: data 0x101"),
            (
                |a| a.out_scales.as_mut().unwrap().data = 0x102,
                "outputs->scales: data 0x102",
            ),
            (
                |a| {
                    let o = a.out_scales.take().unwrap();
                    a.out_scales = Some(o.with_window(0x7000, 8));
                },
                "outputs->scales: win_offset 8 is not a multiple of 16",
            ),
            (
                |a| a.in_scales = Some(tv(&[100 * 224], dtype::UINT8)),
                "inputs->scales must be 2-D",
            ),
            (
                |a| a.in_scales = Some(tv(&[100, 56], dtype::INT32)),
                "inputs->scales must be",
            ),
            (
                |a| a.in_scales = Some(tv(&[100, 224], dtype::FLOAT4X2)),
                "got ncclFloat4x2",
            ),
            (
                |a| a.in_scales = Some(tv(&[99, 224], dtype::UINT8)),
                "inputs->scales must have shape [100, *]",
            ),
            (|a| a.in_scales = Some(tv(&[100, 0], dtype::UINT8)), "rows of 0 scales"),
            (
                |a| a.in_scales = Some(tv(&[100, 2], dtype::FLOAT32)),
                "a row of 2 ncclFloat32 is 8 bytes",
            ),
            (
                |a| {
                    a.tokens = tv(&[100, 7168], dtype::BFLOAT16);
                    a.out_tokens = tv(&[S, 7168], dtype::BFLOAT16);
                    a.in_scales = Some(tv(&[100, 4], dtype::FLOAT32));
                    a.out_scales = Some(tv(&[S, 4], dtype::FLOAT32));
                },
                "plus its scales (16 bytes) exceed config->max_token_bytes (14336)",
            ),
            (
                |a| a.out_scales = Some(tv(&[S, 224], dtype::FLOAT8E4M3)),
                "outputs->scales must be ncclUint8",
            ),
            (
                |a| a.out_scales = Some(tv(&[S, 112], dtype::UINT8)),
                "outputs->scales must have shape [*, 224]",
            ),
            (
                |a| a.out_scales = Some(tv(&[S], dtype::UINT8)),
                "outputs->scales must be 2-D",
            ),
            (
                |a| a.out_scales = Some(tv(&[S + 1, 224], dtype::UINT8)),
                "outputs->scales has 1025 rows but outputs->tokens has 1024",
            ),
            (
                |a| {
                    a.out_tokens = tv(&[S - 1, 7168], dtype::FLOAT8E4M3);
                    a.out_scales = Some(tv(&[S - 1, 224], dtype::UINT8));
                },
                "outputs->tokens must have shape [>=1024, 7168]",
            ),
            (
                |a| a.out_tokens = tv(&[S, 7168], dtype::FLOAT8E5M2),
                "outputs->tokens must be ncclFloat8e4m3",
            ),
            (
                |a| a.out_tokens = tv(&[S, 3584], dtype::FLOAT8E4M3),
                "outputs->tokens must have shape",
            ),
            (
                |a| a.out_tokens = a.out_tokens.with_window(0x7000, 0),
                "outputs->tokens is window-backed but outputs->scales is plain",
            ),
            (
                |a| {
                    let o = a.out_scales.take().unwrap();
                    a.out_scales = Some(o.with_window(0x7000, 0));
                },
                "outputs->tokens is plain but outputs->scales is window-backed",
            ),
        ];
        for layout in [Layout::Flat, Layout::ExpertMajor] {
            let (p, h, topk) = setup(layout);
            for (edit, needle) in cases {
                for a0 in [q_fwd(layout), bwd(q_fwd(layout))] {
                    let mut a = a0;
                    edit(&mut a);
                    rejects(&p, &h, &topk, &a, needle);
                }
            }
        }
        // The common rules still apply: forward needs weights, backward forbids them.
        let mut a = q_fwd(Layout::Flat);
        a.in_weights = None;
        rejects(&p, &h, &topk, &a, "forward ncclEpDispatch needs inputs->topk_weights");
        let mut a = bwd(q_fwd(Layout::Flat));
        a.out_weights = Some(tv(&[S, 8], dtype::FLOAT32));
        rejects(
            &p,
            &h,
            &topk,
            &a,
            "outputs->topk_weights must be NULL in the backward pass",
        );
        // Eager: outputs->scales rows must still equal outputs->tokens rows.
        let mut pe = p.clone();
        pe.max_recv_tokens = 0;
        let mut a = q_fwd(Layout::Flat);
        a.out_tokens = tv(&[7, 7168], dtype::FLOAT8E4M3);
        a.out_scales = Some(tv(&[6, 224], dtype::UINT8));
        rejects(
            &pe,
            &h,
            &topk,
            &a,
            "outputs->scales has 6 rows but outputs->tokens has 7",
        );
        // HIGH_THROUGHPUT still refuses DS_FP8E3M4 (ncclInvalidArgument) and, in combine, NVFP4
        // (ncclInvalidUsage).
        let mut a = q_fwd(Layout::Flat);
        a.quant = 2;
        rejects(&p, &h, &topk, &a, "LOW_LATENCY recipe");
        let mut cb = fwd_combine();
        cb.quant = 1;
        assert_eq!(check_combine(&p, &h, &topk, &cb).unwrap_err().code(), 5);
    }
}
