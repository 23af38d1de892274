#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]
//! High-throughput mode on a real GPU, checked bit for bit against the CPU reference
//! (src/core/ht_reference.rs): the handle's layout_info outputs, forward and backward dispatch
//! and combine, for both layouts, on local groups of 2, 4 and 8 ranks on one device and one rank
//! on a real NCCL communicator; fresh random inputs every round, outputs poisoned first.
//! Also: DROP overflow, a stale longer routing followed by a shorter one, errors of the update,
//! and CUDA-graph replays. Every test is `#[ignore]`d (it needs an NVIDIA GPU) and fails when
//! run without one. On a GPU machine: `cargo test --release --test gpu_ht -- --include-ignored
//! --skip ht_full_matrix --nocapture`, or the prebuilt binary through scripts/gpu_check.sh
//! (docs/BUILDING.md, "GPU tests").

#[path = "gpu/harness.rs"]
mod harness;
#[path = "gpu/world.rs"]
mod world;

use cudarc::driver::sys;
use ep_core::enums::{ExpertIdKind, Layout, OverflowPolicy, PassDir, dtype};
use ep_reference::ht::*;
use ep_reference::ll::{LlShape, Routing, SplitMix64, gen_routing};
use harness::{DevTensor, Stream, cu, last_error, nccl_one_rank_comm, require_gpu};
use nccl_ep::abi::guard::struct_default;
use nccl_ep::abi::handle::{ncclEpCreateHandle, ncclEpUpdateHandle};
use nccl_ep::abi::ops::{ncclEpCombine, ncclEpDispatch};
use nccl_ep::abi::types::*;
use std::time::Instant;
use world::{Handles, World};

/// The byte every output is filled with before a call (what the reference leaves untouched).
const POISON: u8 = 0xCD;

/// How the receive budget S of a case is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Budget {
    /// S = 0: the outputs are sized from recv_total_counter.
    Eager,
    /// S = the largest receive total (at least B): nothing overflows.
    Exact,
    /// S below the largest total (at least B), overflow policy DROP.
    Drop,
}

#[derive(Clone, Copy, Debug)]
struct HtCase {
    nranks: usize,
    local_experts: usize,
    max_tokens: usize,
    hidden: usize,
    topk: usize,
    /// Tokens per rank; None: random in [0, B].
    tokens: Option<usize>,
    layout: Layout,
    routing: Routing,
    dtype: HtDtype,
    idx64: bool,
    align: usize,
    budget: Budget,
    global_ids: bool,
    /// EM layout_info outputs as int64 (FLAT expert_counters are always int32).
    counters64: bool,
}

impl HtCase {
    fn shape(&self) -> LlShape {
        LlShape {
            nranks: self.nranks,
            num_experts: self.nranks * self.local_experts,
            max_tokens: self.max_tokens,
            hidden: self.hidden,
            topk: self.topk,
        }
    }

    fn ref_config(&self, budget: usize) -> HtConfig {
        HtConfig {
            nranks: self.nranks,
            num_experts: self.nranks * self.local_experts,
            topk: self.topk,
            layout: self.layout,
            alignment: if self.layout == Layout::ExpertMajor {
                self.align
            } else {
                1
            },
            budget,
            policy: if self.budget == Budget::Drop {
                OverflowPolicy::Drop
            } else {
                OverflowPolicy::Trap
            },
        }
    }

    fn group_config(&self, budget: usize) -> ncclEpGroupConfig_t {
        let mut c: ncclEpGroupConfig_t = struct_default();
        c.version = 2;
        c.algorithm = ncclEpAlgorithm_t(1);
        c.num_experts = (self.nranks * self.local_experts) as u32;
        c.max_dispatch_tokens_per_rank = self.max_tokens as u32;
        c.max_recv_tokens_per_rank = budget as u32;
        c.max_token_bytes = (self.hidden * 4) as u32;
        c.timeout_ns = 10_000_000_000;
        c.overflow_policy = ncclEpOverflowPolicy_t(if self.budget == Budget::Drop { 2 } else { 1 });
        c
    }
}

fn dev(dt: ep_core::DType, sizes: &[usize]) -> Result<DevTensor, String> {
    DevTensor::new(0, dt, sizes)
}

fn poison(t: &DevTensor) -> Result<(), String> {
    t.fill(POISON)
}

/// One rank's routing and layout_info tensors.
struct RankRouting {
    topk: DevTensor,
    counters: DevTensor,
    offsets: Option<DevTensor>,
    total: DevTensor,
}

fn routing_tensors(c: &HtCase, rt: &[i64]) -> Result<RankRouting, String> {
    let t = rt.len() / c.topk;
    let topk = dev(if c.idx64 { dtype::INT64 } else { dtype::INT32 }, &[t, c.topk])?;
    if c.idx64 {
        topk.upload(rt)?;
    } else {
        topk.upload(&rt.iter().map(|&x| x as i32).collect::<Vec<_>>())?;
    }
    let em = c.layout == Layout::ExpertMajor;
    let cdt = if em && c.counters64 { dtype::INT64 } else { dtype::INT32 };
    let r = RankRouting {
        topk,
        counters: dev(cdt, &[c.local_experts])?,
        offsets: em.then(|| dev(cdt, &[c.local_experts])).transpose()?,
        total: dev(cdt, &[1])?,
    };
    poison(&r.counters)?;
    if let Some(o) = &r.offsets {
        poison(o)?;
    }
    poison(&r.total)?;
    Ok(r)
}

fn layout_info(r: &mut RankRouting) -> ncclEpLayoutInfo_t {
    let mut li: ncclEpLayoutInfo_t = struct_default();
    li.expert_counters = r.counters.ptr();
    if let Some(o) = &mut r.offsets {
        li.expert_offsets = o.ptr();
    }
    li.recv_total_counter = r.total.ptr();
    li
}

fn handle_config(c: &HtCase) -> ncclEpHandleConfig_t {
    let mut hc: ncclEpHandleConfig_t = struct_default();
    hc.dispatch_output_per_expert_alignment = c.align;
    hc
}

fn create_handles(c: &HtCase, w: &World, rr: &mut [RankRouting]) -> Result<Handles, String> {
    let mut hs = Handles(Vec::new());
    let hc = handle_config(c);
    for (r, x) in rr.iter_mut().enumerate() {
        let li = layout_info(x);
        let mut h = std::ptr::null_mut();
        // SAFETY: writes one handle to the live local `h`; `w.groups[r]` is a live group; `li`
        // and `hc` are live locals; every descriptor (with its sizes) is boxed in `x` and its
        // device buffer owned by `x`, which the caller keeps past the queued work; the stream is
        // live.
        ep_ok!(unsafe {
            ncclEpCreateHandle(
                &mut h,
                w.groups[r],
                ncclEpLayout_t(c.layout.raw()),
                x.topk.ptr(),
                &li,
                &hc,
                w.streams[r].raw(),
            )
        });
        hs.0.push(h);
    }
    Ok(hs)
}

fn download_ints(t: &DevTensor) -> Result<Vec<i64>, String> {
    Ok(if t.desc.datatype == dtype::INT64.raw() {
        t.download::<i64>()?
    } else {
        t.download::<i32>()?.into_iter().map(|x| x as i64).collect()
    })
}

fn check_eq<T: PartialEq + std::fmt::Debug + Copy>(what: &str, got: &[T], want: &[T]) -> Result<(), String> {
    harness::compare(what, got, want)
}

