#![allow(clippy::needless_range_loop, clippy::macro_metavars_in_unsafe)]
//! Low-latency dispatch and combine on a real GPU, checked against the CPU reference: local
//! groups of 1, 2, 4 and 8 ranks on one device, one rank on a real NCCL communicator, both
//! layouts, several top-k, hidden sizes, token counts and routings, send_only, two handles
//! interleaved on one group and CUDA-graph replays. Without a GPU every test prints "skipped".
//! Run on a GPU machine with `--test-threads=1 --nocapture`.

#[path = "gpu/harness.rs"]
mod harness;

use harness::*;
use nccl_ep::abi::enums::Layout;
use nccl_ep::abi::ext::ncclEpxCreateLocalGroups;
use nccl_ep::abi::group::ncclEpGroupDestroy;
use nccl_ep::abi::handle::{ncclEpCreateHandle, ncclEpHandleDestroy};
use nccl_ep::abi::types::*;
use nccl_ep::core::reference::{Routing, SplitMix64};

macro_rules! require_gpu {
    () => {
        if !gpu_present() {
            println!("skipped: no CUDA device");
            return;
        }
    };
}

/// Groups and streams of one local world, destroyed in order.
struct World {
    groups: Vec<ncclEpGroup_t>,
    streams: Vec<Stream>,
}

impl World {
    fn local(c: &Case) -> Result<World, String> {
        let cfg = c.group_config();
        let mut groups = vec![std::ptr::null_mut(); c.nranks];
        ep_ok!(ncclEpxCreateLocalGroups(
            groups.as_mut_ptr(),
            c.nranks as i32,
            std::ptr::null(),
            &cfg
        ));
        let streams = (0..c.nranks).map(|_| Stream::new(0)).collect::<Result<_, _>>()?;
        Ok(World { groups, streams })
    }
    fn sync(&self) -> Result<(), String> {
        self.streams.iter().try_for_each(|s| s.sync())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.sync();
        for &g in &self.groups {
            unsafe { ncclEpGroupDestroy(g) };
        }
    }
}

struct Handles(Vec<ncclEpHandle_t>);

impl Drop for Handles {
    fn drop(&mut self) {
        for &h in &self.0 {
            unsafe { ncclEpHandleDestroy(h) };
        }
    }
}

fn create_handles(c: &Case, w: &World, bufs: &mut [RankBufs]) -> Result<Handles, String> {
    let mut hs = Handles(Vec::new());
    for (r, b) in bufs.iter_mut().enumerate() {
        let mut h = std::ptr::null_mut();
        ep_ok!(ncclEpCreateHandle(
            &mut h,
            w.groups[r],
            c.layout.raw(),
            b.topk.ptr(),
            std::ptr::null(),
            std::ptr::null(),
            w.streams[r].raw()
        ));
        hs.0.push(h);
    }
    Ok(hs)
}

/// One full round on an existing world: inputs, handles, dispatch, check, combine, check.
fn round(c: &Case, w: &World, rng: &mut SplitMix64) -> Result<(), String> {
    let world = c.world(rng);
    let mut bufs = (0..c.nranks)
        .map(|r| alloc_rank(c, 0, world.ranks[r].num_tokens))
        .collect::<Result<Vec<_>, _>>()?;
    for (b, inp) in bufs.iter().zip(&world.ranks) {
        load_inputs(c, b, inp)?;
    }
    let hs = create_handles(c, w, &mut bufs)?;
    for r in 0..c.nranks {
        dispatch(c, hs.0[r], &mut bufs[r], &w.streams[r], c.send_only)?;
    }
    if c.send_only {
        for r in 0..c.nranks {
            complete(hs.0[r], &w.streams[r])?;
        }
    }
    w.sync()?;
    check_dispatch(c, &world, &bufs)?;
    let (xs, ws) = load_combine_inputs(c, &world, &bufs, rng)?;
    for r in 0..c.nranks {
        combine(c, hs.0[r], &mut bufs[r], &w.streams[r], c.send_only)?;
    }
    if c.send_only {
        for r in 0..c.nranks {
            complete(hs.0[r], &w.streams[r])?;
        }
    }
    w.sync()?;
    check_combine(c, &world, &bufs, &xs, &ws)
}

