#![allow(clippy::needless_range_loop, clippy::too_many_arguments)]
//! Dispatch and combine on real NCCL communicators, checked against the CPU reference on every
//! rank: one rank per GPU (issue 7), or several processes on one GPU (NCCL >= 2.30 with
//! `NCCL_MULTI_RANK_GPU_ENABLE=1`; the processes time-slice the GPU, so this checks
//! correctness, not speed, and runs our CUDA IPC path between processes for real).
//!
//! Two ways to run it:
//! - **one process per rank**: the launcher sets the rank and world size (`EP_RANK`/`EP_WORLD`,
//!   or `mpirun`'s `OMPI_COMM_WORLD_*` / `PMI_*`; no MPI library is used). Rank 0 writes the NCCL
//!   unique id into `EP_BOOTSTRAP_DIR`, every rank reads it and calls `ncclCommInitRank` on
//!   device `local rank % visible devices` (tests/gpu/multi.rs). `scripts/multi_gpu.sh DIR N`
//!   does all of this;
//! - **one process, one thread per GPU** (no launcher variables): `ncclCommInitAll` over every
//!   visible GPU (`EP_MULTI_GPUS=n` takes the first n); with one GPU that is a 1-rank world.
//!
//! Each rank creates its groups on the communicator with `ncclEpCreateGroup` and runs the same
//! steps in the same order. Every rank regenerates every rank's routing, tokens, expert outputs
//! and weights from a shared seed, so each one can compute the whole world's reference and
//! compare its own outputs with it: nothing but the library's own traffic crosses ranks.
//! Groups are destroyed explicitly at the end of each step (`Group::destroy`: collective when
//! ranks span processes); a failing step leaves its group alone, so that the failing rank never
//! waits in a destroy barrier its peers will not reach.
//!
//! Steps (`STEPS`): LL matrix (both layouts, K 1/2/8, H 2048/7168, T 0/1/B/random, uniform,
//! skewed and duplicate-expert routings, int32/int64 ids, local/global ids), LL send_only +
//! ncclEpComplete, two handles interleaved on one group, AUTO growth (`ll_growth`: a handle
//! with a larger top-k grows the buffer while an older handle lives, then rounds on both;
//! `ht_growth`), LL dispatch quantisation recipes (`ll_quant`: QUANT_FWD and DS_FP8E3M4, both
//! layouts, then an ordinary combine), LL CUDA-graph replays, LL masks (`ll_mask_silent`: one rank skips a
//! dispatch, the others time out on it, mask it and finish, then ncclEpMaskClean; `ll_mask_host`:
//! every rank masks the last with ncclEpMaskUpdate and it sits one pair out), LL NVFP4
//! combine (`ll_nvfp4`, bit for bit against the reference), HT
//! rounds (FLAT and EXPERT_MAJOR, bf16/fp16/fp32, forward and backward, alignment, QUANT_FWD),
//! HT CUDA-graph replays (`ht_graph_replays`: update + dispatch + combine captured once, both
//! layouts), and zero-copy (`ll_zero_copy`,
//! `ht_zero_copy`: tensors in symmetric NCCL windows under zero_copy AUTO and ON,
//! tests/gpu_multi/zero_copy.rs; NCCL >= 2.29). With `NCCL_EP_NODE_SIZE=k < N`
//! (docs/MULTINODE.md; `MULTI_GPU_NODE_SIZE=k scripts/multi_gpu.sh`) the same LL and HT steps
//! (`ht_rounds`, `ht_growth`, `ht_graph_replays`) run with every rank outside a block of k as a
//! remote one (LL: staging; HT: mirrors of the remote ranks' buffers; both moved by NCCL
//! point-to-point, on the caller's stream, so graph capture takes them in too). Opt-in and alone:
//! `EP_MULTI_ONLY=mask_kill` (`ll_mask_kill`: one process kills itself with SIGKILL before its
//! dispatch; the others finish without it; tests/gpu_multi/masks.rs).
//!
//! Environment: `EP_MULTI_QUICK=1` (fewer LL matrix rounds), `EP_MULTI_ONLY=a,b` (steps whose
//! name contains one of these), `EP_MULTI_SEED`, `EP_MULTI_KEEP_GOING=1` (go on after a mismatch;
//! default: the first mismatch ends the process with status 1, its peers then time out),
//! `EP_MULTI_TIMEOUT_S` (default 900: the process exits 124 when still running),
//! `EP_MULTI_MASK_SLACK_MS`, `EP_MULTI_KILL_RANK`, plus those of tests/gpu/multi.rs. Each rank
//! ends with one line `RESULT rank r/N: PASS|FAIL ...`. `multi_gpu` is `#[ignore]`d (it needs
//! an NVIDIA GPU and libnccl.so.2) and fails without them: scripts/multi_gpu.sh runs the binary
//! with `--include-ignored`. `bootstrap_helpers` needs no GPU and always runs.

#[path = "gpu_multi/growth.rs"]
mod growth;
#[path = "gpu/harness.rs"]
mod harness;
#[path = "gpu_multi/masks.rs"]
mod masks;
#[path = "gpu/multi.rs"]
mod multi;
#[path = "gpu/quant.rs"]
mod quant;
#[path = "gpu_multi/zero_copy.rs"]
mod zero_copy;

use ep_core::enums::{DType, ExpertIdKind, Layout, OverflowPolicy, PassDir, dtype};
use ep_reference::ht::{
    HtCombineIn, HtConfig, HtDispatchIn, HtDispatchOut, HtDtype, HtPlan, HtQuantFwdIn, HtRankMeta, random_bytes,
    random_tokens,
};
use ep_reference::ll::*;
use harness::*;
use multi::*;
use nccl_ep::abi::group::{ncclEpCreateGroup, ncclEpGroupDestroy};
use nccl_ep::abi::guard::struct_default;
use nccl_ep::abi::handle::{ncclEpCreateHandle, ncclEpHandleDestroy, ncclEpUpdateHandle};
use nccl_ep::abi::ops::{ncclEpCombine, ncclEpDispatch};
use nccl_ep::abi::types::*;
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// One rank

#[derive(Clone, Debug)]
struct Opts {
    quick: bool,
    keep_going: bool,
    seed: u64,
    only: Vec<String>,
}

/// The opt-in step that kills a process (`EP_MULTI_ONLY` must name it exactly).
const KILL_STEP: &str = "mask_kill";

impl Opts {
    fn from_env() -> Opts {
        let flag = |n: &str| std::env::var(n).is_ok_and(|v| v == "1");
        Opts {
            quick: flag("EP_MULTI_QUICK"),
            keep_going: flag("EP_MULTI_KEEP_GOING"),
            seed: std::env::var("EP_MULTI_SEED")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2026),
            only: std::env::var("EP_MULTI_ONLY")
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        }
    }

    /// `EP_MULTI_ONLY` names the kill step: it runs alone (it leaves the communicator with a
    /// dead member).
    fn kill(&self) -> bool {
        self.only.iter().any(|o| o == KILL_STEP)
    }
}

/// What one rank knows about itself.
struct Rank<'a> {
    rank: usize,
    world: usize,
    device: i32,
    comm: ncclComm_t,
    nccl: &'a NcclLib,
    opts: &'a Opts,
    who: String,
    /// One process per rank (else one thread per rank in this process).
    process: bool,
}

impl Rank<'_> {
    /// The same random stream on every rank, one per (step, part).
    fn rng(&self, step: &str, part: u64) -> SplitMix64 {
        let h = step.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, c| {
            (h ^ c as u64).wrapping_mul(0x100_0000_01b3)
        });
        SplitMix64::new(self.opts.seed ^ h ^ part.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
    fn barrier(&self) -> Result<(), String> {
        self.nccl.sum_i64(self.comm, self.device, &[0]).map(|_| ())
    }
}

/// Rounds passed, failed and skipped on one rank.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: Vec<String>,
    skipped: Vec<String>,
}