/// Byte tensors compared element by element (`elem` bytes each), first differences reported.
fn check_bytes(what: &str, got: &[u8], want: &[u8], elem: usize, row: usize) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} bytes, expected {}", got.len(), want.len()));
    }
    if got == want {
        return Ok(());
    }
    let bad: Vec<usize> = (0..got.len() / elem)
        .filter(|&i| got[i * elem..(i + 1) * elem] != want[i * elem..(i + 1) * elem])
        .collect();
    let ex: Vec<String> = bad
        .iter()
        .take(4)
        .map(|&i| {
            format!(
                "[row {} elem {}] got {:02x?} want {:02x?}",
                i / row,
                i % row,
                &got[i * elem..(i + 1) * elem],
                &want[i * elem..(i + 1) * elem]
            )
        })
        .collect();
    Err(format!(
        "{what}: {} of {} elements differ, e.g. {}",
        bad.len(),
        got.len() / elem,
        ex.join(", ")
    ))
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The layout_info outputs of every rank against the plan.
fn check_layout_info(c: &HtCase, plan: &HtPlan, rr: &[RankRouting]) -> Result<(), String> {
    for (d, x) in rr.iter().enumerate() {
        let m = plan.rank(d);
        let want: Vec<i64> = m.expert_counters.iter().map(|&v| v as i64).collect();
        check_eq(
            &format!("rank {d} expert_counters"),
            &download_ints(&x.counters)?,
            &want,
        )?;
        if let Some(o) = &x.offsets {
            let want: Vec<i64> = m.expert_offsets.iter().map(|&v| v as i64).collect();
            check_eq(&format!("rank {d} expert_offsets"), &download_ints(o)?, &want)?;
        }
        check_eq(
            &format!("rank {d} recv_total_counter"),
            &download_ints(&x.total)?,
            &[m.recv_total as i64],
        )?;
        let _ = c;
    }
    Ok(())
}

/// Device tensors of one rank for one dispatch + combine (forward or backward).
struct RankOp {
    tokens: DevTensor,
    weights: Option<DevTensor>,
    out: DevTensor,
    out_idx: Option<DevTensor>,
    out_w: Option<DevTensor>,
    x: DevTensor,
    x_w: Option<DevTensor>,
    comb: DevTensor,
    comb_w: Option<DevTensor>,
}

fn dispatch_call(c: &HtCase, h: ncclEpHandle_t, o: &mut RankOp, s: &Stream, pass: PassDir) -> Result<(), String> {
    let mut inp: ncclEpDispatchInputs_t = struct_default();
    let mut out: ncclEpDispatchOutputs_t = struct_default();
    let mut li: ncclEpLayoutInfo_t = struct_default();
    let mut cfg: ncclEpDispatchConfig_t = struct_default();
    cfg.pass_direction = ncclEpPassDir_t((pass == PassDir::Backward) as i32);
    li.recv_topk_idx_kind = ncclEpExpertIdKind_t(if c.global_ids { 2 } else { 1 });
    inp.tokens = o.tokens.ptr();
    out.tokens = o.out.ptr();
    if let Some(w) = &mut o.weights {
        inp.topk_weights = w.ptr();
    }
    if let Some(t) = &mut o.out_idx {
        out.topk_idx = t.ptr();
    }
    if let Some(t) = &mut o.out_w {
        out.topk_weights = t.ptr();
    }
    // SAFETY: the four structs are live locals and every tensor pointer a descriptor boxed in `o`
    // with its sizes array, all read during the call; the device buffers they name belong to
    // `o`, and freeing one (cuMemFree) waits for the device, so they outlive the queued work;
    // `h` is the caller's live handle, `s` a live stream (the C contract of ncclEpDispatch).
    ep_ok!(unsafe { ncclEpDispatch(h, &inp, &out, &li, &cfg, s.raw()) });
    Ok(())
}

fn combine_call(h: ncclEpHandle_t, o: &mut RankOp, s: &Stream, pass: PassDir) -> Result<(), String> {
    let mut inp: ncclEpCombineInputs_t = struct_default();
    let mut out: ncclEpCombineOutputs_t = struct_default();
    let mut cfg: ncclEpCombineConfig_t = struct_default();
    cfg.pass_direction = ncclEpPassDir_t((pass == PassDir::Backward) as i32);
    inp.tokens = o.x.ptr();
    out.tokens = o.comb.ptr();
    if let Some(w) = &mut o.x_w {
        inp.topk_weights = w.ptr();
    }
    if let Some(w) = &mut o.comb_w {
        out.topk_weights = w.ptr();
    }
    // SAFETY: as in `dispatch_call`: live local structs and descriptors in `o`, read during the
    // call; device buffers of `o`, which outlive the queued work; `h` is the caller's live
    // handle, `s` a live stream (the C contract of ncclEpCombine).
    ep_ok!(unsafe { ncclEpCombine(h, &inp, &out, &cfg, s.raw()) });
    Ok(())
}

/// Host-side inputs of one dispatch + combine of the whole group.
struct OpInputs {
    tokens: Vec<Vec<u8>>,
    weights: Vec<Vec<f32>>,
    x: Vec<Vec<u8>>,
    x_w: Vec<Vec<f32>>,
}

/// Rows of rank d's receive-side tensors: S, or the count in eager mode.
fn out_rows(plan: &HtPlan, d: usize) -> usize {
    plan.rank(d).count.max(plan.cfg.budget)
}

