//! Rank masks across processes (a child of tests/gpu_multi.rs), on LL groups with enable_mask
//! and a short timeout (docs/LL.md, "Masks and timeouts"; the local-group versions are
//! tests/gpu_ll.rs's ll_mask_*):
//! - `ll_mask_silent`: the last rank skips one dispatch/combine pair. The others' dispatch ends
//!   after the timeout (within a slack), their mask shows it masked, the async flag is raised,
//!   and their outputs are the masked reference's; combine among them then waits for nobody.
//!   ncclEpMaskClean on every rank (collective) restores all-ones masks and full rounds are exact.
//! - `ll_mask_host`: every rank masks the last one with ncclEpMaskUpdate (the host's array) and
//!   the last rank sits one dispatch/combine pair out. The others neither wait for it (no
//!   timeout, no async error) nor, across nodes, post any NCCL transfer to it (the exchange
//!   leaves host-masked ranks out, docs/MULTINODE.md "Masks and dead peers"; a posted transfer
//!   would hang NCCL's kernel); their outputs are the reference's without it. Then every rank
//!   calls ncclEpMaskClean (across nodes its remote part swaps epochs through NCCL), and full
//!   rounds with the rank back are exact.
//! - `ll_mask_kill` (opt-in, one process per rank, run alone: `EP_MULTI_ONLY=mask_kill`): the
//!   last rank (`EP_MULTI_KILL_RANK`) raises SIGKILL on itself before its dispatch. The others
//!   finish as above, then run another round among themselves with it masked, use no NCCL
//!   collective afterwards (the communicator has a dead member) and report PASS;
//!   scripts/multi_gpu.sh expects the dead rank's exit status 137. Across nodes the survivors
//!   check the watchdog instead (`dead_remote_dispatch`).

use super::*;
use nccl_ep::abi::mask::{ncclEpErrorClear, ncclEpMaskClean, ncclEpMaskUpdate};
use std::time::Duration;

/// The wait bound of the mask groups (`NCCL_EP_TIMEOUT_MS` overrides it, as for any group).
const MASK_TIMEOUT_NS: u64 = 2_000_000_000;

fn effective_timeout() -> Duration {
    timeout_or_env(MASK_TIMEOUT_NS)
}