fn base_case(nranks: usize, layout: Layout) -> Case {
    Case {
        nranks,
        // At least 8 experts in all, so that K = 8 distinct experts exist.
        local_experts: 4.max(8usize.div_ceil(nranks)),
        max_tokens: 64,
        hidden: 2048,
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

/// The matrix: ranks {1,2,4,8} x layouts x K {1,2,8} x H {2048,7168} x T {0,1,B/2,B}
/// x routing {uniform, skewed, same-rank duplicates}.
#[test]
fn ll_local_groups_matrix() {
    require_gpu!();
    let mut passed = 0;
    let mut failed = Vec::new();
    for nranks in [1, 2, 4, 8] {
        for hidden in [2048, 7168] {
            for layout in [Layout::ExpertMajor, Layout::RankMajor] {
                let mut c = base_case(nranks, layout);
                c.hidden = hidden;
                let w = World::local(&c).expect("local groups");
                let mut rng = SplitMix64::new(nranks as u64 * 1000 + hidden as u64 + layout as u64);
                for topk in [1, 2, 8] {
                    for t in [0, 1, c.max_tokens / 2, c.max_tokens] {
                        for routing in [
                            Routing::Uniform,
                            Routing::Skewed { rank: nranks - 1 },
                            Routing::SameRankDups,
                        ] {
                            c.topk = topk;
                            c.tokens = Some(t);
                            c.routing = routing;
                            c.idx64 = (t + topk) % 2 == 0;
                            c.global_ids = topk == 2;
                            match round(&c, &w, &mut rng) {
                                Ok(()) => passed += 1,
                                Err(e) => failed.push(format!("{c:?}: {e}")),
                            }
                        }
                    }
                }
            }
        }
    }
    println!(
        "ll_local_groups_matrix: {passed} rounds passed, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn ll_send_only_and_random_token_counts() {
    require_gpu!();
    let mut passed = 0;
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let mut c = base_case(4, layout);
        c.send_only = true;
        let w = World::local(&c).expect("local groups");
        let mut rng = SplitMix64::new(7);
        for _ in 0..5 {
            round(&c, &w, &mut rng).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            passed += 1;
        }
    }
    println!("ll_send_only: {passed} rounds passed");
}

/// Two handles of different layout and top-k on one group: D(A) D(B) C(A) C(B).
#[test]
fn ll_two_handles_interleaved() {
    require_gpu!();
    let a = Case {
        topk: 2,
        ..base_case(4, Layout::ExpertMajor)
    };
    let b = Case {
        topk: 8,
        ..base_case(4, Layout::RankMajor)
    };
    let w = World::local(&a).expect("local groups");
    let mut rng = SplitMix64::new(11);
    for _ in 0..4 {
        let mut run = || -> Result<(), String> {
            let (wa, wb) = (a.world(&mut rng.clone()), b.world(&mut SplitMix64::new(rng.next_u64())));
            let mut ba = (0..4)
                .map(|r| alloc_rank(&a, 0, wa.ranks[r].num_tokens))
                .collect::<Result<Vec<_>, _>>()?;
            let mut bb = (0..4)
                .map(|r| alloc_rank(&b, 0, wb.ranks[r].num_tokens))
                .collect::<Result<Vec<_>, _>>()?;
            for r in 0..4 {
                load_inputs(&a, &ba[r], &wa.ranks[r])?;
                load_inputs(&b, &bb[r], &wb.ranks[r])?;
            }
            let ha = create_handles(&a, &w, &mut ba)?;
            let hb = create_handles(&b, &w, &mut bb)?;
            for r in 0..4 {
                dispatch(&a, ha.0[r], &mut ba[r], &w.streams[r], false)?;
            }
            for r in 0..4 {
                dispatch(&b, hb.0[r], &mut bb[r], &w.streams[r], false)?;
            }
            w.sync()?;
            check_dispatch(&a, &wa, &ba)?;
            check_dispatch(&b, &wb, &bb)?;
            let mut r2 = SplitMix64::new(5);
            let (xa, wa_) = load_combine_inputs(&a, &wa, &ba, &mut r2)?;
            let (xb, wb_) = load_combine_inputs(&b, &wb, &bb, &mut r2)?;
            for r in 0..4 {
                combine(&a, ha.0[r], &mut ba[r], &w.streams[r], false)?;
            }
            for r in 0..4 {
                combine(&b, hb.0[r], &mut bb[r], &w.streams[r], false)?;
            }
            w.sync()?;
            check_combine(&a, &wa, &ba, &xa, &wa_)?;
            check_combine(&b, &wb, &bb, &xb, &wb_)
        };
        run().unwrap_or_else(|e| panic!("interleaved handles: {e}"));
        rng.next_u64();
    }
    println!("ll_two_handles_interleaved: 4 rounds passed");
}

/// Dispatch + combine of every rank captured once into CUDA graphs, replayed 100 times with new
/// tokens, routing and expert outputs each time; every replay is checked.
#[test]
fn ll_graph_replays() {
    require_gpu!();
    use cudarc::driver::sys;
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let c = Case {
            tokens: Some(32),
            ..base_case(4, layout)
        };
        let w = World::local(&c).expect("local groups");
        let mut rng = SplitMix64::new(99);
        let run = |rng: &mut SplitMix64| -> Result<usize, String> {
            let first = c.world(rng);
            let mut bufs = (0..4).map(|_| alloc_rank(&c, 0, 32)).collect::<Result<Vec<_>, _>>()?;
            for (b, inp) in bufs.iter().zip(&first.ranks) {
                load_inputs(&c, b, inp)?;
            }
            let hs = create_handles(&c, &w, &mut bufs)?;
            // One plain round first: compiles and loads the kernels outside the capture.
            for r in 0..4 {
                dispatch(&c, hs.0[r], &mut bufs[r], &w.streams[r], false)?;
            }
            for r in 0..4 {
                combine(&c, hs.0[r], &mut bufs[r], &w.streams[r], false)?;
            }
            w.sync()?;
            // Graph calls use the calling thread's current context.
            let _ctx = nccl_ep::cuda::context::CtxGuard::enter(0).map_err(|e| e.msg)?;
            let mut execs = Vec::new();
            for r in 0..4 {
                let s = w.streams[r].0;
                let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
                cu(unsafe { sys::cuStreamBeginCapture_v2(s, mode) }, "cuStreamBeginCapture")?;
                dispatch(&c, hs.0[r], &mut bufs[r], &w.streams[r], false)?;
                combine(&c, hs.0[r], &mut bufs[r], &w.streams[r], false)?;
                let mut g = std::ptr::null_mut();
                cu(unsafe { sys::cuStreamEndCapture(s, &mut g) }, "cuStreamEndCapture")?;
                let mut e = std::ptr::null_mut();
                cu(
                    unsafe { sys::cuGraphInstantiateWithFlags(&mut e, g, 0) },
                    "cuGraphInstantiate",
                )?;
                execs.push(e);
            }
            let mut replays = 0;
            for _ in 0..100 {
                let world = c.world(rng);
                for (b, inp) in bufs.iter().zip(&world.ranks) {
                    load_inputs(&c, b, inp)?;
                }
                let (xs, ws) = load_combine_inputs(&c, &world, &bufs, rng)?;
                for r in 0..4 {
                    cu(unsafe { sys::cuGraphLaunch(execs[r], w.streams[r].0) }, "cuGraphLaunch")?;
                }
                w.sync()?;
                check_dispatch(&c, &world, &bufs)?;
                check_combine(&c, &world, &bufs, &xs, &ws)?;
                replays += 1;
            }
            Ok(replays)
        };
        let n = run(&mut rng).unwrap_or_else(|e| panic!("{layout:?} graph replays: {e}"));
        println!("ll_graph_replays {layout:?}: {n} replays passed");
    }
}

/// The NCCL entry points a test needs to make a one-rank communicator.
fn nccl_one_rank_comm() -> Result<ncclComm_t, String> {
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct UniqueId([u8; 128]);
    type GetId = unsafe extern "C" fn(*mut UniqueId) -> i32;
    type InitRank = unsafe extern "C" fn(*mut ncclComm_t, i32, UniqueId, i32) -> i32;
    let name = std::ffi::CString::new("libnccl.so.2").unwrap();
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        return Err("libnccl.so.2 not found".into());
    }
    let sym = |n: &str| unsafe { libc::dlsym(h, std::ffi::CString::new(n).unwrap().as_ptr()) };
    let (gid, init) = (sym("ncclGetUniqueId"), sym("ncclCommInitRank"));
    if gid.is_null() || init.is_null() {
        return Err("NCCL symbols missing".into());
    }
    let gid = unsafe { std::mem::transmute::<*mut libc::c_void, GetId>(gid) };
    let init = unsafe { std::mem::transmute::<*mut libc::c_void, InitRank>(init) };
    let mut id = UniqueId([0u8; 128]);
    let _g = nccl_ep::cuda::context::CtxGuard::enter(0).map_err(|e| e.msg)?;
    let mut comm = std::ptr::null_mut();
    unsafe {
        if gid(&mut id) != 0 || init(&mut comm, 1, id, 0) != 0 {
            return Err("ncclCommInitRank failed".into());
        }
    }
    Ok(comm)
}