/// Random inputs of every rank (one host thread per rank, each with a seed from `rng`).
fn make_inputs(c: &HtCase, plan: &HtPlan, pass: PassDir, rng: &mut SplitMix64) -> OpInputs {
    let n = c.nranks;
    let fwd = pass == PassDir::Forward;
    let em = c.layout == Layout::ExpertMajor;
    let seeds: Vec<u64> = (0..n).map(|_| rng.next_u64()).collect();
    type Parts = (Vec<u8>, Vec<f32>, Vec<u8>, Vec<f32>);
    let parts: Vec<Parts> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let seed = seeds[r];
                sc.spawn(move || {
                    let mut rng = SplitMix64::new(seed);
                    let t = plan.num_tokens(r);
                    let tokens = random_tokens(&mut rng, c.dtype, t, c.hidden);
                    let weights = if fwd {
                        (0..t * c.topk).map(|_| rng.unit_f32()).collect()
                    } else {
                        Vec::new()
                    };
                    let rows = out_rows(plan, r);
                    let x = random_tokens(&mut rng, c.dtype, rows, c.hidden);
                    let x_w = if fwd {
                        Vec::new()
                    } else {
                        let w = if em { rows } else { rows * c.topk };
                        (0..w).map(|_| rng.unit_f32() * 2.0 - 1.0).collect()
                    };
                    (tokens, weights, x, x_w)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut o = OpInputs {
        tokens: Vec::new(),
        weights: Vec::new(),
        x: Vec::new(),
        x_w: Vec::new(),
    };
    for (tokens, weights, x, x_w) in parts {
        o.tokens.push(tokens);
        if fwd {
            o.weights.push(weights);
        } else {
            o.x_w.push(x_w);
        }
        o.x.push(x);
    }
    o
}

fn alloc_op(c: &HtCase, plan: &HtPlan, r: usize, inp: &OpInputs, pass: PassDir) -> Result<RankOp, String> {
    let (k, h) = (c.topk, c.hidden);
    let dt = c.dtype.nccl();
    let fwd = pass == PassDir::Forward;
    let em = c.layout == Layout::ExpertMajor;
    let t = plan.num_tokens(r);
    let rows = out_rows(plan, r);
    let o = RankOp {
        tokens: dev(dt, &[t, h])?,
        weights: fwd.then(|| dev(dtype::FLOAT32, &[t, k])).transpose()?,
        out: dev(dt, &[rows, h])?,
        out_idx: (fwd && !em).then(|| dev(dtype::INT64, &[rows, k])).transpose()?,
        out_w: fwd
            .then(|| dev(dtype::FLOAT32, &if em { vec![rows] } else { vec![rows, k] }))
            .transpose()?,
        x: dev(dt, &[rows, h])?,
        x_w: (!fwd)
            .then(|| dev(dtype::FLOAT32, &if em { vec![rows] } else { vec![rows, k] }))
            .transpose()?,
        comb: dev(dt, &[t, h])?,
        comb_w: (!fwd).then(|| dev(dtype::FLOAT32, &[t, k])).transpose()?,
    };
    o.tokens.upload(&inp.tokens[r])?;
    if let Some(w) = &o.weights {
        w.upload(&inp.weights[r])?;
    }
    o.x.upload(&inp.x[r])?;
    if let Some(w) = &o.x_w {
        w.upload(&inp.x_w[r])?;
    }
    for p in [
        Some(&o.out),
        o.out_idx.as_ref(),
        o.out_w.as_ref(),
        Some(&o.comb),
        o.comb_w.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        poison(p)?;
    }
    Ok(o)
}

/// Downloaded outputs of one rank.
struct RankGot {
    out: Vec<u8>,
    out_idx: Option<Vec<i64>>,
    out_w: Option<Vec<f32>>,
    comb: Vec<u8>,
    comb_w: Option<Vec<f32>>,
}

fn download(o: &RankOp) -> Result<RankGot, String> {
    Ok(RankGot {
        out: o.out.download()?,
        out_idx: o.out_idx.as_ref().map(|t| t.download()).transpose()?,
        out_w: o.out_w.as_ref().map(|t| t.download()).transpose()?,
        comb: o.comb.download()?,
        comb_w: o.comb_w.as_ref().map(|t| t.download()).transpose()?,
    })
}

/// Rank r's outputs against the reference (runs on a host thread of its own).
fn check_rank(c: &HtCase, plan: &HtPlan, inp: &OpInputs, pass: PassDir, r: usize, got: &RankGot) -> Result<(), String> {
    let din = HtDispatchIn {
        dtype: c.dtype,
        hidden: c.hidden,
        pass,
        recv_kind: if c.global_ids {
            ExpertIdKind::Global
        } else {
            ExpertIdKind::Local
        },
        tokens: &inp.tokens,
        weights: &inp.weights,
        poison: POISON,
    };
    let want = plan.dispatch(r, &din, out_rows(plan, r));
    let eb = c.dtype.bytes();
    check_bytes(
        &format!("rank {r} {pass:?} dispatch tokens"),
        &got.out,
        &want.tokens,
        eb,
        c.hidden,
    )?;
    if let Some(idx) = &got.out_idx {
        check_eq(&format!("rank {r} dispatch topk_idx"), idx, &want.topk_idx)?;
    }
    if let Some(w) = &got.out_w {
        check_eq(
            &format!("rank {r} dispatch topk_weights"),
            &f32_bits(w),
            &f32_bits(&want.topk_weights),
        )?;
    }
    let cin = HtCombineIn {
        dtype: c.dtype,
        hidden: c.hidden,
        pass,
        tokens: &inp.x,
        weights: &inp.x_w,
    };
    let want = plan.combine(r, &cin);
    check_bytes(
        &format!("rank {r} {pass:?} combine tokens"),
        &got.comb,
        &want.tokens,
        eb,
        c.hidden,
    )?;
    if let Some(w) = &got.comb_w {
        check_eq(
            &format!("rank {r} combine topk_weights"),
            &f32_bits(w),
            &f32_bits(&want.topk_weights),
        )?;
    }
    Ok(())
}

/// One dispatch then one combine of the given pass on every rank, checked.
fn run_op(
    c: &HtCase,
    w: &World,
    hs: &Handles,
    plan: &HtPlan,
    pass: PassDir,
    rng: &mut SplitMix64,
) -> Result<(), String> {
    let inp = make_inputs(c, plan, pass, rng);
    let mut ops = (0..c.nranks)
        .map(|r| alloc_op(c, plan, r, &inp, pass))
        .collect::<Result<Vec<_>, _>>()?;
    for r in 0..c.nranks {
        dispatch_call(c, hs.0[r], &mut ops[r], &w.streams[r], pass)?;
    }
    for r in 0..c.nranks {
        combine_call(hs.0[r], &mut ops[r], &w.streams[r], pass)?;
    }
    w.sync()?;
    let got = ops.iter().map(download).collect::<Result<Vec<_>, _>>()?;
    drop(ops);
    check_all(c, plan, &inp, pass, &got)
}

/// Checks every rank, one host thread each.
fn check_all(c: &HtCase, plan: &HtPlan, inp: &OpInputs, pass: PassDir, got: &[RankGot]) -> Result<(), String> {
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..c.nranks)
            .map(|r| sc.spawn(move || check_rank(c, plan, inp, pass, r, &got[r])))
            .collect();
        hs.into_iter().try_for_each(|h| h.join().unwrap())
    })
}

fn gen_world_routing(c: &HtCase, rng: &mut SplitMix64) -> Vec<Vec<i64>> {
    (0..c.nranks)
        .map(|_| {
            let t = c.tokens.unwrap_or_else(|| rng.below(c.max_tokens + 1));
            gen_routing(rng, c.shape(), t, c.routing)
        })
        .collect()
}

/// S for a case: from the receive totals with no budget.
fn pick_budget(c: &HtCase, routing: &[Vec<i64>]) -> usize {
    let free = HtPlan::new(c.ref_config(0), routing).expect("valid routing");
    let most = (0..c.nranks).map(|d| free.rank(d).recv_total).max().unwrap_or(0);
    match c.budget {
        Budget::Eager => 0,
        Budget::Exact => most.max(c.max_tokens),
        Budget::Drop => (most * 2 / 3).max(c.max_tokens),
    }
}

/// A full round on a fresh world: routing, handles and layout_info, forward and backward.
fn round(c: &HtCase, rng: &mut SplitMix64, comm: Option<ncclComm_t>) -> Result<String, String> {
    let t0 = Instant::now();
    let routing = gen_world_routing(c, rng);
    let s = pick_budget(c, &routing);
    let cfg = c.group_config(s);
    let w = match comm {
        Some(comm) => World::nccl(comm, &cfg)?,
        None => World::local_n(c.nranks, &cfg)?,
    };
    let plan = HtPlan::new(c.ref_config(s), &routing).map_err(|e| format!("reference: {e:?}"))?;
    let mut rr = routing
        .iter()
        .map(|rt| routing_tensors(c, rt))
        .collect::<Result<Vec<_>, _>>()?;
    let hs = create_handles(c, &w, &mut rr)?;
    w.sync()?;
    check_layout_info(c, &plan, &rr)?;
    run_op(c, &w, &hs, &plan, PassDir::Forward, rng)?;
    run_op(c, &w, &hs, &plan, PassDir::Backward, rng)?;
    let dropped: usize = (0..c.nranks).map(|d| plan.rank(d).dropped).sum();
    Ok(format!(
        "S {s}, counts {:?}, dropped {dropped}, {:.2} s",
        (0..c.nranks).map(|d| plan.rank(d).count).collect::<Vec<_>>(),
        t0.elapsed().as_secs_f64()
    ))
}