impl Tally {
    /// Records one round: `bad` holds its mismatches. Unless EP_MULTI_KEEP_GOING=1 the first
    /// failing round ends the step (an Err the runner turns into the process's exit).
    fn record(&mut self, r: &Rank, what: &str, bad: Vec<String>) -> Result<(), String> {
        if bad.is_empty() {
            self.passed += 1;
            return Ok(());
        }
        let msg = format!("{what}: {}", bad.join("; "));
        println!("{}: FAILED {msg}", r.who);
        self.failed.push(msg.clone());
        if r.opts.keep_going {
            Ok(())
        } else {
            Err(format!("mismatch (EP_MULTI_KEEP_GOING=1 goes on): {msg}"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Library objects with destructors

/// This rank's EP group. `destroy` destroys it (collective when the ranks span processes);
/// dropped without it (a failing step) it is left alone.
struct Group(ncclEpGroup_t);

impl Group {
    fn new(r: &Rank, cfg: &ncclEpGroupConfig_t) -> Result<Group, String> {
        let mut g = std::ptr::null_mut();
        // SAFETY: writes one group to the live local `g`; `r.comm` is this rank's live
        // communicator and `cfg` the caller's live config.
        ep_ok!(unsafe { ncclEpCreateGroup(&mut g, r.comm, cfg) });
        Ok(Group(g))
    }

    /// `ncclEpGroupDestroy`, every handle of the group destroyed first.
    fn destroy(self) -> Result<(), String> {
        // SAFETY: `self.0` came from `Group::new`; `self` is consumed, so it is destroyed once;
        // the library checks it against its live set.
        ep_ok!(unsafe { ncclEpGroupDestroy(self.0) });
        Ok(())
    }
}

struct Handle(ncclEpHandle_t);

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: `self.0` came from the library and is destroyed once, here; the library checks
        // it against its live set (so a handle outliving its group gets an error, not a crash).
        unsafe { ncclEpHandleDestroy(self.0) };
    }
}

fn ll_handle(c: &Case, g: &Group, b: &mut RankBufs, s: &Stream) -> Result<Handle, String> {
    let mut h = std::ptr::null_mut();
    // SAFETY: writes one handle to the live local `h`; `g.0` is live (`Group::destroy` takes the
    // group by value); the top-k descriptor (and its sizes) is boxed in `b` and its device
    // buffer owned by `b`; config and layout info may be NULL; the stream is live.
    ep_ok!(unsafe {
        ncclEpCreateHandle(
            &mut h,
            g.0,
            ncclEpLayout_t(c.layout.raw()),
            b.topk.ptr(),
            std::ptr::null(),
            std::ptr::null(),
            s.raw(),
        )
    });
    Ok(Handle(h))
}

// ---------------------------------------------------------------------------------------------
// Low-latency rounds, one rank's share

fn ll_case(r: &Rank, layout: Layout, hidden: usize) -> Case {
    let n = r.world;
    Case {
        nranks: n,
        local_experts: 4.max(8usize.div_ceil(n)),
        max_tokens: 64,
        hidden,
        topk: 8,
        tokens: None,
        layout,
        routing: Routing::Uniform,
        send_only: false,
        idx64: true,
        global_ids: false,
        seed: 1,
    }
}

/// Every rank's expert outputs (bf16 bits, the full x tensor) and EM combine weights [T_r, K].
fn combine_inputs(c: &Case, world: &LlWorld, rng: &mut SplitMix64) -> CombineInputs {
    let (n, l, b, h) = (c.nranks, c.local_experts, c.max_tokens, c.hidden);
    let rows = match c.layout {
        Layout::ExpertMajor => l * n * b,
        _ => n * b,
    };
    let mut xs = Vec::with_capacity(n);
    let mut ws = Vec::with_capacity(n);
    for inp in &world.ranks {
        xs.push(
            (0..rows * h)
                .map(|_| f32_to_bf16_rne(rng.unit_f32() * 4.0 - 2.0))
                .collect(),
        );
        ws.push((0..inp.num_tokens * c.topk).map(|_| rng.unit_f32()).collect());
    }
    (xs, ws)
}

fn upload_combine_inputs(b: &RankBufs, me: usize, xs: &[Vec<u16>], ws: &[Vec<f32>]) -> Result<(), String> {
    b.x.upload(&xs[me])?;
    b.comb_w.upload(&ws[me])
}

/// This rank's dispatch outputs against the reference with rank masks `links`
/// (`LlLinks::all` without masks): the mismatches (empty when equal).
fn check_dispatch_rank(
    c: &Case,
    world: &LlWorld,
    me: usize,
    b: &RankBufs,
    links: &LlLinks,
) -> Result<Vec<String>, String> {
    let kind = if c.global_ids {
        ExpertIdKind::Global
    } else {
        ExpertIdKind::Local
    };
    let want = ll_dispatch_ref_masked(
        world,
        c.layout,
        kind,
        LlPoison {
            token: POISON_TOKEN,
            weight: POISON_WEIGHT,
        },
        links,
    );
    let w = &want[me];
    let mut bad = Vec::new();
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            bad.push(e);
        }
    };
    note(compare("dispatch tokens", &b.out.download::<u16>()?, w.tokens()));
    match w {
        LlDispatchOut::ExpertMajor { expert_counters, .. } => {
            note(compare(
                "expert_counters",
                &b.counters.download::<i32>()?,
                expert_counters,
            ));
        }
        LlDispatchOut::RankMajor {
            topk_idx,
            topk_weights,
            src_rank_counters,
            ..
        } => {
            note(compare(
                "src_rank_counters",
                &b.counters.download::<i32>()?,
                src_rank_counters,
            ));
            note(compare(
                "topk_idx",
                &b.out_idx.as_ref().unwrap().download::<i32>()?,
                topk_idx,
            ));
            let gw: Vec<u32> = b
                .out_w
                .as_ref()
                .unwrap()
                .download::<f32>()?
                .iter()
                .map(|f| f.to_bits())
                .collect();
            let ww: Vec<u32> = topk_weights.iter().map(|f| f.to_bits()).collect();
            note(compare("topk_weights", &gw, &ww));
        }
    }
    Ok(bad)
}

fn check_combine_rank(
    c: &Case,
    world: &LlWorld,
    me: usize,
    b: &RankBufs,
    xs: &[Vec<u16>],
    ws: &[Vec<f32>],
    links: &LlLinks,
) -> Result<Vec<String>, String> {
    let input = match c.layout {
        Layout::ExpertMajor => LlCombineIn::ExpertMajor { x: xs, weights: ws },
        _ => LlCombineIn::RankMajor { y: xs },
    };
    let want = ll_combine_ref_masked(world, input, links);
    Ok(compare_bf16_close("combine", &b.comb_out.download::<u16>()?, &want[me])
        .err()
        .into_iter()
        .collect())
}

/// One LL round on this rank: inputs, handle, dispatch (+ complete), check, combine
/// (+ complete), check. Err: a call failed (the rank cannot go on).
fn ll_round(r: &Rank, g: &Group, s: &Stream, c: &Case, rng: &mut SplitMix64) -> Result<Vec<String>, String> {
    let me = r.rank;
    let world = c.world(rng);
    let mut b = alloc_rank(c, r.device, world.ranks[me].num_tokens)?;
    load_inputs(c, &b, &world.ranks[me])?;
    let h = ll_handle(c, g, &mut b, s)?;
    dispatch(c, h.0, &mut b, s, c.send_only)?;
    if c.send_only {
        complete(h.0, s)?;
    }
    s.sync()?;
    let all = LlLinks::all(r.world);
    let mut bad = check_dispatch_rank(c, &world, me, &b, &all)?;
    let (xs, ws) = combine_inputs(c, &world, rng);
    upload_combine_inputs(&b, me, &xs, &ws)?;
    combine(c, h.0, &mut b, s, c.send_only)?;
    if c.send_only {
        complete(h.0, s)?;
    }
    s.sync()?;
    bad.extend(check_combine_rank(c, &world, me, &b, &xs, &ws, &all)?);
    Ok(bad)
}

fn round_name(c: &Case) -> String {
    format!(
        "{:?} H={} K={} T={} {:?}{}{}{}",
        c.layout,
        c.hidden,
        c.topk,
        c.tokens.map_or("rand".into(), |t| t.to_string()),
        c.routing,
        if c.idx64 { " i64" } else { " i32" },
        if c.global_ids { " global" } else { "" },
        if c.send_only { " send_only" } else { "" }
    )
}

/// LL: both layouts x K {1, 2, 8} x H {2048, 7168} x T {0, 1, B, random} x routings.
fn ll_matrix(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let n = r.world;
    for hidden in [2048, 7168] {
        let c0 = ll_case(r, Layout::ExpertMajor, hidden);
        let g = Group::new(r, &c0.group_config())?;
        let s = Stream::new(r.device)?;
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            let mut rng = r.rng("ll_matrix", hidden as u64 * 10 + layout.raw() as u64);
            let mut c = ll_case(r, layout, hidden);
            let routings = [Routing::Uniform, Routing::Skewed { rank: n - 1 }, Routing::SameRankDups];
            let mut i = 0usize;
            for topk in [1, 2, 8] {
                for tokens in [Some(0), Some(1), Some(c.max_tokens), None] {
                    let pick: Vec<Routing> = if r.opts.quick {
                        vec![routings[i % 3]]
                    } else {
                        routings.to_vec()
                    };
                    for routing in pick {
                        c.topk = topk;
                        c.tokens = tokens;
                        c.routing = routing;
                        c.idx64 = i.is_multiple_of(2);
                        c.global_ids = topk == 2;
                        i += 1;
                        let bad = ll_round(r, &g, &s, &c, &mut rng)?;
                        t.record(r, &format!("ll_matrix {}", round_name(&c)), bad)?;
                    }
                }
            }
        }
        g.destroy()?;
        r.barrier()?;
    }
    Ok(())
}

/// LL send_only + ncclEpComplete, random token counts, both layouts.
fn ll_send_only(r: &Rank, t: &mut Tally) -> Result<(), String> {
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let mut c = ll_case(r, layout, 2048);
        c.send_only = true;
        let g = Group::new(r, &c.group_config())?;
        let s = Stream::new(r.device)?;
        let mut rng = r.rng("ll_send_only", layout.raw() as u64);
        for i in 0..4 {
            c.routing = [Routing::Uniform, Routing::SameRankDups][i % 2];
            let bad = ll_round(r, &g, &s, &c, &mut rng)?;
            t.record(r, &format!("ll_send_only {}", round_name(&c)), bad)?;
        }
        g.destroy()?;
        r.barrier()?;
    }
    Ok(())
}