/// One rank on a real NCCL communicator (the caller's libnccl.so.2), both layouts.
#[test]
fn ll_one_rank_on_nccl_communicator() {
    require_gpu!();
    let comm = match nccl_one_rank_comm() {
        Ok(c) => c,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    let mut passed = 0;
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let mut c = base_case(1, layout);
        c.hidden = 7168;
        let cfg = c.group_config();
        let mut g = std::ptr::null_mut();
        let r = unsafe { nccl_ep::abi::group::ncclEpCreateGroup(&mut g, comm, &cfg) };
        assert_eq!(r, 0, "ncclEpCreateGroup: {}", last_error());
        let w = World {
            groups: vec![g],
            streams: vec![Stream::new(0).unwrap()],
        };
        let mut rng = SplitMix64::new(3);
        for topk in [1, 2, 8] {
            for t in [0, 1, 32, 64] {
                c.topk = topk;
                c.tokens = Some(t);
                round(&c, &w, &mut rng).unwrap_or_else(|e| panic!("{c:?}: {e}"));
                passed += 1;
            }
        }
    }
    println!("ll_one_rank_on_nccl_communicator: {passed} rounds passed");
}

/// Buffer bytes at the anchor config (8 local ranks, E=256, B=128, H=7168, K=8): the planner's
/// figure and the device memory that groups + handles really take.
#[test]
fn ll_anchor_memory() {
    require_gpu!();
    use cudarc::driver::sys;
    use nccl_ep::abi::handle::ncclEpInitHandle;
    let free = || {
        let _g = nccl_ep::cuda::context::CtxGuard::enter(0).unwrap();
        let (mut f, mut t) = (0usize, 0usize);
        unsafe { sys::cuCtxSynchronize() };
        unsafe { sys::cuMemGetInfo_v2(&mut f, &mut t) };
        f
    };
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let c = Case {
            local_experts: 32,
            max_tokens: 128,
            hidden: 7168,
            topk: 8,
            ..base_case(8, layout)
        };
        let cfg = c.group_config();
        let mut planned = 0usize;
        let r = unsafe { nccl_ep::abi::ext::ncclEpxBufferSize(&cfg, 8, layout.raw(), 8, &mut planned) };
        assert_eq!(r, 0, "{}", last_error());
        let before = free();
        let w = World::local(&c).expect("local groups");
        let mut hs = Handles(Vec::new());
        for &g in &w.groups {
            let mut h = std::ptr::null_mut();
            let r = unsafe { ncclEpInitHandle(&mut h, g, layout.raw(), std::ptr::null(), 8, std::ptr::null()) };
            assert_eq!(r, 0, "{}", last_error());
            hs.0.push(h);
        }
        let used = before.saturating_sub(free());
        let per_rank = used / 8;
        println!(
            "ll_anchor_memory {layout:?}: ncclEpxBufferSize = {planned} bytes ({:.1} MiB); measured {used} bytes for 8 ranks = {per_rank} bytes ({:.1} MiB) per rank",
            planned as f64 / 1048576.0,
            per_rank as f64 / 1048576.0
        );
        assert!(planned <= 32 << 20, "planned {planned} bytes > 32 MiB");
        assert!(
            per_rank <= planned + (4 << 20),
            "measured {per_rank} bytes per rank, planned {planned}"
        );
        drop(hs);
    }
}

