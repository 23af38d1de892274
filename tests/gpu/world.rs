//! Groups and streams of one world (local ranks, or one rank on a communicator) and their
//! handles, destroyed in order, plus the small LL case the LL tests start from: shared by
//! tests/gpu_ll.rs, gpu_ll_destroy.rs and gpu_ht.rs, which include it after `harness`.
// Each including test binary uses part of it.
#![allow(dead_code)]

use crate::ep_ok;
use crate::harness::*;
use ep_core::enums::Layout;
use ep_reference::ll::Routing;
use nccl_ep::abi::ext::ncclEpxCreateLocalGroups;
use nccl_ep::abi::group::ncclEpGroupDestroy;
use nccl_ep::abi::handle::{ncclEpCreateHandle, ncclEpHandleDestroy};
use nccl_ep::abi::types::*;

/// Groups and streams of one local world, destroyed in order.
pub struct World {
    pub groups: Vec<ncclEpGroup_t>,
    pub streams: Vec<Stream>,
}

impl World {
    pub fn local(c: &Case) -> Result<World, String> {
        World::local_cfg(c, &c.group_config())
    }
    pub fn local_cfg(c: &Case, cfg: &ncclEpGroupConfig_t) -> Result<World, String> {
        World::local_n(c.nranks, cfg)
    }
    /// `n` local ranks on the current device.
    pub fn local_n(n: usize, cfg: &ncclEpGroupConfig_t) -> Result<World, String> {
        let mut groups = vec![std::ptr::null_mut(); n];
        // SAFETY: `groups` has `n` slots, one per group written; devices may be NULL (all on the
        // current device); `cfg` is the caller's live config.
        ep_ok!(unsafe { ncclEpxCreateLocalGroups(groups.as_mut_ptr(), n as i32, std::ptr::null(), cfg) });
        let streams = (0..n).map(|_| Stream::new(0)).collect::<Result<_, _>>()?;
        Ok(World { groups, streams })
    }
    /// One rank on the caller's communicator.
    pub fn nccl(comm: ncclComm_t, cfg: &ncclEpGroupConfig_t) -> Result<World, String> {
        let mut g = std::ptr::null_mut();
        // SAFETY: writes one group to the live local `g`; `comm` is the caller's live
        // communicator and `cfg` its live config.
        ep_ok!(unsafe { nccl_ep::abi::group::ncclEpCreateGroup(&mut g, comm, cfg) });
        Ok(World {
            groups: vec![g],
            streams: vec![Stream::new(0)?],
        })
    }
    pub fn sync(&self) -> Result<(), String> {
        self.streams.iter().try_for_each(|s| s.sync())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.sync();
        for &g in &self.groups {
            // SAFETY: each group came from the library and is destroyed once, here, after the
            // streams were synchronised; the library checks a group against its live set.
            unsafe { ncclEpGroupDestroy(g) };
        }
    }
}

/// One handle per rank; destroyed on drop unless `destroy` did it (checking the return codes).
pub struct Handles(pub Vec<ncclEpHandle_t>);

impl Drop for Handles {
    fn drop(&mut self) {
        for &h in &self.0 {
            // SAFETY: each handle came from the library and is destroyed once, here (its group
            // outlives it: `Handles` always drops before its `World`); the library checks a
            // handle against its live set.
            unsafe { ncclEpHandleDestroy(h) };
        }
    }
}

impl Handles {
    pub fn create(c: &Case, w: &World, bufs: &mut [RankBufs]) -> Result<Handles, String> {
        let mut hs = Handles(Vec::new());
        for (r, b) in bufs.iter_mut().enumerate() {
            let mut h = std::ptr::null_mut();
            // SAFETY: writes one handle to the live local `h`; `w.groups[r]` is a live group; the
            // top-k descriptor (and its sizes) is boxed in `b` and its device buffer owned by `b`;
            // config and layout info may be NULL; the stream is live.
            ep_ok!(unsafe {
                ncclEpCreateHandle(
                    &mut h,
                    w.groups[r],
                    ncclEpLayout_t(c.layout.raw()),
                    b.topk.ptr(),
                    std::ptr::null(),
                    std::ptr::null(),
                    w.streams[r].raw(),
                )
            });
            hs.0.push(h);
        }
        Ok(hs)
    }

    /// Destroys every handle now, failing on the first error code.
    pub fn destroy(mut self) -> Result<(), String> {
        for h in std::mem::take(&mut self.0) {
            // SAFETY: each handle came from the library and is destroyed once (taken out of
            // `self`, so the drop does not destroy it again); its group is still live.
            ep_ok!(unsafe { ncclEpHandleDestroy(h) });
        }
        Ok(())
    }
}

/// The small LL case both binaries start from (tests vary it).
pub fn base_case(nranks: usize, layout: Layout) -> Case {
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
