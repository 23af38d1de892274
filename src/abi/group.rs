//! `ncclEpCreateGroup` / `ncclEpGroupDestroy`.

use super::guard::{ffi_call, out_ptr, read_req};
use super::objects;
use super::types::*;
use crate::runtime::group::Group;

/// Creates this rank's EP group on `comm` (collective over the communicator).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpCreateGroup(
    ep_group: *mut ncclEpGroup_t,
    comm: ncclComm_t,
    config: *const ncclEpGroupConfig_t,
) -> ncclResult_t {
    ffi_call("ncclEpCreateGroup", || {
        // SAFETY: C contract.
        let out = unsafe { out_ptr(ep_group, "ep_group") }?;
        *out = std::ptr::null_mut();
        // SAFETY: C contract.
        let cfg = unsafe { read_req(config, "config") }?;
        ep_core::ensure_arg!(!comm.is_null(), "comm is NULL");
        let (cfg, alloc) = super::convert::group_config(&cfg);
        // SAFETY: C contract: comm is the caller's live communicator.
        let g = unsafe { Group::from_comm(comm, &cfg, alloc) }?;
        *out = objects::publish_group(g);
        Ok(())
    })
}

/// Destroys a group; all of its handles must be destroyed first. Collective for groups whose
/// ranks span processes, as NVIDIA's: it waits (at most the group's timeout) for every rank's
/// destroy before freeing the buffer the peers map; past the timeout the buffer stays allocated.
/// A call on the group in progress on another thread finishes first; one that comes later
/// fails with ncclInvalidArgument.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpGroupDestroy(ep_group: ncclEpGroup_t) -> ncclResult_t {
    ffi_call("ncclEpGroupDestroy", || {
        if ep_group.is_null() {
            return Ok(());
        }
        // The destroy barrier runs here, once, in the caller's destroy and under the group's
        // lock; never at the drop of a later reference (a call racing the destroy may hold one).
        let gr = objects::group(ep_group)?;
        let mut g = gr.lock()?;
        ep_core::ensure_usage!(
            g.live_handles == 0,
            "the group still has {} live handle(s); destroy them with ncclEpHandleDestroy first",
            g.live_handles
        );
        // Under the lock, so of two racing destroys exactly one gets here (the other failed in
        // lock(), or finds the entry gone).
        ep_core::ensure_arg!(
            objects::unpublish_group(ep_group, &gr),
            "ep_group {ep_group:p} is not a live group (destroyed already, or never created)"
        );
        g.destroy();
        Ok(())
    })
}