/// Dispatch output, counters and combine output of one rank.
type RankOutputs = (Vec<u16>, Vec<i32>, Vec<u16>);

/// One host thread per rank: each thread creates its handle and issues its own dispatch and
/// combine (the ranks of a local group wait for each other on the GPU, not on the host).
#[test]
fn ll_one_thread_per_rank() {
    require_gpu!();
    for layout in [Layout::ExpertMajor, Layout::RankMajor] {
        let c = Case {
            tokens: Some(48),
            ..base_case(4, layout)
        };
        let w = World::local(&c).expect("local groups");
        let world = c.world(&mut SplitMix64::new(21));
        let groups: Vec<usize> = w.groups.iter().map(|&g| g as usize).collect();
        // Each thread returns its rank's buffers' contents after dispatch and combine.
        let results: Vec<Result<RankOutputs, String>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|r| {
                    let (c, world, g) = (c, &world, groups[r]);
                    sc.spawn(move || -> Result<RankOutputs, String> {
                        let s = Stream::new(0)?;
                        let mut b = alloc_rank(&c, 0, world.ranks[r].num_tokens)?;
                        load_inputs(&c, &b, &world.ranks[r])?;
                        let mut rng = SplitMix64::new(100 + r as u64);
                        let x: Vec<u16> = (0..b.x.bytes / 2)
                            .map(|_| nccl_ep::core::reference::f32_to_bf16_rne(rng.unit_f32() * 4.0 - 2.0))
                            .collect();
                        b.x.upload(&x)?;
                        b.comb_w.upload(&world.ranks[r].weights)?;
                        let mut h = std::ptr::null_mut();
                        ep_ok!(ncclEpCreateHandle(
                            &mut h,
                            g as ncclEpGroup_t,
                            c.layout.raw(),
                            b.topk.ptr(),
                            std::ptr::null(),
                            std::ptr::null(),
                            s.raw()
                        ));
                        let _hs = Handles(vec![h]);
                        dispatch(&c, h, &mut b, &s, false)?;
                        combine(&c, h, &mut b, &s, false)?;
                        s.sync()?;
                        Ok((b.out.download()?, b.counters.download()?, b.comb_out.download()?))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // The reference, with the same expert outputs and weights the threads used.
        let want = nccl_ep::core::reference::ll_dispatch_ref(
            &world,
            layout,
            nccl_ep::abi::enums::ExpertIdKind::Local,
            nccl_ep::core::reference::LlPoison {
                token: POISON_TOKEN,
                weight: POISON_WEIGHT,
            },
        );
        let mut xs = Vec::new();
        let mut ws = Vec::new();
        for r in 0..4 {
            let mut rng = SplitMix64::new(100 + r as u64);
            let n = alloc_rank(&c, 0, 0).unwrap().x.bytes / 2;
            xs.push(
                (0..n)
                    .map(|_| nccl_ep::core::reference::f32_to_bf16_rne(rng.unit_f32() * 4.0 - 2.0))
                    .collect(),
            );
            ws.push(world.ranks[r].weights.clone());
        }
        let input = match layout {
            Layout::ExpertMajor => nccl_ep::core::reference::LlCombineIn::ExpertMajor { x: &xs, weights: &ws },
            _ => nccl_ep::core::reference::LlCombineIn::RankMajor { y: &xs },
        };
        let want_c = nccl_ep::core::reference::ll_combine_ref(&world, input);
        for (r, res) in results.into_iter().enumerate() {
            let (out, _counters, comb) = res.unwrap_or_else(|e| panic!("rank {r}: {e}"));
            compare(&format!("rank {r} dispatch"), &out, want[r].tokens()).unwrap();
            compare_bf16_close(&format!("rank {r} combine"), &comb, &want_c[r]).unwrap();
        }
        println!("ll_one_thread_per_rank {layout:?}: 4 threads passed");
    }
}