/// How much later than the timeout a rank may see its dispatch end: processes time-slice one
/// GPU, and the kernel starts its clock only once it runs (`EP_MULTI_MASK_SLACK_MS`, 3000).
fn slack() -> Duration {
    Duration::from_millis(
        std::env::var("EP_MULTI_MASK_SLACK_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000),
    )
}

fn mask_case(r: &Rank, layout: Layout) -> Case {
    Case {
        tokens: None,
        ..ll_case(r, layout, 2048)
    }
}

fn mask_config(c: &Case, timeout_ns: u64) -> ncclEpGroupConfig_t {
    let mut cfg = c.group_config();
    cfg.enable_mask = 1;
    cfg.timeout_ns = timeout_ns;
    cfg
}

/// One exact round on a mask group with a long timeout, destroyed again: compiles and loads
/// this case's mask kernels, so that no rank of the short-timeout group is late for a peer
/// because it was still compiling.
fn warm_up(r: &Rank, c: &Case, rng: &mut SplitMix64, t: &mut Tally) -> Result<(), String> {
    let g = Group::new(r, &mask_config(c, 20_000_000_000))?;
    let s = Stream::new(r.device)?;
    let bad = ll_round(r, &g, &s, c, rng)?;
    t.record(r, &format!("mask warm-up {:?}", c.layout), bad)?;
    g.destroy()
}

fn async_error_of(g: &Group) -> Result<i32, String> {
    async_error(g.0)
}

/// The mask of this rank's group, read back.
fn mask_now(r: &Rank, g: &Group, s: &Stream) -> Result<Vec<i32>, String> {
    mask_of_on(r.device, g.0, r.world, s)
}

/// What one pair of a rank that is not absent saw.
struct Seen {
    dispatch: Duration,
    combine: Duration,
}

/// Dispatch then combine of one prepared pair on a rank whose peer `absent` never takes part:
/// timing, mask, flag and outputs against the reference without `absent`. Clears the flag
/// after checking it. `expect_wait`: the dispatch must time out on `absent` (it is not masked
/// yet) rather than skip it.
fn pair_without(
    r: &Rank,
    g: &Group,
    s: &Stream,
    c: &Case,
    absent: usize,
    expect_wait: bool,
    rng: &mut SplitMix64,
    bad: &mut Vec<String>,
) -> Result<Seen, String> {
    let me = r.rank;
    let n = r.world;
    let timeout = effective_timeout();
    let world = c.world(rng);
    let mut b = alloc_rank(c, r.device, world.ranks[me].num_tokens)?;
    load_inputs(c, &b, &world.ranks[me])?;
    let h = ll_handle(c, g, &mut b, s)?;
    let (xs, ws) = combine_inputs(c, &world, rng);

    let t0 = Instant::now();
    dispatch(c, h.0, &mut b, s, false)?;
    s.sync()?;
    let took = t0.elapsed();
    if expect_wait {
        if took < timeout.mul_f64(0.95) || took > timeout + slack() {
            bad.push(format!(
                "dispatch returned after {:.0} ms, expected the timeout ({:.0} ms) + at most {:.0} ms",
                took.as_secs_f64() * 1e3,
                timeout.as_secs_f64() * 1e3,
                slack().as_secs_f64() * 1e3
            ));
        }
        if async_error_of(g)? != 1 {
            bad.push("the async error flag is not raised after the timeout".into());
        }
    } else if took >= timeout || async_error_of(g)? != 0 {
        bad.push(format!(
            "dispatch took {:.0} ms (flag {}) although rank {absent} is masked",
            took.as_secs_f64() * 1e3,
            async_error_of(g)?
        ));
    }
    let mut want_mask = vec![1; n];
    want_mask[absent] = 0;
    if let Err(e) = compare("mask after dispatch", &mask_now(r, g, s)?, &want_mask) {
        bad.push(e);
    }
    let links = LlLinks::without(n, &[absent]);
    bad.extend(check_dispatch_rank(c, &world, me, &b, &links)?);
    // SAFETY: `g.0` is live (`Group::destroy` takes the group by value); nothing else is passed.
    ep_ok!(unsafe { ncclEpErrorClear(g.0) });
    if async_error_of(g)? != 0 {
        bad.push("the async error flag is still raised after ncclEpErrorClear".into());
    }

    // Combine among the others: the absent rank is masked, so nobody waits for it.
    upload_combine_inputs(&b, me, &xs, &ws)?;
    let t1 = Instant::now();
    combine(c, h.0, &mut b, s, false)?;
    s.sync()?;
    let comb = t1.elapsed();
    if comb >= timeout || async_error_of(g)? != 0 {
        bad.push(format!(
            "combine took {:.0} ms (flag {}) although rank {absent} is masked",
            comb.as_secs_f64() * 1e3,
            async_error_of(g)?
        ));
    }
    bad.extend(check_combine_rank(c, &world, me, &b, &xs, &ws, &links)?);
    Ok(Seen {
        dispatch: took,
        combine: comb,
    })
}

/// The frame of the tests that leave the last rank out (`ll_mask_silent`, `ll_mask_host`): with
/// 2 ranks or more, for both layouts, a mask group (after a warm-up) and one exact round, then
/// `left_out` (the test's own operation without rank N - 1, given that rank), then every rank
/// cleans and three rounds must be exact; the group is destroyed before the next layout.
fn leave_last_rank_out(
    r: &Rank,
    t: &mut Tally,
    name: &str,
    mut left_out: impl FnMut(&Group, &Stream, &Case, &mut SplitMix64, &mut Tally, usize) -> Result<(), String>,
) -> Result<(), String> {
    let n = r.world;
    if n < 2 {
        println!("{}: {name} needs 2 ranks or more: skipped", r.who);
        t.skipped.push(format!("{name} (1 rank)"));
        return Ok(());
    }
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let c = mask_case(r, layout);
        let mut rng = r.rng(name, layout.raw() as u64);
        warm_up(r, &c, &mut rng, t)?;
        let g = Group::new(r, &mask_config(&c, MASK_TIMEOUT_NS))?;
        let s = Stream::new(r.device)?;
        let bad = ll_round(r, &g, &s, &c, &mut rng)?;
        t.record(r, &format!("{name} {layout:?} first round"), bad)?;
        left_out(&g, &s, &c, &mut rng, t, n - 1)?;
        // Every rank, the left-out one included, cleans (across nodes the remote part swaps
        // epochs through NCCL); then all of them are exact again.
        clean_then_rounds(r, &g, &s, &c, &mut rng, t, &format!("{name} {layout:?}"))?;
        g.destroy()?;
        r.barrier()?;
    }
    Ok(())
}