/// LL NVFP4 combine (NCCL_EP_COMB_QUANT_NVFP4, software conversion on Hopper): both layouts,
/// H 7168, K 1 and 8, random token counts, duplicate experts; every rank's combined rows bit for
/// bit as the CPU reference (ll_combine_nvfp4_ref), from expert outputs of per-row magnitudes
/// with some all-zero rows (global scale 0).
fn ll_nvfp4(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let me = r.rank;
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let mut c = ll_case(r, layout, 7168);
        let g = Group::new(r, &c.group_config())?;
        let s = Stream::new(r.device)?;
        let mut rng = r.rng("ll_nvfp4", layout.raw() as u64);
        for i in 0..4 {
            c.topk = [1, 8][i % 2];
            c.routing = [Routing::Uniform, Routing::SameRankDups][i / 2];
            c.send_only = i == 3;
            let world = c.world(&mut rng);
            let mut b = alloc_rank(&c, r.device, world.ranks[me].num_tokens)?;
            load_inputs(&c, &b, &world.ranks[me])?;
            let h = ll_handle(&c, &g, &mut b, &s)?;
            dispatch(&c, h.0, &mut b, &s, c.send_only)?;
            if c.send_only {
                complete(h.0, &s)?;
            }
            s.sync()?;
            let all = LlLinks::all(r.world);
            let mut bad = check_dispatch_rank(&c, &world, me, &b, &all)?;
            // Every rank's expert outputs: per-row magnitudes, one row in eight all zero.
            let (xs, ws) = combine_inputs(&c, &world, &mut rng);
            let h_el = c.hidden;
            let xs: Vec<Vec<u16>> = xs
                .into_iter()
                .map(|x| {
                    x.chunks(h_el)
                        .flat_map(|row| {
                            let k = rng.below(8);
                            let m = 2f32.powi(rng.below(24) as i32 - 12);
                            row.iter()
                                .map(move |&v| if k == 0 { 0 } else { f32_to_bf16_rne(bf16_to_f32(v) * m) })
                                .collect::<Vec<_>>()
                        })
                        .collect()
                })
                .collect();
            let ss: Vec<Vec<f32>> = xs
                .iter()
                .map(|x| x.chunks(h_el).map(nvfp4_global_scale).collect())
                .collect();
            upload_combine_inputs(&b, me, &xs, &ws)?;
            let dims = match layout {
                Layout::ExpertMajor => vec![c.local_experts, c.nranks * c.max_tokens, 1],
                _ => vec![c.nranks, c.max_tokens, 1],
            };
            let mut st = tensor(r, dtype::FLOAT32, &dims)?;
            st.upload(&ss[me])?;
            b.comb_out.fill(POISON_TOKEN)?;
            let mut inp: ncclEpCombineInputs_t = struct_default();
            let mut out: ncclEpCombineOutputs_t = struct_default();
            let mut cfg: ncclEpCombineConfig_t = struct_default();
            cfg.send_only = c.send_only as u32;
            cfg.quant_recipe = ncclEpCombQuant_t(1);
            inp.tokens = b.x.ptr();
            inp.scales = st.ptr();
            out.tokens = b.comb_out.ptr();
            if layout == Layout::ExpertMajor {
                out.topk_weights = b.comb_w.ptr();
            }
            // SAFETY: live local structs; the descriptors are boxed in `b` and `st` with their
            // sizes, their device buffers outlive the queued work (synchronised below); `h` is
            // a live handle, `s` a live stream.
            ep_ok!(unsafe { ncclEpCombine(h.0, &inp, &out, &cfg, s.raw()) });
            if c.send_only {
                complete(h.0, &s)?;
            }
            s.sync()?;
            let input = match layout {
                Layout::ExpertMajor => LlCombineIn::ExpertMajor { x: &xs, weights: &ws },
                _ => LlCombineIn::RankMajor { y: &xs },
            };
            let mut rcp = GpuRcp::default();
            rcp.for_scales(r.device, &ss.concat())?;
            let want = ll_combine_nvfp4_ref_masked(&world, input, &ss, &all, &|x| rcp.get(x));
            if let Err(e) = compare("NVFP4 combine", &b.comb_out.download::<u16>()?, &want[me]) {
                bad.push(e);
            }
            drop(h);
            t.record(r, &format!("ll_nvfp4 {}", round_name(&c)), bad)?;
        }
        g.destroy()?;
        r.barrier()?;
    }
    Ok(())
}

/// Two handles of different layout and top-k on one group, D(A) D(B) C(A) C(B); creating B
/// (K = 8 after K = 2) grows the AUTO buffer, which is collective.
fn ll_two_handles(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let me = r.rank;
    let a = Case {
        topk: 2,
        ..ll_case(r, Layout::ExpertMajor, 2048)
    };
    let bc = Case {
        topk: 8,
        ..ll_case(r, Layout::RankMajor, 2048)
    };
    let g = Group::new(r, &a.group_config())?;
    let s = Stream::new(r.device)?;
    let mut rng = r.rng("ll_two_handles", 0);
    for i in 0..3 {
        let wa = a.world(&mut rng);
        let wb = bc.world(&mut rng);
        let mut ba = alloc_rank(&a, r.device, wa.ranks[me].num_tokens)?;
        let mut bb = alloc_rank(&bc, r.device, wb.ranks[me].num_tokens)?;
        load_inputs(&a, &ba, &wa.ranks[me])?;
        load_inputs(&bc, &bb, &wb.ranks[me])?;
        let ha = ll_handle(&a, &g, &mut ba, &s)?;
        let hb = ll_handle(&bc, &g, &mut bb, &s)?;
        dispatch(&a, ha.0, &mut ba, &s, false)?;
        dispatch(&bc, hb.0, &mut bb, &s, false)?;
        s.sync()?;
        let all = LlLinks::all(r.world);
        let mut bad = check_dispatch_rank(&a, &wa, me, &ba, &all)?;
        bad.extend(check_dispatch_rank(&bc, &wb, me, &bb, &all)?);
        let (xa, wa_) = combine_inputs(&a, &wa, &mut rng);
        let (xb, wb_) = combine_inputs(&bc, &wb, &mut rng);
        upload_combine_inputs(&ba, me, &xa, &wa_)?;
        upload_combine_inputs(&bb, me, &xb, &wb_)?;
        combine(&a, ha.0, &mut ba, &s, false)?;
        combine(&bc, hb.0, &mut bb, &s, false)?;
        s.sync()?;
        bad.extend(check_combine_rank(&a, &wa, me, &ba, &xa, &wa_, &all)?);
        bad.extend(check_combine_rank(&bc, &wb, me, &bb, &xb, &wb_, &all)?);
        t.record(r, &format!("ll_two_handles round {i}"), bad)?;
    }
    g.destroy()?;
    r.barrier()
}

/// A CUDA graph captured from this rank's stream (RELAXED mode) and instantiated; the graph
/// calls run in the device's context, held current for the graph's life.
struct Captured {
    graph: cudarc::driver::sys::CUgraph,
    exec: cudarc::driver::sys::CUgraphExec,
    _ctx: nccl_ep::cuda::context::CtxGuard,
}

impl Captured {
    /// Captures what `body` queues on `s`; the capture is ended even when `body` fails.
    fn new(r: &Rank, s: &Stream, body: impl FnOnce() -> Result<(), String>) -> Result<Captured, String> {
        use cudarc::driver::sys;
        let ctx = nccl_ep::cuda::context::CtxGuard::enter(r.device).map_err(|e| e.msg)?;
        let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        cu(
            // SAFETY: `s` is this rank's live stream on `r.device`, whose context is current.
            unsafe { sys::cuStreamBeginCapture_v2(s.0, mode) },
            "cuStreamBeginCapture",
        )?;
        let captured = body();
        let mut graph = std::ptr::null_mut();
        let ended = cu(
            // SAFETY: ends the capture begun above on `s`; writes one graph to the local `graph`.
            unsafe { sys::cuStreamEndCapture(s.0, &mut graph) },
            "cuStreamEndCapture",
        );
        captured?;
        ended?;
        let mut exec = std::ptr::null_mut();
        let made = cu(
            // SAFETY: `graph` is the graph just captured (both checked above); writes one
            // executable graph to the local `exec`.
            unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) },
            "cuGraphInstantiate",
        );
        if let Err(e) = made {
            // SAFETY: the graph made above, destroyed once, here.
            unsafe { sys::cuGraphDestroy(graph) };
            return Err(e);
        }
        Ok(Captured { graph, exec, _ctx: ctx })
    }

    fn launch(&self, s: &Stream) -> Result<(), String> {
        // SAFETY: `exec` is live until `destroy`; `s` is live and its context current.
        cu(
            unsafe { cudarc::driver::sys::cuGraphLaunch(self.exec, s.0) },
            "cuGraphLaunch",
        )
    }

    /// Destroys the graph after the replays that gave `res`; their error comes first.
    fn finish(self, res: Result<(), String>) -> Result<(), String> {
        let freed = self.destroy();
        res.and(freed)
    }

    /// Destroys the executable graph and the graph; the caller synchronised every launch (the
    /// driver lets queued launches finish before it releases an executable graph anyway).
    fn destroy(self) -> Result<(), String> {
        use cudarc::driver::sys;
        // SAFETY: both were made by `new` and are destroyed once, here (self is consumed).
        let freed = unsafe { (sys::cuGraphExecDestroy(self.exec), sys::cuGraphDestroy(self.graph)) };
        cu(freed.0, "cuGraphExecDestroy")?;
        cu(freed.1, "cuGraphDestroy")
    }
}

