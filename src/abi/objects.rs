//! Live groups and handles, by the address C holds, so that a NULL, stale or foreign pointer
//! from C is an error code instead of a crash.
//!
//! Each registry owns one `Arc` of each live object, under the address of the object the `Arc`
//! points to (stable while any `Arc` lives). The address is only a key: nothing is ever read
//! through a pointer C passes. A lookup clones the `Arc` for the call, so a destroy on another
//! thread (which removes the entry and drops the registry's `Arc`) never frees an object under
//! a call in progress; the call finds the object marked destroyed once it gets its lock
//! (`SharedGroup::lock`, `SharedHandle::lock`). One registry per kind: a group's address passed
//! as a handle (or the reverse, which a stale pointer can become once malloc reuses the
//! address) is rejected. The registry lock is the innermost: taken last, held only for the map.

use super::types::{ncclEpGroup, ncclEpGroup_t, ncclEpHandle, ncclEpHandle_t};
use crate::runtime::group::{Group, GroupRef, SharedGroup};
use crate::runtime::handle::{Handle, HandleRef, SharedHandle};
use ep_core::error::Result;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

type Registry<T> = LazyLock<Mutex<HashMap<usize, Arc<T>>>>;

static GROUPS: Registry<SharedGroup> = LazyLock::new(Default::default);
static HANDLES: Registry<SharedHandle> = LazyLock::new(Default::default);

fn key<T>(a: &Arc<T>) -> usize {
    Arc::as_ptr(a) as usize
}

pub fn publish_group(g: Group) -> ncclEpGroup_t {
    let g = SharedGroup::new(g);
    let k = key(&g);
    GROUPS.lock().insert(k, g);
    k as *mut ncclEpGroup
}

pub fn publish_handle(h: Handle) -> ncclEpHandle_t {
    let h = SharedHandle::new(h);
    let k = key(&h);
    HANDLES.lock().insert(k, h);
    k as *mut ncclEpHandle
}

/// The group behind a C pointer, if it is one we handed out and have not destroyed: a
/// reference of the caller's own, to lock for the call.
pub fn group(p: ncclEpGroup_t) -> Result<GroupRef> {
    ep_core::ensure_arg!(!p.is_null(), "ep_group is NULL");
    GROUPS.lock().get(&(p as usize)).cloned().ok_or_else(|| {
        ep_core::invalid_arg!("ep_group {p:p} is not a live group (destroyed already, or never created)")
    })
}

pub fn handle(p: ncclEpHandle_t) -> Result<HandleRef> {
    ep_core::ensure_arg!(!p.is_null(), "handle is NULL");
    HANDLES
        .lock()
        .get(&(p as usize))
        .cloned()
        .ok_or_else(|| ep_core::invalid_arg!("handle {p:p} is not a live handle (destroyed already, or never created)"))
}

/// Runs `f` on the locked group behind `p` (one call's worth).
pub fn with_group<R>(p: ncclEpGroup_t, f: impl FnOnce(&mut Group) -> Result<R>) -> Result<R> {
    let g = group(p)?;
    let mut locked = g.lock()?;
    f(&mut locked)
}

/// Removes group `g` (found at `p`) from the live set; false when another thread's destroy
/// removed it first. The caller holds `g`'s lock, so only one destroy gets true.
pub fn unpublish_group(p: ncclEpGroup_t, g: &GroupRef) -> bool {
    let mut live = GROUPS.lock();
    match live.get(&(p as usize)) {
        Some(cur) if Arc::ptr_eq(cur, g) => live.remove(&(p as usize)).is_some(),
        _ => false,
    }
}

/// Removes a handle from the live set and gives the registry's reference back.
pub fn take_handle(p: ncclEpHandle_t) -> Result<HandleRef> {
    ep_core::ensure_arg!(!p.is_null(), "handle is NULL");
    HANDLES
        .lock()
        .remove(&(p as usize))
        .ok_or_else(|| ep_core::invalid_arg!("handle {p:p} is not a live handle (destroyed already, or never created)"))
}