/// The rank that sits an operation out draws the same inputs as the others (the shared random
/// stream stays in step) and launches nothing.
fn draw_without_launching(c: &Case, rng: &mut SplitMix64) {
    let world = c.world(rng);
    let _ = combine_inputs(c, &world, rng);
}

/// See the module comment. Both layouts.
pub fn ll_mask_silent(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let timeout = effective_timeout();
    leave_last_rank_out(r, t, "ll_mask_silent", |g, s, c, rng, t, silent| {
        let layout = c.layout;
        r.barrier()?;
        let mut bad = Vec::new();
        if r.rank == silent {
            draw_without_launching(c, rng);
            if let Err(e) = compare("silent rank's mask", &mask_now(r, g, s)?, &vec![1; r.world]) {
                bad.push(e);
            }
            if async_error_of(g)? != 0 {
                bad.push("the silent rank's async error flag is raised".into());
            }
            println!("{}: ll_mask_silent {layout:?}: silent for one dispatch/combine", r.who);
        } else {
            let seen = pair_without(r, g, s, c, silent, true, rng, &mut bad)?;
            println!(
                "{}: ll_mask_silent {layout:?}: dispatch without rank {silent} returned after {:.0} ms (timeout {:.0} ms), combine {:.1} ms",
                r.who,
                seen.dispatch.as_secs_f64() * 1e3,
                timeout.as_secs_f64() * 1e3,
                seen.combine.as_secs_f64() * 1e3
            );
        }
        t.record(r, &format!("ll_mask_silent {layout:?} rank {silent} silent"), bad)?;
        r.barrier()
    })
}

/// ncclEpMaskClean on this rank (every rank calls it), its mask all ones afterwards, then three
/// full rounds exact with no async error; recorded under `label`.
fn clean_then_rounds(
    r: &Rank,
    g: &Group,
    s: &Stream,
    c: &Case,
    rng: &mut SplitMix64,
    t: &mut Tally,
    label: &str,
) -> Result<(), String> {
    let t0 = Instant::now();
    // SAFETY: `g.0` is live (the caller destroys it later) and `s` a live stream of its device.
    let rc = unsafe { ncclEpMaskClean(g.0, s.raw()) };
    let mut bad = Vec::new();
    if rc != 0 {
        bad.push(format!("ncclEpMaskClean returned {rc}: {}", last_error()));
    }
    if let Err(e) = compare("mask after ncclEpMaskClean", &mask_now(r, g, s)?, &vec![1; r.world]) {
        bad.push(e);
    }
    println!(
        "{}: {label}: ncclEpMaskClean took {:.1} ms",
        r.who,
        t0.elapsed().as_secs_f64() * 1e3
    );
    t.record(r, &format!("{label} ncclEpMaskClean"), bad)?;
    for i in 0..3 {
        let mut bad = ll_round(r, g, s, c, rng)?;
        if async_error_of(g)? != 0 {
            bad.push("async error flag raised".into());
        }
        t.record(r, &format!("{label} after the clean, round {i}"), bad)?;
    }
    Ok(())
}