fn base(nranks: usize, layout: Layout) -> HtCase {
    HtCase {
        nranks,
        local_experts: match nranks {
            1 => 16,
            2 => 16,
            _ => 8,
        },
        max_tokens: 513,
        hidden: 2048,
        topk: 8,
        tokens: Some(513),
        layout,
        routing: Routing::Uniform,
        dtype: HtDtype::Bf16,
        idx64: true,
        align: 1,
        budget: Budget::Exact,
        global_ids: false,
        counters64: false,
    }
}

/// Runs `round` on every case with one generator seeded from `seed` and the name, prints each
/// outcome, and fails the test with every failed case listed.
fn run_rounds<C: std::fmt::Debug>(
    name: &str,
    seed: u64,
    cases: &[C],
    mut round: impl FnMut(&C, &mut SplitMix64) -> Result<String, String>,
) {
    let mut rng = SplitMix64::new(seed ^ name.len() as u64);
    let mut failed = Vec::new();
    for c in cases {
        match round(c, &mut rng) {
            Ok(info) => println!("{name}: ok   {c:?}: {info}"),
            Err(e) => {
                println!("{name}: FAIL {c:?}: {e}");
                failed.push(format!("{c:?}: {e}"));
            }
        }
    }
    println!(
        "{name}: {} rounds passed, {} failed",
        cases.len() - failed.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

fn run_cases(name: &str, cases: &[HtCase], comm: Option<ncclComm_t>) {
    run_rounds(name, 0x5eed, cases, |c, rng| round(c, rng, comm));
}

/// The matrix, a covering subset (every value of every axis at least once per layout
/// and rank count, the large ones where they matter): ranks {2, 4, 8} x layout x K {1, 8} x
/// H {2048, 7168} x T {0, 1, 513, 4096}, each round forward and backward.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ht_local_groups_matrix() {
    let _gpu = require_gpu();
    let mut cases = Vec::new();
    for nranks in [2, 4, 8] {
        for layout in [Layout::Flat, Layout::ExpertMajor] {
            let b = base(nranks, layout);
            // (K, H, T, B)
            let mut shapes = vec![
                (8, 2048, 0, 513),
                (1, 2048, 1, 513),
                (8, 2048, 513, 513),
                (1, 7168, 513, 513),
                (8, 7168, 513, 513),
            ];
            if nranks != 4 {
                shapes.push((8, 7168, 4096, 4096));
            } else {
                shapes.push((1, 2048, 4096, 4096));
            }
            for (i, &(topk, hidden, t, bmax)) in shapes.iter().enumerate() {
                cases.push(HtCase {
                    topk,
                    hidden,
                    tokens: Some(t),
                    max_tokens: bmax,
                    idx64: i % 2 == 0,
                    align: if layout == Layout::ExpertMajor && i % 2 == 1 {
                        64
                    } else {
                        1
                    },
                    global_ids: i == 2,
                    counters64: i % 3 == 1,
                    budget: if i == 3 { Budget::Eager } else { Budget::Exact },
                    ..b
                });
            }
        }
    }
    run_cases("ht_local_groups_matrix", &cases, None);
}

/// The whole product (96 rounds, each forward and backward; minutes): ranks {2, 4, 8} x
/// layout x K {1, 8} x H {2048, 7168} x T {0, 1, 513, 4096}, alignment 64 on expert-major rounds
/// with K = 8. It runs whenever it is selected; the scripts leave it out (`--skip
/// ht_full_matrix`, which cargo counts as filtered out) unless NCCL_EP_HT_FULL=1.
#[test]
#[ignore = "needs an NVIDIA GPU and minutes: NCCL_EP_HT_FULL=1 scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ht_full_matrix() {
    let _gpu = require_gpu();
    let mut cases = Vec::new();
    for nranks in [2, 4, 8] {
        for layout in [Layout::Flat, Layout::ExpertMajor] {
            for topk in [1, 8] {
                for hidden in [2048, 7168] {
                    for t in [0, 1, 513, 4096] {
                        cases.push(HtCase {
                            topk,
                            hidden,
                            tokens: Some(t),
                            max_tokens: t.max(513),
                            align: if layout == Layout::ExpertMajor && topk == 8 {
                                64
                            } else {
                                1
                            },
                            ..base(nranks, layout)
                        });
                    }
                }
            }
        }
    }
    run_cases("ht_full_matrix", &cases, None);
}

/// Token types, skewed routing and repeated ids, random token counts, alignment, DROP.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ht_dtypes_routings_and_drop() {
    let _gpu = require_gpu();
    let mut cases = Vec::new();
    for layout in [Layout::Flat, Layout::ExpertMajor] {
        let b = HtCase {
            max_tokens: 300,
            tokens: None,
            ..base(4, layout)
        };
        for dtype in [HtDtype::Bf16, HtDtype::F16, HtDtype::F32] {
            cases.push(HtCase { dtype, ..b });
        }
        cases.push(HtCase {
            routing: Routing::Skewed { rank: 3 },
            align: 64,
            ..b
        });
        cases.push(HtCase {
            routing: Routing::SameRankDups,
            dtype: HtDtype::F16,
            idx64: false,
            ..b
        });
        cases.push(HtCase {
            routing: Routing::Skewed { rank: 1 },
            budget: Budget::Drop,
            ..b
        });
        cases.push(HtCase {
            routing: Routing::SameRankDups,
            budget: Budget::Drop,
            align: 64,
            dtype: HtDtype::F32,
            ..b
        });
        cases.push(HtCase {
            routing: Routing::Uniform,
            budget: Budget::Eager,
            align: 64,
            ..b
        });
    }
    run_cases("ht_dtypes_routings_and_drop", &cases, None);
}

