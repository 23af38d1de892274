//! Dispatch, combine, complete and handle destroy: lock the handle's group (through the
//! handle's own reference to it), resolve window-backed tensors (runtime::window) and route the
//! call to its mode. The caller holds the handle's
//! lock (`SharedHandle::lock`), which comes before the group's.

use crate::runtime::handle::{Handle, HandleMem};
use crate::runtime::ll::LlGroup;
use crate::runtime::{ht, ll, window};
use crate::sys::cudaStream_t;
use ep_core::enums::Algorithm;
use ep_core::error::Result;
use ep_core::op_args::{CombineArgs, DispatchArgs};

pub fn dispatch(h: &mut Handle, mut args: DispatchArgs, stream: cudaStream_t) -> Result<()> {
    let group = h.group.clone();
    let mut g = group.lock()?;
    crate::host_profile::mark("group");
    window::resolve_dispatch(&g, &mut args)?;
    crate::host_profile::mark("windows");
    match g.params.algorithm {
        Algorithm::LowLatency => ll::dispatch(&mut g, h, &args, stream),
        Algorithm::HighThroughput => ht::dispatch(&mut g, h, &args, stream),
    }
}

pub fn combine(h: &mut Handle, mut args: CombineArgs, stream: cudaStream_t) -> Result<()> {
    let group = h.group.clone();
    let mut g = group.lock()?;
    crate::host_profile::mark("group");
    window::resolve_combine(&g, &mut args)?;
    crate::host_profile::mark("windows");
    match g.params.algorithm {
        Algorithm::LowLatency => ll::combine(&mut g, h, &args, stream),
        Algorithm::HighThroughput => ht::combine(&mut g, h, &args, stream),
    }
}

pub fn complete(h: &mut Handle, stream: cudaStream_t) -> Result<()> {
    let group = h.group.clone();
    let mut g = group.lock()?;
    match g.params.algorithm {
        Algorithm::LowLatency => ll::complete(&mut g, h, stream),
        Algorithm::HighThroughput => Ok(()),
    }
}

/// `ncclEpHandleDestroy` (the handle is already out of the ABI registry): the group forgets
/// the handle, including a `send_only` operation it left pending (NVIDIA's destroy drops the
/// pending receive with the handle, without running it; so do we: the group accepts new
/// operations again), and the handle's own metadata block is freed now, not whenever a call
/// racing the destroy drops its reference.
pub fn destroy_handle(h: &mut Handle) -> Result<()> {
    h.destroyed = true;
    let group = h.group.clone();
    // A group with live handles refuses to be destroyed, so this lock does not fail.
    let mut g = group.lock()?;
    g.live_handles = g.live_handles.saturating_sub(1);
    if let Ok(l) = g.ll_mut() {
        ll::forget_pending(&mut l.pending, h.id);
    }
    drop(g);
    h.mem = HandleMem::None;
    Ok(())
}