/// See the module comment. Both layouts.
pub fn ll_mask_host(r: &Rank, t: &mut Tally) -> Result<(), String> {
    leave_last_rank_out(r, t, "ll_mask_host", |g, s, c, rng, t, absent| {
        let layout = c.layout;
        // Every rank masks the absent one, the absent one too (it then launches nothing).
        let mut mask = vec![1i32; r.world];
        mask[absent] = 0;
        // SAFETY: `g.0` is live (destroyed by the caller), `mask` holds N ints, `s` is a live
        // stream of the group's device.
        ep_ok!(unsafe { ncclEpMaskUpdate(g.0, mask.as_ptr(), s.raw()) });
        s.sync()?;
        r.barrier()?;
        let mut bad = Vec::new();
        if r.rank == absent {
            draw_without_launching(c, rng);
        } else {
            let seen = pair_without(r, g, s, c, absent, false, rng, &mut bad)?;
            println!(
                "{}: ll_mask_host {layout:?}: without rank {absent}: dispatch {:.1} ms, combine {:.1} ms",
                r.who,
                seen.dispatch.as_secs_f64() * 1e3,
                seen.combine.as_secs_f64() * 1e3
            );
        }
        t.record(
            r,
            &format!("ll_mask_host {layout:?} rank {absent} masked by every rank"),
            bad,
        )?;
        r.barrier()
    })
}

/// The run splits the ranks into nodes (`NCCL_EP_NODE_SIZE`, or scripts/multi_gpu.sh's
/// per-rank `NCCL_HOSTID` under `MULTI_GPU_HOST_SIZE`): exchanges go through NCCL.
fn across_nodes() -> bool {
    ["NCCL_EP_NODE_SIZE", "EP_HOST_SIZE"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|v| !v.trim().is_empty()))
}

/// `ll_mask_kill` when the group spans nodes (docs/MULTINODE.md, "Masks and dead peers"): the
/// survivors' exchanges wait for the dead rank inside NCCL, where no GPU timeout can see it; the
/// watchdog must raise the async error and, with `NCCL_EP_REVOKE_ON_REMOTE_TIMEOUT=1` (set by
/// scripts/multi_gpu.sh for this step), revoke the communicator so that the dispatch ends: its
/// receive phase then times out on whatever did not arrive and masks it. Checked: the dispatch
/// ends within three timeouts plus the slack (watchdog, revoke, receive timeout; a survivor
/// whose transfer another survivor's revoke cut waits for its own watchdog in parallel), the
/// async error is raised and the dead rank is masked. Not checked: the outputs (a revoke may
/// also cut live ranks' transfers, which then count as silent) and anything after (the
/// communicator is revoked; the group is destroyed without waiting for its stream).
fn dead_remote_dispatch(
    r: &Rank,
    g: Group,
    s: &Stream,
    c: &Case,
    victim: usize,
    rng: &mut SplitMix64,
    t: &mut Tally,
) -> Result<(), String> {
    let me = r.rank;
    let timeout = effective_timeout();
    let world = c.world(rng);
    let mut b = alloc_rank(c, r.device, world.ranks[me].num_tokens)?;
    load_inputs(c, &b, &world.ranks[me])?;
    let h = ll_handle(c, &g, &mut b, s)?;
    let t0 = Instant::now();
    dispatch(c, h.0, &mut b, s, false)?;
    s.sync()?;
    let took = t0.elapsed();
    let mut bad = Vec::new();
    let bound = timeout * 3 + slack();
    if took > bound {
        bad.push(format!(
            "dispatch returned after {:.0} ms, expected at most {:.0} ms",
            took.as_secs_f64() * 1e3,
            bound.as_secs_f64() * 1e3
        ));
    }
    if async_error_of(&g)? != 1 {
        bad.push("the async error flag is not raised".into());
    }
    if mask_now(r, &g, s)?[victim] != 0 {
        bad.push(format!("the dead rank {victim} is not masked"));
    }
    println!(
        "{}: ll_mask_kill across nodes: dispatch without the dead rank {victim} returned after {:.0} ms (timeout {:.0} ms)",
        r.who,
        took.as_secs_f64() * 1e3,
        timeout.as_secs_f64() * 1e3
    );
    t.record(r, &format!("ll_mask_kill across nodes, rank {victim} dead"), bad)?;
    drop(h);
    g.destroy()
}