/// One rank on a real NCCL communicator: both layouts, K {1, 8}, T {0, 1, 513, 4096}; then the
/// update's errors, which an NCCL group reports from ncclEpUpdateHandle itself.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ht_one_rank_on_nccl_communicator() {
    let _gpu = require_gpu();
    // No skip without NCCL: a GPU machine that runs these tests has libnccl.so.2.
    let comm = nccl_one_rank_comm().unwrap_or_else(|e| panic!("a one-rank NCCL communicator: {e}"));
    let mut cases = Vec::new();
    for layout in [Layout::Flat, Layout::ExpertMajor] {
        for (i, &(topk, t)) in [(1, 0), (8, 1), (8, 513), (8, 4096)].iter().enumerate() {
            cases.push(HtCase {
                nranks: 1,
                local_experts: 16,
                topk,
                tokens: Some(t),
                max_tokens: 4096,
                hidden: if i == 3 { 7168 } else { 2048 },
                align: if i == 2 { 64 } else { 1 },
                budget: if i == 1 { Budget::Eager } else { Budget::Exact },
                ..base(1, layout)
            });
        }
    }
    run_cases("ht_one_rank_on_nccl_communicator", &cases, Some(comm));

    // A bad expert id: ncclInvalidArgument from the update, naming the entry.
    let c = HtCase {
        nranks: 1,
        local_experts: 16,
        tokens: Some(10),
        max_tokens: 64,
        ..base(1, Layout::Flat)
    };
    let w = World::nccl(comm, &c.group_config(64)).unwrap();
    let mut rt = gen_routing(&mut SplitMix64::new(1), c.shape(), 10, Routing::Uniform);
    rt[3 * 8 + 5] = 16;
    rt[7 * 8 + 1] = -3;
    let mut r = routing_tensors(&c, &rt).unwrap();
    let li = layout_info(&mut r);
    let mut h = std::ptr::null_mut();
    // SAFETY: writes one handle to the live local `h`; `w.groups[0]` is a live group; `li` and
    // the config temporary live for the call; the descriptors and buffers belong to `r`.
    let rc = unsafe {
        ncclEpCreateHandle(
            &mut h,
            w.groups[0],
            ncclEpLayout_t(c.layout.raw()),
            r.topk.ptr(),
            &li,
            &handle_config(&c),
            w.streams[0].raw(),
        )
    };
    let msg = last_error();
    assert_eq!(rc, 4, "{msg}");
    assert!(msg.contains("topk_idx[3][5] is 16"), "{msg}");
    println!("ht_one_rank_on_nccl_communicator: bad id reported: {msg}");
    // TRAP overflow: 64 tokens x 8 experts are 512 expert-major rows, S = 64.
    let c = HtCase {
        layout: Layout::ExpertMajor,
        tokens: Some(64),
        ..c
    };
    let rt = gen_routing(&mut SplitMix64::new(2), c.shape(), 64, Routing::Uniform);
    let mut r = routing_tensors(&c, &rt).unwrap();
    let li = layout_info(&mut r);
    // SAFETY: as above, with the new `r` and `li`.
    let rc = unsafe {
        ncclEpCreateHandle(
            &mut h,
            w.groups[0],
            ncclEpLayout_t(c.layout.raw()),
            r.topk.ptr(),
            &li,
            &handle_config(&c),
            w.streams[0].raw(),
        )
    };
    let msg = last_error();
    let want = HtPlan::new(c.ref_config(64), &[rt]).unwrap_err().to_error();
    assert_eq!(rc, 5, "{msg}");
    assert!(msg.contains(&want.msg), "{msg} (want {})", want.msg);
    println!("ht_one_rank_on_nccl_communicator: overflow reported: {msg}");
}

/// The update's errors in a local group: the first dispatch after the update reports them.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ht_update_errors_in_local_groups() {
    let _gpu = require_gpu();
    for (what, bad) in [("bad id", true), ("TRAP overflow", false)] {
        let c = HtCase {
            tokens: Some(64),
            max_tokens: 64,
            routing: Routing::Skewed { rank: 0 },
            ..base(2, Layout::Flat)
        };
        let w = World::local_n(2, &c.group_config(if bad { 128 } else { 64 })).unwrap();
        let mut rng = SplitMix64::new(9);
        let mut routing = gen_world_routing(&c, &mut rng);
        if bad {
            routing[1][10 * 8 + 2] = 1000;
        }
        let mut rr = routing
            .iter()
            .map(|rt| routing_tensors(&c, rt))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let hs = create_handles(&c, &w, &mut rr).unwrap();
        let want = HtPlan::new(c.ref_config(if bad { 128 } else { 64 }), &routing).unwrap_err();
        let plan = HtPlan::captured(c.ref_config(0), &routing);
        let inp = make_inputs(&c, &plan, PassDir::Forward, &mut rng);
        for r in 0..2 {
            let mut o = alloc_op(&c, &plan, r, &inp, PassDir::Forward).unwrap();
            let e = dispatch_call(&c, hs.0[r], &mut o, &w.streams[r], PassDir::Forward).unwrap_err();
            let code = if bad { "returned 4" } else { "returned 5" };
            assert!(e.contains(code), "rank {r} {what}: {e}");
            assert!(
                e.contains(&want.to_error().msg),
                "rank {r} {what}: {e} (want {:?})",
                want.to_error().msg
            );
            // The handle has no routing now.
            let e2 = dispatch_call(&c, hs.0[r], &mut o, &w.streams[r], PassDir::Forward).unwrap_err();
            assert!(e2.contains("no routing"), "{e2}");
        }
        println!("ht_update_errors_in_local_groups: {what}: reported on both ranks");
    }
}

/// A handle updated with a longer routing, used, then updated with a shorter one: nothing of
/// the longer one may leak (stale rows), on both layouts.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ht_stale_longer_then_shorter_routing() {
    let _gpu = require_gpu();
    for layout in [Layout::Flat, Layout::ExpertMajor] {
        let c = HtCase {
            max_tokens: 512,
            ..base(4, layout)
        };
        let mut rng = SplitMix64::new(77);
        let s = 4 * 512 * 8;
        let w = World::local_n(4, &c.group_config(s)).unwrap();
        let mut run = |t: usize, hs: Option<&Handles>| -> Result<Option<Handles>, String> {
            let ct = HtCase { tokens: Some(t), ..c };
            let routing = gen_world_routing(&ct, &mut rng);
            let plan = HtPlan::new(ct.ref_config(s), &routing).map_err(|e| format!("{e:?}"))?;
            let mut rr = routing
                .iter()
                .map(|rt| routing_tensors(&ct, rt))
                .collect::<Result<Vec<_>, _>>()?;
            let made = match hs {
                None => Some(create_handles(&ct, &w, &mut rr)?),
                Some(hs) => {
                    for r in 0..4 {
                        let li = layout_info(&mut rr[r]);
                        // SAFETY: a live handle of `hs`; `li` is a live local; the descriptors
                        // and device buffers belong to `rr[r]`, kept past `w.sync()` below; the
                        // stream is live.
                        ep_ok!(unsafe { ncclEpUpdateHandle(hs.0[r], rr[r].topk.ptr(), &li, w.streams[r].raw()) });
                    }
                    None
                }
            };
            let hs = made.as_ref().or(hs).unwrap();
            w.sync()?;
            check_layout_info(&ct, &plan, &rr)?;
            run_op(&ct, &w, hs, &plan, PassDir::Forward, &mut rng)?;
            run_op(&ct, &w, hs, &plan, PassDir::Backward, &mut rng)?;
            Ok(made)
        };
        let hs = run(512, None)
            .unwrap_or_else(|e| panic!("{layout:?} T=512: {e}"))
            .unwrap();
        run(100, Some(&hs)).unwrap_or_else(|e| panic!("{layout:?} T=100 after 512: {e}"));
        run(0, Some(&hs)).unwrap_or_else(|e| panic!("{layout:?} T=0 after 100: {e}"));
        run(37, Some(&hs)).unwrap_or_else(|e| panic!("{layout:?} T=37 after 0: {e}"));
        println!("ht_stale_longer_then_shorter_routing {layout:?}: 512 -> 100 -> 0 -> 37 passed");
    }
}

