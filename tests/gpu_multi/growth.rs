//! AUTO buffer growth on a communicator (a child of tests/gpu_multi.rs): a group's first handle
//! sizes the buffer, a later handle with a larger top-k grows it (collectively: every rank
//! agrees, closes its IPC mappings of the old buffers, waits for the others, then frees and
//! re-exchanges), and the handle created before the growth keeps working beside the new one.

use super::*;
use nccl_ep::abi::handle::{ncclEpInitHandle, ncclEpUpdateHandle};

/// An LL handle without routing (`ncclEpInitHandle`) with buffers for B tokens; each round
/// reshapes them and routes the handle with `ncclEpUpdateHandle`.
struct Routed {
    case: Case,
    h: Handle,
    b: RankBufs,
}

fn routed(r: &Rank, g: &Group, case: Case) -> Result<Routed, String> {
    let mut h = std::ptr::null_mut();
    // SAFETY: writes one handle to the live local `h`; `g.0` is live (`Group::destroy` takes the
    // group by value); config and handle memory may be NULL.
    ep_ok!(unsafe {
        ncclEpInitHandle(
            &mut h,
            g.0,
            ncclEpLayout_t(case.layout.raw()),
            std::ptr::null(),
            case.topk as i32,
            std::ptr::null(),
        )
    });
    let h = Handle(h);
    let b = alloc_rank(&case, r.device, case.max_tokens)?;
    Ok(Routed { case, h, b })
}

/// This round's inputs of one handle: every rank's world (from the shared stream), this rank's
/// uploads, poisoned outputs, the handle's new routing, and every rank's combine inputs.
struct Staged {
    world: LlWorld,
    xs: Vec<Vec<u16>>,
    ws: Vec<Vec<f32>>,
}

fn stage(r: &Rank, rt: &mut Routed, s: &Stream, rng: &mut SplitMix64) -> Result<Staged, String> {
    let world = rt.case.world(rng);
    let me = r.rank;
    reshape_rank(&rt.case, &mut rt.b, world.ranks[me].num_tokens);
    load_inputs(&rt.case, &rt.b, &world.ranks[me])?;
    // SAFETY: `rt.h` is a live handle; the top-k descriptor and its device buffer belong to
    // `rt.b`; layout info may be NULL; `s` is a live stream.
    ep_ok!(unsafe { ncclEpUpdateHandle(rt.h.0, rt.b.topk.ptr(), std::ptr::null(), s.raw()) });
    let (xs, ws) = combine_inputs(&rt.case, &world, rng);
    Ok(Staged { world, xs, ws })
}

/// Dispatches on every handle in order, checks, combines in order, checks.
fn round(r: &Rank, s: &Stream, rts: &mut [&mut Routed], rng: &mut SplitMix64) -> Result<Vec<String>, String> {
    let me = r.rank;
    let all = LlLinks::all(r.world);
    let mut staged = Vec::new();
    for rt in rts.iter_mut() {
        staged.push(stage(r, rt, s, rng)?);
    }
    for rt in rts.iter_mut() {
        dispatch(&rt.case, rt.h.0, &mut rt.b, s, false)?;
    }
    s.sync()?;
    let mut bad = Vec::new();
    for (rt, st) in rts.iter().zip(&staged) {
        bad.extend(check_dispatch_rank(&rt.case, &st.world, me, &rt.b, &all)?);
        upload_combine_inputs(&rt.b, me, &st.xs, &st.ws)?;
    }
    for rt in rts.iter_mut() {
        combine(&rt.case, rt.h.0, &mut rt.b, s, false)?;
    }
    s.sync()?;
    for (rt, st) in rts.iter().zip(&staged) {
        bad.extend(check_combine_rank(
            &rt.case, &st.world, me, &rt.b, &st.xs, &st.ws, &all,
        )?);
    }
    Ok(bad)
}

/// LL: handle A (EXPERT_MAJOR, K = 1) sizes the buffer; one round on A. Handle B (RANK_MAJOR,
/// K = 8) grows it while A is alive; three rounds D(A) D(B) C(A) C(B) with new routing and
/// token counts each. Handle C (EXPERT_MAJOR, K = 4) fits: a round on C and A.
pub fn ll_growth(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let base = ll_case(r, Layout::ExpertMajor, 2048);
    let g = Group::new(r, &base.group_config())?;
    let s = Stream::new(r.device)?;
    let mut rng = r.rng("ll_growth", 0);
    let mut a = routed(r, &g, Case { topk: 1, ..base })?;
    let bad = round(r, &s, &mut [&mut a], &mut rng)?;
    t.record(r, "ll_growth A (K=1) before the growth", bad)?;
    let mut b = routed(
        r,
        &g,
        Case {
            topk: 8,
            layout: Layout::RankMajor,
            routing: Routing::SameRankDups,
            ..base
        },
    )?;
    for i in 0..3 {
        let bad = round(r, &s, &mut [&mut a, &mut b], &mut rng)?;
        t.record(
            r,
            &format!("ll_growth A (K=1) + B (K=8) after the growth, round {i}"),
            bad,
        )?;
    }
    let mut c = routed(
        r,
        &g,
        Case {
            topk: 4,
            idx64: false,
            ..base
        },
    )?;
    let bad = round(r, &s, &mut [&mut c, &mut a], &mut rng)?;
    t.record(r, "ll_growth C (K=4, fits) + A", bad)?;
    drop((a, b, c));
    g.destroy()?;
    r.barrier()
}

/// HT: K = 1 FLAT sizes the buffer, K = 8 EXPERT_MAJOR (alignment 16) grows it, K = 2 FLAT fits.
pub fn ht_growth(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let (cfg, l, budget) = ht_group(r);
    let g = Group::new(r, &cfg)?;
    let s = Stream::new(r.device)?;
    let mut rng = r.rng("ht_growth", 0);
    let case = |layout, topk, align, tokens, routing| HtCase {
        layout,
        dt: HtDtype::ALL[0],
        hidden: 2048,
        topk,
        align,
        tokens,
        routing,
        global_ids: false,
        idx64: true,
        quant_fwd: false,
        backward: false,
    };
    let cases = [
        case(Layout::Flat, 1, 0, Some(HT_B), Routing::Uniform),
        case(Layout::ExpertMajor, 8, 16, None, Routing::SameRankDups),
        case(Layout::Flat, 2, 0, None, Routing::Skewed { rank: r.world - 1 }),
    ];
    for (i, c) in cases.iter().enumerate() {
        match ht_round(r, &g, &s, l, budget, c, &mut rng)? {
            HtOutcome::Checked(bad) => t.record(r, &format!("ht_growth step {i} {c:?}"), bad)?,
            HtOutcome::NotImplemented(e) => return Err(format!("HT answered 'not implemented': {e}")),
        }
    }
    g.destroy()?;
    r.barrier()
}