/// The rank that kills itself (`EP_MULTI_KILL_RANK`, default the last).
pub fn kill_rank(world: usize) -> usize {
    std::env::var("EP_MULTI_KILL_RANK")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&k| k < world)
        .unwrap_or(world - 1)
}

/// See the module comment.
pub fn ll_mask_kill(r: &Rank, t: &mut Tally) -> Result<(), String> {
    let n = r.world;
    if !r.process || n < 2 {
        return Err("mask_kill needs one process per rank and 2 ranks or more".into());
    }
    let victim = kill_rank(n);
    let timeout = effective_timeout();
    let c = mask_case(r, Layout::ExpertMajor);
    let mut rng = r.rng("ll_mask_kill", 0);
    warm_up(r, &c, &mut rng, t)?;
    let g = Group::new(r, &mask_config(&c, MASK_TIMEOUT_NS))?;
    let s = Stream::new(r.device)?;
    let bad = ll_round(r, &g, &s, &c, &mut rng)?;
    t.record(r, "ll_mask_kill first round (all alive)", bad)?;
    // The last NCCL collective of the victim. It dies a little later, so that no NCCL transfer
    // of this barrier still needs it.
    r.barrier()?;
    if r.rank == victim {
        use std::io::Write;
        println!("{}: KILLING ITSELF (SIGKILL) before its dispatch, as planned", r.who);
        let _ = std::io::stdout().flush();
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: raise takes a signal number; SIGKILL ends this process at once, as planned.
        unsafe { libc::raise(libc::SIGKILL) };
        unreachable!("SIGKILL returned");
    }
    if across_nodes() {
        return dead_remote_dispatch(r, g, &s, &c, victim, &mut rng, t);
    }
    let mut bad = Vec::new();
    let seen = pair_without(r, &g, &s, &c, victim, true, &mut rng, &mut bad)?;
    println!(
        "{}: ll_mask_kill: dispatch without the dead rank {victim} returned after {:.0} ms (timeout {:.0} ms), combine {:.1} ms",
        r.who,
        seen.dispatch.as_secs_f64() * 1e3,
        timeout.as_secs_f64() * 1e3,
        seen.combine.as_secs_f64() * 1e3
    );
    t.record(r, &format!("ll_mask_kill rank {victim} dead, first pair"), bad)?;
    // The dead rank stays masked: another pair among the survivors waits for nobody.
    let mut bad = Vec::new();
    let seen = pair_without(r, &g, &s, &c, victim, false, &mut rng, &mut bad)?;
    println!(
        "{}: ll_mask_kill: second pair without rank {victim}: dispatch {:.1} ms, combine {:.1} ms",
        r.who,
        seen.dispatch.as_secs_f64() * 1e3,
        seen.combine.as_secs_f64() * 1e3
    );
    t.record(r, &format!("ll_mask_kill rank {victim} dead, second pair"), bad)?;
    // The destroy barrier (flags in the peers' buffers, no NCCL) waits up to the group's timeout
    // for the dead rank, then keeps this rank's buffer allocated and returns.
    g.destroy()
}