/// Update + forward dispatch + forward combine of every rank captured once into CUDA graphs,
/// replayed with new routing (same T), tokens, weights and expert outputs; every replay checked.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ht_graph_replays() {
    let _gpu = require_gpu();
    for layout in [Layout::Flat, Layout::ExpertMajor] {
        let c = HtCase {
            tokens: Some(200),
            max_tokens: 256,
            ..base(4, layout)
        };
        let s = 4 * 256 * 8;
        let w = World::local_n(4, &c.group_config(s)).unwrap();
        let mut rng = SplitMix64::new(1234);
        let run = |rng: &mut SplitMix64| -> Result<usize, String> {
            let routing = gen_world_routing(&c, rng);
            let mut rr = routing
                .iter()
                .map(|rt| routing_tensors(&c, rt))
                .collect::<Result<Vec<_>, _>>()?;
            let hs = create_handles(&c, &w, &mut rr)?;
            let plan = HtPlan::new(c.ref_config(s), &routing).map_err(|e| format!("{e:?}"))?;
            let inp = make_inputs(&c, &plan, PassDir::Forward, rng);
            let mut ops = (0..4)
                .map(|r| alloc_op(&c, &plan, r, &inp, PassDir::Forward))
                .collect::<Result<Vec<_>, _>>()?;
            // One plain round first: compiles and loads the kernels outside the capture.
            for r in 0..4 {
                dispatch_call(&c, hs.0[r], &mut ops[r], &w.streams[r], PassDir::Forward)?;
            }
            for r in 0..4 {
                combine_call(hs.0[r], &mut ops[r], &w.streams[r], PassDir::Forward)?;
            }
            w.sync()?;
            let _ctx = nccl_ep::cuda::context::CtxGuard::enter(0).map_err(|e| e.msg)?;
            let mut execs = Vec::new();
            for r in 0..4 {
                let st = w.streams[r].0;
                let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
                cu(
                    // SAFETY: `st` is rank r's live stream of device 0, whose context is current.
                    unsafe { sys::cuStreamBeginCapture_v2(st, mode) },
                    "cuStreamBeginCapture",
                )?;
                let li = layout_info(&mut rr[r]);
                // SAFETY: a live handle of `hs`; `li` is a live local; the descriptors and device
                // buffers belong to `rr[r]`, which outlives every replay of the graph; the stream
                // is live.
                ep_ok!(unsafe { ncclEpUpdateHandle(hs.0[r], rr[r].topk.ptr(), &li, w.streams[r].raw()) });
                dispatch_call(&c, hs.0[r], &mut ops[r], &w.streams[r], PassDir::Forward)?;
                combine_call(hs.0[r], &mut ops[r], &w.streams[r], PassDir::Forward)?;
                let mut g = std::ptr::null_mut();
                // SAFETY: ends the capture begun above on `st`; writes one graph to the local `g`.
                cu(unsafe { sys::cuStreamEndCapture(st, &mut g) }, "cuStreamEndCapture")?;
                let mut e = std::ptr::null_mut();
                cu(
                    // SAFETY: `g` is the graph just captured (checked above); writes one
                    // executable graph to the local `e`.
                    unsafe { sys::cuGraphInstantiateWithFlags(&mut e, g, 0) },
                    "cuGraphInstantiate",
                )?;
                execs.push(e);
            }
            let mut replays = 0;
            for _ in 0..30 {
                let routing = gen_world_routing(&c, rng);
                let plan = HtPlan::new(c.ref_config(s), &routing).map_err(|e| format!("{e:?}"))?;
                let inp = make_inputs(&c, &plan, PassDir::Forward, rng);
                for r in 0..4 {
                    let o = &ops[r];
                    let rt = &routing[r];
                    if c.idx64 {
                        rr[r].topk.upload(rt)?;
                    } else {
                        rr[r].topk.upload(&rt.iter().map(|&x| x as i32).collect::<Vec<_>>())?;
                    }
                    poison(&rr[r].counters)?;
                    poison(&rr[r].total)?;
                    if let Some(t) = &rr[r].offsets {
                        poison(t)?;
                    }
                    o.tokens.upload(&inp.tokens[r])?;
                    o.weights.as_ref().unwrap().upload(&inp.weights[r])?;
                    // Combine inputs: as many rows as allocated (S).
                    o.x.upload(&inp.x[r])?;
                    for p in [Some(&o.out), o.out_idx.as_ref(), o.out_w.as_ref(), Some(&o.comb)]
                        .into_iter()
                        .flatten()
                    {
                        poison(p)?;
                    }
                }
                for r in 0..4 {
                    // SAFETY: `execs[r]` was instantiated above and is destroyed only after this
                    // loop; the handles, routing and op buffers it uses live until the end of the
                    // closure; `w.streams[r]` is live and the context current.
                    cu(unsafe { sys::cuGraphLaunch(execs[r], w.streams[r].0) }, "cuGraphLaunch")?;
                }
                w.sync()?;
                check_layout_info(&c, &plan, &rr)?;
                let got = ops.iter().map(download).collect::<Result<Vec<_>, _>>()?;
                check_all(&c, &plan, &inp, PassDir::Forward, &got)?;
                replays += 1;
            }
            for e in execs {
                // SAFETY: each exec was instantiated above and is destroyed once, here, after
                // `w.sync()` waited for its last replay.
                unsafe { sys::cuGraphExecDestroy(e) };
            }
            Ok(replays)
        };
        let n = run(&mut rng).unwrap_or_else(|e| panic!("{layout:?} graph replays: {e}"));
        println!("ht_graph_replays {layout:?}: {n} replays passed");
    }
}

/// A rank that never dispatches: the other rank's dispatch gives up after the timeout (its open
/// and close barriers each wait once), raises the group's async error flag (readable through
/// ncclEpGetAsyncError on an HT group), and nothing traps: a fresh world then runs exact rounds.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ht_silent_rank_times_out() {
    let _gpu = require_gpu();
    use nccl_ep::abi::mask::{ncclEpErrorClear, ncclEpGetAsyncError};
    // The test's own timeout must win over a caller-wide NCCL_EP_TIMEOUT_MS (gpu_check.sh sets one).
    let saved = std::env::var("NCCL_EP_TIMEOUT_MS").ok();
    // SAFETY: every test of this binary holds the `require_gpu` lock for its whole run, so no
    // other test thread reads or writes the environment now; the library starts no threads.
    unsafe { std::env::remove_var("NCCL_EP_TIMEOUT_MS") };
    let timeout_ms = 200.0;
    let c = HtCase {
        tokens: Some(64),
        max_tokens: 64,
        ..base(2, Layout::Flat)
    };
    let mut rng = SplitMix64::new(31);
    let routing = gen_world_routing(&c, &mut rng);
    let s = pick_budget(&c, &routing);
    let mut cfg = c.group_config(s);
    cfg.timeout_ns = (timeout_ms * 1e6) as u64;
    let w = World::local_n(2, &cfg).unwrap();
    if let Some(v) = saved {
        // SAFETY: as above.
        unsafe { std::env::set_var("NCCL_EP_TIMEOUT_MS", v) };
    }
    let mut rr = routing
        .iter()
        .map(|rt| routing_tensors(&c, rt))
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let hs = create_handles(&c, &w, &mut rr).unwrap();
    w.sync().unwrap();
    let plan = HtPlan::new(c.ref_config(s), &routing).unwrap();
    let inp = make_inputs(&c, &plan, PassDir::Forward, &mut rng);
    let mut o = alloc_op(&c, &plan, 0, &inp, PassDir::Forward).unwrap();
    let mut err = -1;
    assert_eq!(
        // SAFETY: `w.groups[0]` is a live group; writes one int to the live local `err`.
        unsafe { ncclEpGetAsyncError(w.groups[0], &mut err) },
        0,
        "{}",
        last_error()
    );
    assert_eq!(err, 0, "flag raised before the silent round");
    let t0 = Instant::now();
    dispatch_call(&c, hs.0[0], &mut o, &w.streams[0], PassDir::Forward).unwrap();
    w.streams[0]
        .sync()
        .expect("the waiting rank's stream completes (no trap)");
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    assert_eq!(
        // SAFETY: as above.
        unsafe { ncclEpGetAsyncError(w.groups[0], &mut err) },
        0,
        "{}",
        last_error()
    );
    assert_eq!(err, 1, "the async error flag is raised after the timeout");
    // SAFETY: `w.groups[0]` is a live group; the call takes nothing else.
    assert_eq!(unsafe { ncclEpErrorClear(w.groups[0]) }, 0);
    // SAFETY: as above; writes one int to the live local `err`.
    assert_eq!(unsafe { ncclEpGetAsyncError(w.groups[0], &mut err) }, 0);
    assert_eq!(err, 0, "ncclEpErrorClear clears the flag");
    assert!(
        ms >= timeout_ms && ms < 3.0 * timeout_ms + 100.0,
        "rank 0 returned after {ms:.1} ms with a {timeout_ms} ms timeout"
    );
    println!(
        "ht_silent_rank_times_out: rank 0's dispatch gave up after {ms:.1} ms (timeout {timeout_ms} ms), flag raised and cleared"
    );
    drop(o);
    drop(hs);
    drop(w);
    // The context survived: a fresh world works exactly.
    let fresh = HtCase {
        tokens: Some(100),
        max_tokens: 128,
        ..base(2, Layout::ExpertMajor)
    };
    let msg = round(&fresh, &mut rng, None).unwrap_or_else(|e| panic!("round after the timeout: {e}"));
    println!("ht_silent_rank_times_out: a fresh world afterwards is exact ({msg})");
}

