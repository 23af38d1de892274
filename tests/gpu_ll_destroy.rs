#![allow(clippy::needless_range_loop)]
//! `ncclEpHandleDestroy` with a `send_only` operation pending, on a real GPU (local groups of
//! 2 and 4 ranks, both layouts), checked against the CPU reference with poisoned outputs. The
//! pending operation is keyed by the handle's id and dropped with the handle: before that, a
//! destroyed handle's pending operation refused every later dispatch on the group ("pending"),
//! and a new handle at the old address could complete it. Needs a GPU:
//! `cargo test --release --test gpu_ll_destroy -- --ignored --test-threads=1 --nocapture`.

#[path = "gpu/harness.rs"]
mod harness;
#[path = "gpu/world.rs"]
mod world;

use ep_core::enums::Layout;
use ep_reference::ll::{LlWorld, SplitMix64};
use harness::*;
use world::{Handles, World, base_case};

fn alloc_world(c: &Case, world: &LlWorld) -> Result<Vec<RankBufs>, String> {
    let bufs = (0..c.nranks)
        .map(|r| alloc_rank(c, 0, world.ranks[r].num_tokens))
        .collect::<Result<Vec<_>, _>>()?;
    for (b, inp) in bufs.iter().zip(&world.ranks) {
        load_inputs(c, b, inp)?;
    }
    Ok(bufs)
}

/// A full dispatch and combine of every rank on `hs`, each checked against the reference.
fn full_round(
    c: &Case,
    w: &World,
    world: &LlWorld,
    bufs: &mut [RankBufs],
    hs: &Handles,
    rng: &mut SplitMix64,
) -> Result<(), String> {
    for r in 0..c.nranks {
        dispatch(c, hs.0[r], &mut bufs[r], &w.streams[r], false)?;
    }
    w.sync()?;
    check_dispatch(c, world, bufs)?;
    let (xs, ws) = load_combine_inputs(c, world, bufs, rng)?;
    for r in 0..c.nranks {
        combine(c, hs.0[r], &mut bufs[r], &w.streams[r], false)?;
    }
    w.sync()?;
    check_combine(c, world, bufs, &xs, &ws)
}

/// Another dispatch while the send_only one is pending is refused: what destroy must clear.
fn expect_pending(c: &Case, w: &World, bufs: &mut [RankBufs], hs: &Handles) -> Result<(), String> {
    match dispatch(c, hs.0[0], &mut bufs[0], &w.streams[0], false) {
        Err(e) if e.contains("returned 5") && e.contains("send_only operation is pending") => Ok(()),
        Err(e) => Err(format!("a dispatch with a send_only pending failed otherwise: {e}")),
        Ok(()) => Err("a dispatch with a send_only pending was accepted".into()),
    }
}

/// send_only dispatch on every rank, never completed; destroy the handles; new handles with
/// the same routing; ncclEpComplete on them does nothing; then full rounds work.
///
/// The abandoned receive never ran, so the group's epoch did not move: the new dispatch uses
/// the same bank and tag, and a receiver may read a peer's abandoned message before the peer's
/// new one lands (docs/LL.md, "Epoch, send_only, graphs"). The new dispatch therefore sends
/// exactly the same data (same tokens, routing and weights), so either message is right; the
/// round after it uses fresh data on the epochs that follow.
fn abandoned_dispatch(c: &Case) -> Result<(), String> {
    let w = World::local(c)?;
    let mut rng = SplitMix64::new(c.seed);
    let world = c.world(&mut rng);
    let mut bufs = alloc_world(c, &world)?;
    let old = Handles::create(c, &w, &mut bufs)?;
    for r in 0..c.nranks {
        dispatch(c, old.0[r], &mut bufs[r], &w.streams[r], true)?;
    }
    w.sync()?;
    expect_pending(c, &w, &mut bufs, &old)?;
    old.destroy()?;

    for (b, inp) in bufs.iter().zip(&world.ranks) {
        load_inputs(c, b, inp)?; // the same inputs, outputs poisoned again
    }
    let new = Handles::create(c, &w, &mut bufs)?;
    for r in 0..c.nranks {
        complete(new.0[r], &w.streams[r])?;
    }
    w.sync()?;
    for (r, b) in bufs.iter().enumerate() {
        let out: Vec<u16> = b.out.download()?;
        let counters: Vec<i32> = b.counters.download()?;
        if out.iter().any(|&v| v != POISON_TOKEN) || counters.iter().any(|&v| v != POISON_INT) {
            return Err(format!(
                "rank {r}: ncclEpComplete on a new handle wrote outputs (it ran the destroyed handle's receive)"
            ));
        }
    }
    full_round(c, &w, &world, &mut bufs, &new, &mut rng)?;
    new.destroy()?;

    let world2 = c.world(&mut rng);
    let mut bufs2 = alloc_world(c, &world2)?;
    let hs = Handles::create(c, &w, &mut bufs2)?;
    full_round(c, &w, &world2, &mut bufs2, &hs, &mut rng)?;
    hs.destroy()
}

/// A full dispatch, then a send_only combine never completed; destroy the handles; a full
/// round with fresh data on new handles. The abandoned combine signals with combine flags,
/// which the next dispatch (same bank and tag) does not wait for, and its data landed before
/// the new dispatch started (the streams were synchronised), so fresh data is checked exactly.
fn abandoned_combine(c: &Case) -> Result<(), String> {
    let w = World::local(c)?;
    let mut rng = SplitMix64::new(c.seed + 100);
    let world = c.world(&mut rng);
    let mut bufs = alloc_world(c, &world)?;
    let old = Handles::create(c, &w, &mut bufs)?;
    for r in 0..c.nranks {
        dispatch(c, old.0[r], &mut bufs[r], &w.streams[r], false)?;
    }
    w.sync()?;
    check_dispatch(c, &world, &bufs)?;
    load_combine_inputs(c, &world, &bufs, &mut rng)?;
    for r in 0..c.nranks {
        combine(c, old.0[r], &mut bufs[r], &w.streams[r], true)?;
    }
    w.sync()?;
    expect_pending(c, &w, &mut bufs, &old)?;
    old.destroy()?;

    let world2 = c.world(&mut rng);
    let mut bufs2 = alloc_world(c, &world2)?;
    let hs = Handles::create(c, &w, &mut bufs2)?;
    full_round(c, &w, &world2, &mut bufs2, &hs, &mut rng)?;
    hs.destroy()
}

fn cases() -> Vec<Case> {
    let mut v = Vec::new();
    for nranks in [2, 4] {
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            v.push(Case {
                seed: nranks as u64 * 10 + layout as u64,
                ..base_case(nranks, layout)
            });
        }
    }
    v
}

#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ll_destroy_handle_with_send_only_dispatch_pending() {
    let _gpu = require_gpu();
    for c in cases() {
        abandoned_dispatch(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    println!(
        "ll_destroy_handle_with_send_only_dispatch_pending: {} cases passed",
        cases().len()
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn ll_destroy_handle_with_send_only_combine_pending() {
    let _gpu = require_gpu();
    for c in cases() {
        abandoned_combine(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }
    println!(
        "ll_destroy_handle_with_send_only_combine_pending: {} cases passed",
        cases().len()
    );
}