/// This rank's dispatch + combine captured once in a CUDA graph, replayed with new tokens,
/// routing and expert outputs each time (all ranks replay in step); every replay is checked.
fn ll_graph_replays(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let me = r.rank;
    let replays = if r.opts.quick { 10 } else { 30 };
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let c = Case {
            tokens: Some(32),
            ..ll_case(r, layout, 2048)
        };
        let g = Group::new(r, &c.group_config())?;
        let s = Stream::new(r.device)?;
        let mut rng = r.rng("ll_graph_replays", layout.raw() as u64);
        let first = c.world(&mut rng);
        let mut b = alloc_rank(&c, r.device, 32)?;
        load_inputs(&c, &b, &first.ranks[me])?;
        let h = ll_handle(&c, &g, &mut b, &s)?;
        // One plain round first: compiles and loads the kernels outside the capture.
        dispatch(&c, h.0, &mut b, &s, false)?;
        combine(&c, h.0, &mut b, &s, false)?;
        s.sync()?;
        let graph = Captured::new(r, &s, || {
            dispatch(&c, h.0, &mut b, &s, false).and_then(|_| combine(&c, h.0, &mut b, &s, false))
        })?;
        let mut run = || -> Result<(), String> {
            for i in 0..replays {
                let world = c.world(&mut rng);
                load_inputs(&c, &b, &world.ranks[me])?;
                let (xs, ws) = combine_inputs(&c, &world, &mut rng);
                upload_combine_inputs(&b, me, &xs, &ws)?;
                // The handle, buffers and group the graph uses outlive it.
                graph.launch(&s)?;
                s.sync()?;
                let all = LlLinks::all(r.world);
                let mut bad = check_dispatch_rank(&c, &world, me, &b, &all)?;
                bad.extend(check_combine_rank(&c, &world, me, &b, &xs, &ws, &all)?);
                t.record(r, &format!("ll_graph_replays {layout:?} replay {i}"), bad)?;
            }
            Ok(())
        };
        let res = run();
        graph.finish(res)?;
        drop(h);
        g.destroy()?;
        r.barrier()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// High-throughput rounds (docs/HT.md), one rank's share

const HT_POISON: u8 = 0xA5;
const HT_B: usize = 64;

#[derive(Clone, Copy, Debug)]
struct HtCase {
    layout: Layout,
    dt: HtDtype,
    hidden: usize,
    topk: usize,
    /// EXPERT_MAJOR `dispatch_output_per_expert_alignment` (0: none).
    align: usize,
    tokens: Option<usize>,
    routing: Routing,
    global_ids: bool,
    idx64: bool,
    /// Dispatch with NCCL_EP_DISP_QUANT_FWD: random e4m3 token bytes `[T, H]` and H/32 uint8
    /// (UE8M0) scales instead of `dt` tokens (the combine stays `dt`).
    quant_fwd: bool,
    /// After the forward pass, a backward dispatch and a backward combine (with weights) on
    /// the same handle.
    backward: bool,
}

/// The HT group every HT round uses: B = 64, max_token_bytes for fp32 rows of 2048 and bf16 rows
/// of 7168, S large enough for any routing (so TRAP never fires).
fn ht_group(r: &Rank) -> (ncclEpGroupConfig_t, usize, usize) {
    let n = r.world;
    let l = 4.max(8usize.div_ceil(n));
    let budget = (n * HT_B * l.min(8) + l * 16).next_multiple_of(64);
    let mut c: ncclEpGroupConfig_t = struct_default();
    c.version = 2;
    c.algorithm = ncclEpAlgorithm_t(1);
    c.num_experts = (n * l) as u32;
    c.max_dispatch_tokens_per_rank = HT_B as u32;
    c.max_recv_tokens_per_rank = budget as u32;
    c.max_token_bytes = 14336;
    c.timeout_ns = 20_000_000_000;
    (c, l, budget)
}

fn not_implemented(e: &str) -> bool {
    e.contains("not implemented")
}

/// What an HT round reports: mismatches, or that the library has no HT yet.
enum HtOutcome {
    Checked(Vec<String>),
    NotImplemented(String),
}

fn tensor(r: &Rank, dt: DType, sizes: &[usize]) -> Result<DevTensor, String> {
    DevTensor::new(r.device, dt, sizes)
}

fn ht_round(
    r: &Rank,
    g: &Group,
    s: &Stream,
    l: usize,
    budget: usize,
    c: &HtCase,
    rng: &mut SplitMix64,
) -> Result<HtOutcome, String> {
    ht_round_windowed(r, g, s, l, budget, c, rng, None)
}

/// Every rank's inputs of one HT forward round, drawn from the shared stream (so every rank
/// draws the same).
struct HtInputs {
    /// Tokens of each rank.
    ts: Vec<usize>,
    routing: Vec<Vec<i64>>,
    tokens: Vec<Vec<u8>>,
    weights: Vec<Vec<f32>>,
    /// Expert outputs `[S, H]` for the combine.
    xs: Vec<Vec<u8>>,
    /// QUANT_FWD: raw e4m3 token rows of H bytes and H/32 uint8 scales (else empty).
    qtok: Vec<Vec<u8>>,
    qsc: Vec<Vec<u8>>,
}

fn ht_inputs(r: &Rank, l: usize, budget: usize, c: &HtCase, rng: &mut SplitMix64) -> HtInputs {
    let (n, k, h) = (r.world, c.topk, c.hidden);
    let shape = LlShape {
        nranks: n,
        num_experts: n * l,
        max_tokens: HT_B,
        hidden: h,
        topk: k,
    };
    let ts: Vec<usize> = (0..n)
        .map(|_| c.tokens.unwrap_or_else(|| rng.below(HT_B + 1)))
        .collect();
    let routing: Vec<Vec<i64>> = ts.iter().map(|&t| gen_routing(rng, shape, t, c.routing)).collect();
    let tokens: Vec<Vec<u8>> = ts.iter().map(|&t| random_tokens(rng, c.dt, t, h)).collect();
    let weights: Vec<Vec<f32>> = ts
        .iter()
        .map(|&t| (0..t * k).map(|_| rng.unit_f32()).collect())
        .collect();
    let xs: Vec<Vec<u8>> = (0..n).map(|_| random_tokens(rng, c.dt, budget, h)).collect();
    let sw = h / 32;
    let (qtok, qsc): (Vec<Vec<u8>>, Vec<Vec<u8>>) = if c.quant_fwd {
        (
            ts.iter().map(|&t| random_bytes(rng, t * h)).collect(),
            ts.iter().map(|&t| random_bytes(rng, t * sw)).collect(),
        )
    } else {
        (Vec::new(), Vec::new())
    };
    HtInputs {
        ts,
        routing,
        tokens,
        weights,
        xs,
        qtok,
        qsc,
    }
}

/// The CPU reference of the whole group's routing.
fn ht_plan(r: &Rank, l: usize, budget: usize, c: &HtCase, routing: &[Vec<i64>]) -> Result<HtPlan, String> {
    let cfg = HtConfig {
        nranks: r.world,
        num_experts: r.world * l,
        topk: c.topk,
        layout: c.layout,
        alignment: c.align,
        budget,
        policy: OverflowPolicy::Trap,
    };
    HtPlan::new(cfg, routing).map_err(|e| format!("test bug: the reference rejects the routing: {e:?}"))
}

/// The forward dispatch this rank must receive (not QUANT_FWD).
fn ht_dispatch_want(c: &HtCase, plan: &HtPlan, me: usize, inp: &HtInputs, budget: usize) -> HtDispatchOut {
    plan.dispatch(
        me,
        &HtDispatchIn {
            dtype: c.dt,
            hidden: c.hidden,
            pass: PassDir::Forward,
            recv_kind: if c.global_ids {
                ExpertIdKind::Global
            } else {
                ExpertIdKind::Local
            },
            tokens: &inp.tokens,
            weights: &inp.weights,
            poison: HT_POISON,
        },
        budget,
    )
}

/// This rank's routing (`topk_idx`) and the `layout_info` outputs of its handle's metadata pass.
struct HtRouting {
    topk: DevTensor,
    counters: DevTensor,
    offsets: DevTensor,
    total: DevTensor,
}

impl HtRouting {
    fn new(r: &Rank, c: &HtCase, l: usize, routing: &[i64]) -> Result<HtRouting, String> {
        let em = c.layout == Layout::ExpertMajor;
        let x = HtRouting {
            topk: tensor(
                r,
                if c.idx64 { dtype::INT64 } else { dtype::INT32 },
                &[routing.len() / c.topk, c.topk],
            )?,
            counters: tensor(r, if em { dtype::INT64 } else { dtype::INT32 }, &[l])?,
            offsets: tensor(r, dtype::INT64, &[l])?,
            total: tensor(r, dtype::INT64, &[1])?,
        };
        x.load(c, routing)?;
        Ok(x)
    }

    /// Uploads `routing` (as many rows as allocated) and poisons the outputs, so that a metadata
    /// pass that writes nothing shows.
    fn load(&self, c: &HtCase, routing: &[i64]) -> Result<(), String> {
        if c.idx64 {
            self.topk.upload(routing)?;
        } else {
            self.topk
                .upload(&routing.iter().map(|&x| x as i32).collect::<Vec<_>>())?;
        }
        self.counters.fill(HT_POISON)?;
        self.offsets.fill(HT_POISON)?;
        self.total.fill(HT_POISON)
    }

    fn info(&mut self, c: &HtCase) -> ncclEpLayoutInfo_t {
        let mut li: ncclEpLayoutInfo_t = struct_default();
        li.expert_counters = self.counters.ptr();
        li.recv_total_counter = self.total.ptr();
        if c.layout == Layout::ExpertMajor {
            li.expert_offsets = self.offsets.ptr();
        }
        li
    }

    /// The `layout_info` outputs against the reference's `meta` of this rank.
    fn check(&self, c: &HtCase, meta: &HtRankMeta) -> Result<Vec<String>, String> {
        let em = c.layout == Layout::ExpertMajor;
        let mut bad = Vec::new();
        let want_c: Vec<i64> = meta.expert_counters.iter().map(|&x| x as i64).collect();
        let got_c: Vec<i64> = if em {
            self.counters.download::<i64>()?
        } else {
            self.counters.download::<i32>()?.iter().map(|&x| x as i64).collect()
        };
        bad.extend(compare("layout_info expert_counters", &got_c, &want_c).err());
        if em {
            let want_o: Vec<i64> = meta.expert_offsets.iter().map(|&x| x as i64).collect();
            bad.extend(compare("layout_info expert_offsets", &self.offsets.download::<i64>()?, &want_o).err());
        }
        bad.extend(
            compare(
                "layout_info recv_total_counter",
                &self.total.download::<i64>()?,
                &[meta.recv_total as i64],
            )
            .err(),
        );
        Ok(bad)
    }
}

/// `ncclEpCreateHandle` of an HT round on `rt`'s routing and outputs (queued on `s`). Ok(Err):
/// the library has no HT yet.
fn ht_handle(g: &Group, c: &HtCase, rt: &mut HtRouting, s: &Stream) -> Result<Result<Handle, String>, String> {
    let li = rt.info(c);
    let mut hc: ncclEpHandleConfig_t = struct_default();
    hc.dispatch_output_per_expert_alignment = c.align;
    let mut hp = std::ptr::null_mut();
    // SAFETY: writes one handle to the live local `hp`; `g.0` is a live group; `li` and `hc` are
    // live locals; the descriptors and device buffers belong to `rt`, which the caller keeps past
    // the queued work; the stream is live.
    let rc = unsafe {
        ncclEpCreateHandle(
            &mut hp,
            g.0,
            ncclEpLayout_t(c.layout.raw()),
            rt.topk.ptr(),
            &li,
            &hc,
            s.raw(),
        )
    };
    if rc != 0 {
        let e = last_error();
        if not_implemented(&e) {
            return Ok(Err(e));
        }
        return Err(format!("ncclEpCreateHandle (HT) returned {rc}: {e}"));
    }
    Ok(Ok(Handle(hp)))
}

/// This rank's tensors of one HT forward dispatch + combine.
struct HtFwd {
    in_tok: DevTensor,
    in_w: DevTensor,
    in_sc: DevTensor,
    out_tok: DevTensor,
    out_sc: DevTensor,
    out_idx: DevTensor,
    out_w: DevTensor,
    /// Combine inputs: this rank's expert outputs `[S, H]`.
    cx: DevTensor,
    cout: DevTensor,
}

impl HtFwd {
    /// For `t` tokens of this rank and `budget` (S) receive rows.
    fn new(r: &Rank, c: &HtCase, t: usize, budget: usize) -> Result<HtFwd, String> {
        let (k, h, sw) = (c.topk, c.hidden, c.hidden / 32);
        let nd = c.dt.nccl();
        let td = if c.quant_fwd { dtype::FLOAT8E4M3 } else { nd };
        Ok(HtFwd {
            in_tok: tensor(r, td, &[t, h])?,
            in_w: tensor(r, dtype::FLOAT32, &[t, k])?,
            in_sc: tensor(r, dtype::UINT8, &[t, sw])?,
            out_tok: tensor(r, td, &[budget, h])?,
            out_sc: tensor(r, dtype::UINT8, &[budget, sw])?,
            out_idx: tensor(r, dtype::INT64, &[budget, k])?,
            out_w: if c.layout == Layout::ExpertMajor {
                tensor(r, dtype::FLOAT32, &[budget])?
            } else {
                tensor(r, dtype::FLOAT32, &[budget, k])?
            },
            cx: tensor(r, nd, &[budget, h])?,
            cout: tensor(r, nd, &[t, h])?,
        })
    }

    /// Uploads rank `me`'s share of `inp` and poisons every output.
    fn load(&self, c: &HtCase, inp: &HtInputs, me: usize) -> Result<(), String> {
        self.in_tok
            .upload(if c.quant_fwd { &inp.qtok[me] } else { &inp.tokens[me] })?;
        self.in_w.upload(&inp.weights[me])?;
        self.out_tok.fill(HT_POISON)?;
        if c.quant_fwd {
            self.in_sc.upload(&inp.qsc[me])?;
            self.out_sc.fill(HT_POISON)?;
        }
        self.out_idx.fill(HT_POISON)?;
        self.out_w.fill(HT_POISON)?;
        self.cx.upload(&inp.xs[me])?;
        self.cout.fill(HT_POISON)
    }

    /// Queues the forward dispatch on `s`.
    fn dispatch(&mut self, c: &HtCase, hd: &Handle, s: &Stream) -> Result<(), String> {
        let mut di: ncclEpDispatchInputs_t = struct_default();
        let mut dout: ncclEpDispatchOutputs_t = struct_default();
        let mut dli: ncclEpLayoutInfo_t = struct_default();
        let mut dcfg: ncclEpDispatchConfig_t = struct_default();
        if c.quant_fwd {
            dcfg.quant_recipe = ncclEpDispQuant_t(1);
            di.scales = self.in_sc.ptr();
            dout.scales = self.out_sc.ptr();
        }
        di.tokens = self.in_tok.ptr();
        di.topk_weights = self.in_w.ptr();
        dout.tokens = self.out_tok.ptr();
        dout.topk_weights = self.out_w.ptr();
        if c.layout != Layout::ExpertMajor {
            dout.topk_idx = self.out_idx.ptr();
        }
        dli.recv_topk_idx_kind = ncclEpExpertIdKind_t(if c.global_ids { 2 } else { 1 });
        // SAFETY: the four structs are live locals and every tensor pointer a live descriptor of
        // `self`, read during the call; their device buffers belong to `self`, which the caller
        // keeps past the queued work (and every replay of a graph that captured it); `hd.0` is a
        // live handle, `s` a live stream (the C contract of ncclEpDispatch).
        ep_ok!(unsafe { ncclEpDispatch(hd.0, &di, &dout, &dli, &dcfg, s.raw()) });
        Ok(())
    }

    /// Queues the forward combine of `cx` on `s`.
    fn combine(&mut self, hd: &Handle, s: &Stream) -> Result<(), String> {
        let mut ci: ncclEpCombineInputs_t = struct_default();
        let mut co: ncclEpCombineOutputs_t = struct_default();
        let ccfg: ncclEpCombineConfig_t = struct_default();
        ci.tokens = self.cx.ptr();
        co.tokens = self.cout.ptr();
        // SAFETY: as for the dispatch: live local structs and descriptors, buffers of `self` that
        // outlive the queued work, a live handle and stream (the C contract of ncclEpCombine).
        ep_ok!(unsafe { ncclEpCombine(hd.0, &ci, &co, &ccfg, s.raw()) });
        Ok(())
    }

    /// The dispatch outputs against `want`: tokens byte for byte, weights bit for bit, and FLAT's
    /// topk_idx.
    fn check_dispatch(&self, c: &HtCase, want: &HtDispatchOut) -> Result<Vec<String>, String> {
        let mut bad = Vec::new();
        bad.extend(compare("HT dispatch tokens", &self.out_tok.download::<u8>()?, &want.tokens).err());
        let gw: Vec<u32> = self.out_w.download::<f32>()?.iter().map(|f| f.to_bits()).collect();
        let ww: Vec<u32> = want.topk_weights.iter().map(|f| f.to_bits()).collect();
        bad.extend(compare("HT dispatch topk_weights", &gw, &ww).err());
        if c.layout != Layout::ExpertMajor {
            bad.extend(compare("HT dispatch topk_idx", &self.out_idx.download::<i64>()?, &want.topk_idx).err());
        }
        Ok(bad)
    }

    /// The combined tokens against the reference of every rank's expert outputs `xs`.
    fn check_combine(&self, c: &HtCase, plan: &HtPlan, me: usize, xs: &[Vec<u8>]) -> Result<Vec<String>, String> {
        let want = plan.combine(
            me,
            &HtCombineIn {
                dtype: c.dt,
                hidden: c.hidden,
                pass: PassDir::Forward,
                tokens: xs,
                weights: &[],
            },
        );
        Ok(compare("HT combine tokens", &self.cout.download::<u8>()?, &want.tokens)
            .err()
            .into_iter()
            .collect())
    }
}

/// `ht_round`, with dispatch `outputs->tokens` and combine `inputs->tokens` in an NCCL window
/// when `zc` is given (tests/gpu_multi/zero_copy.rs).
#[allow(clippy::too_many_arguments)]
fn ht_round_windowed(
    r: &Rank,
    g: &Group,
    s: &Stream,
    l: usize,
    budget: usize,
    c: &HtCase,
    rng: &mut SplitMix64,
    zc: Option<&zero_copy::HtWindows>,
) -> Result<HtOutcome, String> {
    let (me, h) = (r.rank, c.hidden);
    let inp = ht_inputs(r, l, budget, c, rng);
    let plan = ht_plan(r, l, budget, c, &inp.routing)?;

    // Handle: routing + layout_info outputs.
    let mut rt = HtRouting::new(r, c, l, &inp.routing[me])?;
    let hd = match ht_handle(g, c, &mut rt, s)? {
        Ok(hd) => hd,
        Err(e) => return Ok(HtOutcome::NotImplemented(e)),
    };
    s.sync()?;
    let mut bad = rt.check(c, plan.rank(me))?;

    // Dispatch (forward).
    let mut f = HtFwd::new(r, c, inp.ts[me], budget)?;
    f.load(c, &inp, me)?;
    if let Some(z) = zc {
        z.bind(r, &mut f.out_tok)?;
    }
    f.dispatch(c, &hd, s)?;
    s.sync()?;
    if let Some(z) = zc {
        z.unbind(r, &mut f.out_tok)?;
    }
    let want = if c.quant_fwd {
        let q = plan.dispatch_quant_fwd(
            me,
            &HtQuantFwdIn {
                token_row_bytes: h,
                scale_row_bytes: h / 32,
                pass: PassDir::Forward,
                recv_kind: if c.global_ids {
                    ExpertIdKind::Global
                } else {
                    ExpertIdKind::Local
                },
                tokens: &inp.qtok,
                scales: &inp.qsc,
                weights: &inp.weights,
                poison: HT_POISON,
            },
            budget,
        );
        bad.extend(compare("HT QUANT_FWD dispatch scales", &f.out_sc.download::<u8>()?, &q.scales).err());
        HtDispatchOut {
            tokens: q.tokens,
            topk_idx: q.topk_idx,
            topk_weights: q.topk_weights,
        }
    } else {
        ht_dispatch_want(c, &plan, me, &inp, budget)
    };
    bad.extend(f.check_dispatch(c, &want)?);

    // Combine (forward): every rank's expert outputs [S, H]; rows past count are not read.
    if let Some(z) = zc {
        z.bind(r, &mut f.cx)?;
    }
    f.combine(&hd, s)?;
    s.sync()?;
    if let Some(z) = zc {
        z.unbind(r, &mut f.cx)?;
    }
    bad.extend(f.check_combine(c, &plan, me, &inp.xs)?);
    if c.backward {
        bad.extend(ht_backward(r, &hd, s, budget, c, &plan, &inp.ts, rng)?);
    }
    drop(hd);
    Ok(HtOutcome::Checked(bad))
}

/// The backward pass of an HT round on its handle: a backward dispatch of fresh tokens, then a
/// backward combine of fresh expert outputs and weights (FLAT `[S, K]`, EM `[S]`), every output
/// poisoned first and checked against the reference (the tokens, and the weights bit for bit).
#[allow(clippy::too_many_arguments)]
fn ht_backward(
    r: &Rank,
    hd: &Handle,
    s: &Stream,
    budget: usize,
    c: &HtCase,
    plan: &HtPlan,
    ts: &[usize],
    rng: &mut SplitMix64,
) -> Result<Vec<String>, String> {
    let (n, me, k, h) = (r.world, r.rank, c.topk, c.hidden);
    let em = c.layout == Layout::ExpertMajor;
    let nd = c.dt.nccl();
    let wrow = if em { 1 } else { k };
    // Every rank's inputs, from the shared stream.
    let tokens: Vec<Vec<u8>> = ts.iter().map(|&t| random_tokens(rng, c.dt, t, h)).collect();
    let xs: Vec<Vec<u8>> = (0..n).map(|_| random_tokens(rng, c.dt, budget, h)).collect();
    let ws: Vec<Vec<f32>> = (0..n)
        .map(|_| (0..budget * wrow).map(|_| rng.unit_f32()).collect())
        .collect();
    let t = ts[me];
    let mut bad = Vec::new();
    let mut note = |r: Result<(), String>| {
        if let Err(e) = r {
            bad.push(e);
        }
    };

    let mut in_tok = tensor(r, nd, &[t, h])?;
    in_tok.upload(&tokens[me])?;
    let mut out_tok = tensor(r, nd, &[budget, h])?;
    out_tok.fill(HT_POISON)?;
    let mut di: ncclEpDispatchInputs_t = struct_default();
    let mut dout: ncclEpDispatchOutputs_t = struct_default();
    let dli: ncclEpLayoutInfo_t = struct_default();
    let mut dcfg: ncclEpDispatchConfig_t = struct_default();
    dcfg.pass_direction = ncclEpPassDir_t(1);
    di.tokens = in_tok.ptr();
    dout.tokens = out_tok.ptr();
    // SAFETY: the four structs are live locals and every tensor pointer a live descriptor of this
    // function, read during the call; their device buffers live past the `s.sync()` below;
    // `hd.0` is a live handle, `s` a live stream (the C contract of ncclEpDispatch).
    ep_ok!(unsafe { ncclEpDispatch(hd.0, &di, &dout, &dli, &dcfg, s.raw()) });
    s.sync()?;
    let want = plan.dispatch(
        me,
        &HtDispatchIn {
            dtype: c.dt,
            hidden: h,
            pass: PassDir::Backward,
            recv_kind: ExpertIdKind::Local,
            tokens: &tokens,
            weights: &[],
            poison: HT_POISON,
        },
        budget,
    );
    note(compare(
        "HT backward dispatch tokens",
        &out_tok.download::<u8>()?,
        &want.tokens,
    ));

    let mut cx = tensor(r, nd, &[budget, h])?;
    cx.upload(&xs[me])?;
    let mut cw = if em {
        tensor(r, dtype::FLOAT32, &[budget])?
    } else {
        tensor(r, dtype::FLOAT32, &[budget, k])?
    };
    cw.upload(&ws[me])?;
    let mut cout = tensor(r, nd, &[t, h])?;
    cout.fill(HT_POISON)?;
    let mut cout_w = tensor(r, dtype::FLOAT32, &[t, k])?;
    cout_w.fill(HT_POISON)?;
    let mut ci: ncclEpCombineInputs_t = struct_default();
    let mut co: ncclEpCombineOutputs_t = struct_default();
    let mut ccfg: ncclEpCombineConfig_t = struct_default();
    ccfg.pass_direction = ncclEpPassDir_t(1);
    ci.tokens = cx.ptr();
    ci.topk_weights = cw.ptr();
    co.tokens = cout.ptr();
    co.topk_weights = cout_w.ptr();
    // SAFETY: as for the dispatch: live local structs and descriptors, buffers that live past
    // the `s.sync()` below, a live handle and stream (the C contract of ncclEpCombine).
    ep_ok!(unsafe { ncclEpCombine(hd.0, &ci, &co, &ccfg, s.raw()) });
    s.sync()?;
    let want_c = plan.combine(
        me,
        &HtCombineIn {
            dtype: c.dt,
            hidden: h,
            pass: PassDir::Backward,
            tokens: &xs,
            weights: &ws,
        },
    );
    note(compare(
        "HT backward combine tokens",
        &cout.download::<u8>()?,
        &want_c.tokens,
    ));
    let gw: Vec<u32> = cout_w.download::<f32>()?.iter().map(|f| f.to_bits()).collect();
    let ww: Vec<u32> = want_c.topk_weights.iter().map(|f| f.to_bits()).collect();
    note(compare("HT backward combine topk_weights", &gw, &ww));
    Ok(bad)
}

/// The HT group of step `step`, or None (printed and recorded as skipped, on every rank alike)
/// while the library has no HT.
fn ht_group_or_skip(r: &Rank, t: &mut Tally, cfg: &ncclEpGroupConfig_t, step: &str) -> Result<Option<Group>, String> {
    match Group::new(r, cfg) {
        Ok(g) => Ok(Some(g)),
        Err(e) if not_implemented(&e) => {
            println!("{}: {step} skipped: {e}", r.who);
            t.skipped.push(step.into());
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// HT: FLAT and EXPERT_MAJOR; bf16/fp16/fp32 at H = 2048 (each also backward), bf16 at H = 7168;
/// K 1/2/8; T 0/B/random; EM alignment 0 and 16; QUANT_FWD. Skipped (on every rank alike) while the library has no HT.
fn ht_rounds(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let (cfg, l, budget) = ht_group(r);
    let Some(g) = ht_group_or_skip(r, t, &cfg, "ht_rounds")? else {
        return Ok(());
    };
    let s = Stream::new(r.device)?;
    let mut rng = r.rng("ht_rounds", 0);
    let mut cases = Vec::new();
    for layout in [Layout::Flat, Layout::ExpertMajor] {
        for (i, dt) in HtDtype::ALL.into_iter().enumerate() {
            cases.push(HtCase {
                layout,
                dt,
                hidden: 2048,
                topk: 8,
                align: if layout == Layout::ExpertMajor && i == 1 { 16 } else { 0 },
                tokens: None,
                routing: [Routing::Uniform, Routing::SameRankDups, Routing::Uniform][i],
                global_ids: i == 2,
                idx64: i != 1,
                quant_fwd: false,
                backward: true,
            });
        }
        for (i, topk) in [1usize, 2, 8].into_iter().enumerate() {
            for (j, tokens) in [Some(0), Some(HT_B), None].into_iter().enumerate() {
                cases.push(HtCase {
                    layout,
                    dt: HtDtype::ALL[0],
                    hidden: 7168,
                    topk,
                    align: if layout == Layout::ExpertMajor && j == 2 { 16 } else { 0 },
                    tokens,
                    routing: [
                        Routing::Uniform,
                        Routing::Skewed { rank: r.world - 1 },
                        Routing::SameRankDups,
                    ][(i + j) % 3],
                    global_ids: topk == 2,
                    idx64: j != 1,
                    quant_fwd: false,
                    backward: false,
                });
            }
        }
    }
    // QUANT_FWD (MXFP8-like e4m3 + H/32 UE8M0 scales), both layouts: across processes the
    // scales travel through the staging, after the staged tokens.
    for (i, layout) in [Layout::Flat, Layout::ExpertMajor].into_iter().enumerate() {
        cases.push(HtCase {
            layout,
            dt: HtDtype::Bf16,
            hidden: 7168,
            topk: 8,
            align: if layout == Layout::ExpertMajor { 16 } else { 0 },
            tokens: None,
            routing: Routing::Uniform,
            global_ids: i == 0,
            idx64: true,
            quant_fwd: true,
            backward: false,
        });
    }
    for c in &cases {
        match ht_round(r, &g, &s, l, budget, c, &mut rng)? {
            HtOutcome::NotImplemented(e) => {
                println!("{}: ht_rounds skipped: {e}", r.who);
                t.skipped.push("ht_rounds".into());
                break;
            }
            HtOutcome::Checked(bad) => t.record(r, &format!("ht {c:?}"), bad)?,
        }
    }
    g.destroy()?;
    r.barrier()
}

/// HT forward in a CUDA graph: ncclEpUpdateHandle's metadata pass, the dispatch and the combine
/// captured once on this rank's stream (as tests/gpu_ht.rs `ht_graph_replays` does), replayed
/// with new routing, tokens, weights and expert outputs each time (all ranks replay in step);
/// every replay checked like an HT round. Across "nodes" the capture holds the NCCL send/recv
/// that move the mirrors. Skipped (on every rank alike) while the library has no HT.
fn ht_graph_replays(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let (cfg, l, budget) = ht_group(r);
    let Some(g) = ht_group_or_skip(r, t, &cfg, "ht_graph_replays")? else {
        return Ok(());
    };
    let s = Stream::new(r.device)?;
    for layout in [Layout::Flat, Layout::ExpertMajor] {
        if let Some(e) = ht_graph_layout(r, t, &g, &s, l, budget, layout)? {
            println!("{}: ht_graph_replays skipped: {e}", r.who);
            t.skipped.push("ht_graph_replays".into());
            break;
        }
    }
    g.destroy()?;
    r.barrier()
}

/// `ht_graph_replays` for one layout on group `g`. Some: the library has no HT yet.
fn ht_graph_layout(
    r: &Rank,
    t: &mut Tally,
    g: &Group,
    s: &Stream,
    l: usize,
    budget: usize,
    layout: Layout,
) -> Result<Option<String>, String> {
    let me = r.rank;
    let replays = if r.opts.quick { 10 } else { 30 };
    // T = B on every rank in every replay: the graph holds the tensors' shapes.
    let mut c = HtCase {
        layout,
        dt: HtDtype::Bf16,
        hidden: 2048,
        topk: 8,
        align: if layout == Layout::ExpertMajor { 16 } else { 0 },
        tokens: Some(HT_B),
        routing: Routing::Uniform,
        global_ids: false,
        idx64: true,
        quant_fwd: false,
        backward: false,
    };
    let mut rng = r.rng("ht_graph_replays", layout.raw() as u64);
    let first = ht_inputs(r, l, budget, &c, &mut rng);
    let mut rt = HtRouting::new(r, &c, l, &first.routing[me])?;
    // The handle (and any growth of the group's buffer, collective and host-side) before the
    // capture; the graph re-runs only its metadata pass (ncclEpUpdateHandle).
    let hd = match ht_handle(g, &c, &mut rt, s)? {
        Ok(hd) => hd,
        Err(e) => return Ok(Some(e)),
    };
    let mut f = HtFwd::new(r, &c, HT_B, budget)?;
    f.load(&c, &first, me)?;
    // One plain round first: compiles and loads the kernels outside the capture.
    f.dispatch(&c, &hd, s)?;
    f.combine(&hd, s)?;
    s.sync()?;
    let graph = Captured::new(r, s, || {
        let li = rt.info(&c);
        // SAFETY: `hd.0` is a live handle; `li` is a live local; the descriptors and device
        // buffers belong to `rt`, which outlives every replay of the graph; the stream is live.
        ep_ok!(unsafe { ncclEpUpdateHandle(hd.0, rt.topk.ptr(), &li, s.raw()) });
        f.dispatch(&c, &hd, s)?;
        f.combine(&hd, s)
    })?;
    let mut run = || -> Result<(), String> {
        let routings = [
            Routing::Uniform,
            Routing::SameRankDups,
            Routing::Skewed { rank: r.world - 1 },
        ];
        for i in 0..replays {
            // Any routing fits the handle: the graph's metadata pass reads it afresh.
            c.routing = routings[i % routings.len()];
            let inp = ht_inputs(r, l, budget, &c, &mut rng);
            let plan = ht_plan(r, l, budget, &c, &inp.routing)?;
            rt.load(&c, &inp.routing[me])?;
            f.load(&c, &inp, me)?;
            // The handle, group and the buffers of `rt` and `f` the graph uses outlive it.
            graph.launch(s)?;
            s.sync()?;
            let mut bad = rt.check(&c, plan.rank(me))?;
            bad.extend(f.check_dispatch(&c, &ht_dispatch_want(&c, &plan, me, &inp, budget))?);
            bad.extend(f.check_combine(&c, &plan, me, &inp.xs)?);
            t.record(r, &format!("ht_graph_replays {layout:?} replay {i}"), bad)?;
        }
        Ok(())
    };
    let res = run();
    graph.finish(res)?;
    drop(hd);
    Ok(None)
}

// ---------------------------------------------------------------------------------------------
// Dispatch quantisation recipes

/// LL with QUANT_FWD (E4M3/fp32, FP4x2/UE8M0, MXFP8, E5M2/fp16) and DS_FP8E3M4 (plain and
/// power-of-two scales), both layouts, H = 2048, random token counts: this rank's
/// outputs->tokens and outputs->scales bit for bit against the whole world's reference (every
/// rank regenerates every rank's inputs), then an ordinary combine of bf16 expert outputs.
fn ll_quant(r: &Rank, t: &mut Tally) -> Result<(), String> {
    use quant::*;
    let me = r.rank;
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let mut c = ll_case(r, layout, 2048);
        let g = Group::new(r, &quant_config(&c))?;
        let s = Stream::new(r.device)?;
        let mut rng = r.rng("ll_quant", layout.raw() as u64);
        let fwd = fwd_recipes(c.hidden);
        let recipes = [
            fwd[0],
            fwd[2],
            fwd[1],
            fwd[4],
            Recipe::Ds { round: false },
            Recipe::Ds { round: true },
        ];
        for (i, rec) in recipes.into_iter().enumerate() {
            c.routing = [Routing::Uniform, Routing::SameRankDups][i % 2];
            c.send_only = i % 3 == 2;
            c.global_ids = i % 2 == 1;
            let world = c.world(&mut rng);
            let inp = quant_inputs(&c, &world, rec, &mut rng);
            let mut b = alloc_rank(&c, r.device, world.ranks[me].num_tokens)?;
            load_inputs(&c, &b, &world.ranks[me])?;
            let mut q = load_quant(&c, r.device, rec, &inp, me, world.ranks[me].num_tokens)?;
            let h = ll_handle(&c, &g, &mut b, &s)?;
            dispatch_quant(&c, h.0, &mut b, &mut q, rec, &s, c.send_only)?;
            if c.send_only {
                complete(h.0, &s)?;
            }
            s.sync()?;
            let all = LlLinks::all(r.world);
            let want = quant_ref(&c, &world, rec, &inp, &all);
            let mut bad: Vec<String> = check_quant("this rank", &c, &world, me, &b, &q, &want[me], &all)
                .err()
                .into_iter()
                .collect();
            let (xs, ws) = combine_inputs(&c, &world, &mut rng);
            upload_combine_inputs(&b, me, &xs, &ws)?;
            combine(&c, h.0, &mut b, &s, c.send_only)?;
            if c.send_only {
                complete(h.0, &s)?;
            }
            s.sync()?;
            bad.extend(check_combine_rank(&c, &world, me, &b, &xs, &ws, &all)?);
            drop(h);
            t.record(r, &format!("ll_quant {rec:?} {}", round_name(&c)), bad)?;
        }
        g.destroy()?;
        r.barrier()?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The runner

type StepFn = fn(&Rank, &mut Tally) -> Result<(), String>;

/// Every rank runs these in this order (a step's collectives must line up across ranks).
const STEPS: &[(&str, StepFn)] = &[
    ("ll_matrix", ll_matrix),
    ("ll_quant", ll_quant),
    ("ll_nvfp4", ll_nvfp4),
    ("ll_send_only", ll_send_only),
    ("ll_two_handles", ll_two_handles),
    ("ll_growth", growth::ll_growth),
    ("ll_graph_replays", ll_graph_replays),
    ("ll_mask_silent", masks::ll_mask_silent),
    ("ll_mask_host", masks::ll_mask_host),
    ("ht_rounds", ht_rounds),
    ("ht_graph_replays", ht_graph_replays),
    ("ht_growth", growth::ht_growth),
    ("ll_zero_copy", zero_copy::ll_zero_copy),
    ("ht_zero_copy", zero_copy::ht_zero_copy),
];

/// Runs every step on one rank; prints its summary and the group-wide totals. Err: this rank
/// could not go on (the caller ends the process).
fn run_rank(r: &Rank) -> Result<Tally, String> {
    let mut t = Tally::default();
    let kill: &[(&str, StepFn)] = &[("ll_mask_kill", masks::ll_mask_kill)];
    for &(name, step) in if r.opts.kill() { kill } else { STEPS } {
        if !r.opts.only.is_empty() && !r.opts.only.iter().any(|o| name.contains(o.as_str())) {
            continue;
        }
        let start = Instant::now();
        let before = (t.passed, t.failed.len());
        step(r, &mut t).map_err(|e| format!("{name}: {e}"))?;
        println!(
            "{}: {name}: {} rounds passed, {} failed ({:.1} s)",
            r.who,
            t.passed - before.0,
            t.failed.len() - before.1,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(t)
}

/// Whole-group totals (collective; not after the kill step, whose communicator has a dead
/// member: then this rank's own), then this rank's RESULT line. True when this rank passed.
fn report(r: &Rank, t: &Tally) -> bool {
    let mine = [t.passed as i64, t.failed.len() as i64, t.skipped.len() as i64];
    let sums = if r.opts.kill() {
        Ok(mine.to_vec())
    } else {
        r.nccl.sum_i64(r.comm, r.device, &mine)
    };
    let all = match &sums {
        Ok(_) if r.opts.kill() => format!("no group totals: rank {} is dead by design", masks::kill_rank(r.world)),
        Ok(v) => format!(
            "all {} ranks: {} passed, {} failed, {} skipped",
            r.world, v[0], v[1], v[2]
        ),
        Err(e) => format!("group totals unavailable: {e}"),
    };
    let ok = t.failed.is_empty() && sums.as_ref().is_ok_and(|v| v[1] == 0);
    println!(
        "RESULT {}: {} ({} rounds passed, {} failed, {} skipped{}; {all})",
        r.who,
        if ok { "PASS" } else { "FAIL" },
        t.passed,
        t.failed.len(),
        t.skipped.len(),
        if t.skipped.is_empty() {
            String::new()
        } else {
            format!(": {}", t.skipped.join(", "))
        }
    );
    ok
}

fn fail_now(who: &str, e: &str) -> ! {
    println!("{who}: ERROR {e}");
    println!("RESULT {who}: FAIL ({e})");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // Peers wait for this rank on the GPU and in NCCL: ending the process lets them time out
    // (the groups' timeouts, EP_MULTI_TIMEOUT_S) instead of tearing down half-way here. _exit:
    // the teardown NCCL and CUDA do at exit could wait for those peers in turn.
    // SAFETY: _exit takes any status and does not return; skipping destructors and exit
    // handlers is the point, and the output is flushed above.
    unsafe { libc::_exit(1) };
}

fn watchdog_secs() -> u64 {
    std::env::var("EP_MULTI_TIMEOUT_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(900)
}

/// One process = one rank (the launcher said so).
fn process_mode(nccl: &NcclLib, l: &Launch, opts: &Opts) -> bool {
    let ndev = nccl_ep::cuda::driver::device_count().unwrap_or(0);
    let device = (l.local_rank % ndev as usize) as i32;
    let who = format!("rank {}/{}", l.rank, l.world);
    start_watchdog(watchdog_secs(), who.clone());
    println!(
        "{who}: pid {}, local rank {}, device {device} of {ndev}, one process per rank ({}), NCCL {} from {}",
        std::process::id(),
        l.local_rank,
        l.source,
        nccl.version,
        nccl.path
    );
    if let Err(e) = check_nccl(nccl, l.world, ndev as usize) {
        fail_now(&who, &e);
    }
    let comm = (|| -> Result<ncclComm_t, String> {
        let dir = bootstrap_dir(l.world)?;
        let path = id_path(&dir, "gpu_multi");
        if l.rank == 0 {
            publish_id(&path, &nccl.unique_id()?)?;
        }
        let id = read_id(&path, bootstrap_timeout())?;
        let start = Instant::now();
        let comm = nccl.init_rank(l.world, id, l.rank, device)?;
        // Every rank has joined (the init is collective), so nobody needs the file any more: a
        // later run reusing the directory cannot pick up this stale id.
        if l.rank == 0 {
            let _ = std::fs::remove_file(&path);
        }
        println!(
            "{who}: ncclCommInitRank done in {:.2} s (id from {})",
            start.elapsed().as_secs_f64(),
            path.display()
        );
        Ok(comm)
    })()
    .unwrap_or_else(|e| fail_now(&who, &e));
    let r = Rank {
        rank: l.rank,
        world: l.world,
        device,
        comm,
        nccl,
        opts,
        who: who.clone(),
        process: true,
    };
    let t = run_rank(&r).unwrap_or_else(|e| fail_now(&who, &e));
    let ok = report(&r, &t);
    if opts.kill() {
        // ncclCommDestroy, and the teardown NCCL and CUDA do at exit, would deal with a dead
        // member: end the process here, with the status the RESULT line says.
        println!("{who}: exiting without destroying the communicator (a member is dead)");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: as in `fail_now`: _exit ends the process without the teardown, on purpose.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    } else if let Err(e) = nccl.destroy(comm, device) {
        println!("{who}: {e}");
    }
    ok
}

/// The NCCL of this run can do what the launch asks: ranks sharing a GPU need NCCL >= 2.30
/// with `NCCL_MULTI_RANK_GPU_ENABLE=1`, and the library under test must have resolved the same
/// NCCL as this test (`EP_NCCL_LIB`), not another libnccl.so.2 on the loader path.
fn check_nccl(nccl: &NcclLib, world: usize, ndev: usize) -> Result<(), String> {
    let lib = nccl_ep::transport::nccl::Nccl::get().map_err(|e| e.msg)?;
    if lib.runtime_version() != nccl.version {
        return Err(format!(
            "the library under test uses NCCL {} but {} is NCCL {}: point EP_NCCL_LIB and LD_LIBRARY_PATH at one NCCL",
            lib.runtime_version(),
            nccl.path,
            nccl.version
        ));
    }
    if ndev > 0 && world > ndev {
        let per_gpu = world.div_ceil(ndev);
        if nccl.version < 23000 {
            return Err(format!(
                "{world} ranks on {ndev} GPU(s) ({per_gpu} per GPU) need NCCL >= 2.30 (this is {}): build it (docs/BUILDING.md) and set EP_NCCL_LIB",
                nccl.version
            ));
        }
        if std::env::var("NCCL_MULTI_RANK_GPU_ENABLE").as_deref() != Ok("1") {
            return Err(format!(
                "{world} ranks on {ndev} GPU(s) need NCCL_MULTI_RANK_GPU_ENABLE=1 (scripts/multi_gpu.sh sets it)"
            ));
        }
    }
    Ok(())
}

/// One process, one thread per GPU, communicators from ncclCommInitAll.
fn threads_mode(nccl: &NcclLib, opts: &Opts) -> bool {
    let mut ndev = nccl_ep::cuda::driver::device_count().unwrap_or(0) as usize;
    if let Some(n) = std::env::var("EP_MULTI_GPUS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        ndev = ndev.min(n.max(1));
    }
    start_watchdog(watchdog_secs(), format!("gpu_multi ({ndev} threads)"));
    println!(
        "gpu_multi: one process, {ndev} thread(s), ncclCommInitAll over devices 0..{ndev}, NCCL {} from {}",
        nccl.version, nccl.path
    );
    let comms = nccl
        .init_all(ndev)
        .unwrap_or_else(|e| fail_now(&format!("rank 0/{ndev}"), &e));
    let comm_addrs: Vec<usize> = comms.iter().map(|&c| c as usize).collect();
    let oks: Vec<bool> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..ndev)
            .map(|i| {
                let comm_addr = comm_addrs[i];
                sc.spawn(move || {
                    let comm = comm_addr as ncclComm_t;
                    let who = format!("rank {i}/{ndev} (thread)");
                    let r = Rank {
                        rank: i,
                        world: ndev,
                        device: i as i32,
                        comm,
                        nccl,
                        opts,
                        who: who.clone(),
                        process: false,
                    };
                    let t = run_rank(&r).unwrap_or_else(|e| fail_now(&who, &e));
                    report(&r, &t)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(false)).collect()
    });
    for (i, &c) in comms.iter().enumerate() {
        if let Err(e) = nccl.destroy(c, i as i32) {
            println!("rank {i}: {e}");
        }
    }
    oks.iter().all(|&x| x)
}

#[test]
#[ignore = "needs NVIDIA GPUs and libnccl.so.2: scripts/multi_gpu.sh, or cargo test -- --include-ignored"]
fn multi_gpu() {
    let launch = launch_from_env().unwrap_or_else(|e| panic!("{e}"));
    if let (Some(l), Some(why)) = (&launch, no_gpu_reason()) {
        // scripts/multi_gpu.sh reads this line from each rank's log.
        println!(
            "RESULT rank {}/{}: FAIL (no usable CUDA device: {why})",
            l.rank, l.world
        );
    }
    let _gpu = require_gpu();
    // NVLink SHARP (multicast) stays off on shared machines unless the caller decided.
    if std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
        // SAFETY: set before NCCL is loaded, while this test is the only thread reading the
        // environment.
        unsafe { std::env::set_var("NCCL_NVLS_ENABLE", "0") };
    }
    let nccl = NcclLib::open().unwrap_or_else(|e| panic!("{e}"));
    let opts = Opts::from_env();
    let ok = match &launch {
        Some(l) => process_mode(&nccl, l, &opts),
        None => threads_mode(&nccl, &opts),
    };
    assert!(ok, "gpu_multi failed (see the RESULT lines)");
}

/// The launcher-variable parsing and the unique-id file exchange, with no GPU.
#[test]
fn bootstrap_helpers() {
    use std::collections::HashMap;
    let launch = |vars: &[(&str, &str)]| {
        let m: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        launch_from(&|n| m.get(n).cloned())
    };
    assert_eq!(launch(&[]), Ok(None));
    let l = launch(&[("EP_RANK", "2"), ("EP_WORLD", "4")]).unwrap().unwrap();
    assert_eq!((l.rank, l.world, l.local_rank), (2, 4, 2));
    let l = launch(&[
        ("OMPI_COMM_WORLD_RANK", "5"),
        ("OMPI_COMM_WORLD_SIZE", "8"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!((l.rank, l.world, l.local_rank, l.source), (5, 8, 1, "Open MPI"));
    let l = launch(&[("PMI_RANK", "0"), ("PMI_SIZE", "1")]).unwrap().unwrap();
    assert_eq!((l.rank, l.world, l.source), (0, 1, "PMI"));
    // EP_* wins over the launcher's variables.
    let l = launch(&[
        ("EP_RANK", "1"),
        ("EP_WORLD", "2"),
        ("PMI_RANK", "0"),
        ("PMI_SIZE", "1"),
    ])
    .unwrap()
    .unwrap();
    assert_eq!((l.rank, l.world), (1, 2));
    assert!(launch(&[("EP_RANK", "2"), ("EP_WORLD", "2")]).is_err());
    assert!(launch(&[("EP_RANK", "0")]).is_err());
    assert!(launch(&[("EP_RANK", "x"), ("EP_WORLD", "2")]).is_err());

    // Rank 0 publishes late; three readers poll and all get the same bytes.
    let dir = std::env::temp_dir().join(format!("gpu_multi-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = id_path_tagged(&dir, "t", "run/1");
    assert!(path.file_name().unwrap().to_str().unwrap() == "t.run_1.id");
    let mut id = UniqueId([0; 128]);
    for (i, b) in id.0.iter_mut().enumerate() {
        *b = i as u8 ^ 0x5a;
    }
    let got: Vec<UniqueId> = std::thread::scope(|sc| {
        let readers: Vec<_> = (0..3)
            .map(|_| sc.spawn(|| read_id(&path, std::time::Duration::from_secs(10)).unwrap()))
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(100));
        publish_id(&path, &id).unwrap();
        readers.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(got.iter().all(|g| g.0 == id.0));
    std::fs::remove_file(&path).unwrap();
    let e = read_id(&path, std::time::Duration::from_millis(50)).err().unwrap();
    assert!(e.contains("no NCCL unique id"), "{e}");
    std::fs::write(&path, b"short").unwrap();
    assert!(read_id(&path, std::time::Duration::from_millis(50)).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