/// Any negative expert id means "none", as in NCCL EP (docs/CONFORMANCE.md): a routing whose
/// unused entries are −2, −100 or i32::MIN instead of −1 (int32 and int64, both layouts) gives
/// what the reference gives for −1, forward and backward.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ht_negative_ids_mean_none() {
    let _gpu = require_gpu();
    for (layout, idx64) in [(Layout::Flat, true), (Layout::ExpertMajor, false)] {
        let c = HtCase {
            tokens: Some(100),
            max_tokens: 128,
            idx64,
            ..base(2, layout)
        };
        let mut rng = SplitMix64::new(if idx64 { 71 } else { 72 });
        let odd: Vec<Vec<i64>> = gen_world_routing(&c, &mut rng)
            .iter()
            .enumerate()
            .map(|(r, rt)| {
                rt.iter()
                    .enumerate()
                    .map(|(i, &e)| match e < 0 || i % 7 == r {
                        true => [-2, -100, i32::MIN as i64][i % 3],
                        false => e,
                    })
                    .collect()
            })
            .collect();
        let s = pick_budget(&c, &odd);
        let w = World::local_n(c.nranks, &c.group_config(s)).unwrap();
        let plan = HtPlan::new(c.ref_config(s), &odd).expect("negative ids are none");
        assert!(plan.routing(0).iter().all(|&e| e >= -1));
        let mut rr = odd
            .iter()
            .map(|rt| routing_tensors(&c, rt))
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let hs = create_handles(&c, &w, &mut rr).unwrap_or_else(|e| panic!("{layout:?}: {e}"));
        w.sync().unwrap();
        check_layout_info(&c, &plan, &rr).unwrap_or_else(|e| panic!("{layout:?}: {e}"));
        for pass in [PassDir::Forward, PassDir::Backward] {
            run_op(&c, &w, &hs, &plan, pass, &mut rng).unwrap_or_else(|e| panic!("{layout:?} {pass:?}: {e}"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NCCL_EP_DISP_QUANT_FWD ("scales forwarded"): the caller's raw token rows and one scale row per
// token move as bytes; then an ordinary combine of bf16 expert outputs on the same handle.

/// The wire types of one QUANT_FWD case: tokens `[T, tok_width]` of `tok`, scales
/// `[T, scale_width]` of `scale`.
#[derive(Clone, Copy, Debug)]
struct QuantWire {
    tok: ep_core::DType,
    tok_width: usize,
    scale: ep_core::DType,
    scale_width: usize,
}

impl QuantWire {
    fn tok_bytes(&self) -> usize {
        self.tok_width * self.tok.elem_bytes()
    }
    fn scale_bytes(&self) -> usize {
        self.scale_width * self.scale.elem_bytes()
    }
}

/// Device tensors of one rank's QUANT_FWD dispatch (the combine's are in `op`).
struct QuantOp {
    op: RankOp,
    scales: DevTensor,
    out_scales: DevTensor,
}

fn quant_dispatch_call(
    c: &HtCase,
    h: ncclEpHandle_t,
    q: &mut QuantOp,
    s: &Stream,
    pass: PassDir,
) -> Result<(), String> {
    let o = &mut q.op;
    let mut inp: ncclEpDispatchInputs_t = struct_default();
    let mut out: ncclEpDispatchOutputs_t = struct_default();
    let mut li: ncclEpLayoutInfo_t = struct_default();
    let mut cfg: ncclEpDispatchConfig_t = struct_default();
    cfg.pass_direction = ncclEpPassDir_t((pass == PassDir::Backward) as i32);
    cfg.quant_recipe = ncclEpDispQuant_t(1);
    li.recv_topk_idx_kind = ncclEpExpertIdKind_t(if c.global_ids { 2 } else { 1 });
    inp.tokens = o.tokens.ptr();
    inp.scales = q.scales.ptr();
    out.tokens = o.out.ptr();
    out.scales = q.out_scales.ptr();
    if let Some(w) = &mut o.weights {
        inp.topk_weights = w.ptr();
    }
    if let Some(t) = &mut o.out_idx {
        out.topk_idx = t.ptr();
    }
    if let Some(t) = &mut o.out_w {
        out.topk_weights = t.ptr();
    }
    // SAFETY: as in `dispatch_call`: live local structs; every descriptor is boxed in `q` with
    // its sizes array and device buffer, which outlive the queued work (freeing waits for the
    // device); `h` is the caller's live handle, `s` a live stream.
    ep_ok!(unsafe { ncclEpDispatch(h, &inp, &out, &li, &cfg, s.raw()) });
    Ok(())
}

/// One QUANT_FWD dispatch and one bf16 combine of the given pass on every rank, checked bit for
/// bit (tokens, scales, top-k outputs, combine) on fresh random bytes.
fn quant_op(
    c: &HtCase,
    wire: QuantWire,
    w: &World,
    hs: &Handles,
    plan: &HtPlan,
    pass: PassDir,
    rng: &mut SplitMix64,
) -> Result<(), String> {
    let n = c.nranks;
    let inp = make_inputs(c, plan, pass, rng);
    let (tb, sb) = (wire.tok_bytes(), wire.scale_bytes());
    let qt: Vec<Vec<u8>> = (0..n).map(|r| random_bytes(rng, plan.num_tokens(r) * tb)).collect();
    let qs: Vec<Vec<u8>> = (0..n).map(|r| random_bytes(rng, plan.num_tokens(r) * sb)).collect();
    let mut ops = Vec::new();
    for r in 0..n {
        let mut op = alloc_op(c, plan, r, &inp, pass)?;
        let (t, rows) = (plan.num_tokens(r), out_rows(plan, r));
        op.tokens = dev(wire.tok, &[t, wire.tok_width])?;
        op.tokens.upload(&qt[r])?;
        op.out = dev(wire.tok, &[rows, wire.tok_width])?;
        poison(&op.out)?;
        let scales = dev(wire.scale, &[t, wire.scale_width])?;
        scales.upload(&qs[r])?;
        let out_scales = dev(wire.scale, &[rows, wire.scale_width])?;
        poison(&out_scales)?;
        ops.push(QuantOp { op, scales, out_scales });
    }
    for r in 0..n {
        quant_dispatch_call(c, hs.0[r], &mut ops[r], &w.streams[r], pass)?;
    }
    for r in 0..n {
        combine_call(hs.0[r], &mut ops[r].op, &w.streams[r], pass)?;
    }
    w.sync()?;
    let got = ops
        .iter()
        .map(|q| Ok((download(&q.op)?, q.out_scales.download::<u8>()?)))
        .collect::<Result<Vec<_>, String>>()?;
    drop(ops);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (inp, qt, qs, got) = (&inp, &qt, &qs, &got[r]);
                sc.spawn(move || -> Result<(), String> {
                    let want = plan.dispatch_quant_fwd(
                        r,
                        &HtQuantFwdIn {
                            token_row_bytes: tb,
                            scale_row_bytes: sb,
                            pass,
                            recv_kind: if c.global_ids {
                                ExpertIdKind::Global
                            } else {
                                ExpertIdKind::Local
                            },
                            tokens: qt,
                            scales: qs,
                            weights: &inp.weights,
                            poison: POISON,
                        },
                        out_rows(plan, r),
                    );
                    let (g, gs) = got;
                    check_bytes(
                        &format!("rank {r} {pass:?} QUANT_FWD tokens"),
                        &g.out,
                        &want.tokens,
                        1,
                        tb,
                    )?;
                    check_bytes(&format!("rank {r} {pass:?} QUANT_FWD scales"), gs, &want.scales, 1, sb)?;
                    if let Some(idx) = &g.out_idx {
                        check_eq(&format!("rank {r} QUANT_FWD topk_idx"), idx, &want.topk_idx)?;
                    }
                    if let Some(wt) = &g.out_w {
                        check_eq(
                            &format!("rank {r} QUANT_FWD topk_weights"),
                            &f32_bits(wt),
                            &f32_bits(&want.topk_weights),
                        )?;
                    }
                    let cw = plan.combine(
                        r,
                        &HtCombineIn {
                            dtype: c.dtype,
                            hidden: c.hidden,
                            pass,
                            tokens: &inp.x,
                            weights: &inp.x_w,
                        },
                    );
                    check_bytes(
                        &format!("rank {r} {pass:?} combine after QUANT_FWD"),
                        &g.comb,
                        &cw.tokens,
                        c.dtype.bytes(),
                        c.hidden,
                    )?;
                    if let Some(wt) = &g.comb_w {
                        check_eq(
                            &format!("rank {r} combine topk_weights"),
                            &f32_bits(wt),
                            &f32_bits(&cw.topk_weights),
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().try_for_each(|h| h.join().unwrap())
    })
}

/// A QUANT_FWD round on a fresh world: routing, handles, forward and backward.
fn quant_round(c: &HtCase, wire: QuantWire, rng: &mut SplitMix64, comm: Option<ncclComm_t>) -> Result<String, String> {
    let t0 = Instant::now();
    // The group's max_token_bytes (4H) holds a token row plus its scales.
    assert!(wire.tok_bytes() + wire.scale_bytes() <= c.hidden * 4, "{wire:?}");
    let routing = gen_world_routing(c, rng);
    let s = pick_budget(c, &routing);
    let cfg = c.group_config(s);
    let w = match comm {
        Some(comm) => World::nccl(comm, &cfg)?,
        None => World::local_n(c.nranks, &cfg)?,
    };
    let plan = HtPlan::new(c.ref_config(s), &routing).map_err(|e| format!("reference: {e:?}"))?;
    let mut rr = routing
        .iter()
        .map(|rt| routing_tensors(c, rt))
        .collect::<Result<Vec<_>, _>>()?;
    let hs = create_handles(c, &w, &mut rr)?;
    w.sync()?;
    check_layout_info(c, &plan, &rr)?;
    quant_op(c, wire, &w, &hs, &plan, PassDir::Forward, rng)?;
    quant_op(c, wire, &w, &hs, &plan, PassDir::Backward, rng)?;
    // A NONE dispatch on the same handle afterwards still moves no scales and works.
    run_op(c, &w, &hs, &plan, PassDir::Forward, rng)?;
    Ok(format!(
        "S {s}, counts {:?}, {:.2} s",
        (0..c.nranks).map(|d| plan.rank(d).count).collect::<Vec<_>>(),
        t0.elapsed().as_secs_f64()
    ))
}

/// The wire pairs: MXFP8 (e4m3 + H/32 uint8), packed FP4 + H/32 uint8 (MXFP4) and + H/16 e4m3
/// (NVFP4-like), e5m2 + fp32 per 128, bf16 + bf16, fp32 + fp16, fp16 + e5m2 (one 16-byte
/// scale row each), over H = 2048 and 7168 (scale rows past one 4 KiB segment included).
fn quant_wires(hidden: usize) -> Vec<QuantWire> {
    use ep_core::enums::dtype as d;
    let q = |tok, tok_width, scale, scale_width| QuantWire {
        tok,
        tok_width,
        scale,
        scale_width,
    };
    vec![
        q(d::FLOAT8E4M3, hidden, d::UINT8, hidden / 32),
        q(d::FLOAT4X2, hidden / 2, d::UINT8, hidden / 32),
        q(d::FLOAT4X2, hidden / 2, d::FLOAT8E4M3, hidden / 16),
        q(d::FLOAT8E5M2, hidden, d::FLOAT32, hidden / 128),
        q(d::BFLOAT16, hidden, d::BFLOAT16, 8),
        q(d::FLOAT32, hidden / 2, d::FLOAT16, 8),
        q(d::FLOAT16, hidden, d::FLOAT8E5M2, 16),
        // A scale row longer than one 4 KiB segment: 1040 fp32 scales (4160 bytes).
        q(d::FLOAT8E4M3, hidden, d::FLOAT32, 1040),
    ]
}

fn run_quant_cases(name: &str, cases: &[(HtCase, QuantWire)], comm: Option<ncclComm_t>) {
    run_rounds(name, 0x9fa7, cases, |(c, wire), rng| quant_round(c, *wire, rng, comm));
}

/// QUANT_FWD on local groups: both layouts, forward and backward, every wire pair, fixed
/// budget, eager mode, DROP and EM alignment; each dispatch followed by a bf16 combine.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ht_quant_fwd_scales_forwarded() {
    let _gpu = require_gpu();
    let mut cases = Vec::new();
    for layout in [Layout::Flat, Layout::ExpertMajor] {
        for (i, wire) in quant_wires(2048).into_iter().enumerate() {
            let nranks = [2, 4, 8][i % 3];
            cases.push((
                HtCase {
                    max_tokens: 300,
                    tokens: None,
                    align: if layout == Layout::ExpertMajor && i % 2 == 0 {
                        64
                    } else {
                        1
                    },
                    idx64: i % 2 == 1,
                    global_ids: i == 3,
                    budget: match i {
                        2 => Budget::Eager,
                        5 => Budget::Drop,
                        _ => Budget::Exact,
                    },
                    routing: if i == 4 {
                        Routing::SameRankDups
                    } else {
                        Routing::Uniform
                    },
                    ..base(nranks, layout)
                },
                wire,
            ));
        }
        // H = 7168 (DeepSeek): MXFP8 and packed FP4 with UE8M0 scales, 4 ranks, 513 tokens.
        for wire in quant_wires(7168).into_iter().take(2) {
            cases.push((
                HtCase {
                    hidden: 7168,
                    ..base(4, layout)
                },
                wire,
            ));
        }
    }
    run_quant_cases("ht_quant_fwd_scales_forwarded", &cases, None);
}
