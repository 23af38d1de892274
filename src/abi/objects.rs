//! Live groups and handles, by address, so that a NULL, stale or foreign pointer from C is
//! an error code instead of a crash.
// The pointer arguments are checked against the live set before use, hence safe functions.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use super::types::{ncclEpGroup, ncclEpGroup_t, ncclEpHandle, ncclEpHandle_t};
use crate::runtime::{group::Group, handle::Handle};
use ep_core::error::Result;
use std::collections::HashSet;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Live addresses, one set per kind: a group's address passed as a handle (or the reverse,
/// which a stale pointer can become once malloc reuses the address) must be rejected.
fn live_groups() -> MutexGuard<'static, HashSet<usize>> {
    static L: OnceLock<Mutex<HashSet<usize>>> = OnceLock::new();
    L.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

fn live_handles() -> MutexGuard<'static, HashSet<usize>> {
    static L: OnceLock<Mutex<HashSet<usize>>> = OnceLock::new();
    L.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

pub fn publish_group(g: Group) -> ncclEpGroup_t {
    let p = Box::into_raw(Box::new(ncclEpGroup { inner: g }));
    live_groups().insert(p as usize);
    p
}

pub fn publish_handle(h: Handle) -> ncclEpHandle_t {
    let p = Box::into_raw(Box::new(ncclEpHandle { inner: h }));
    live_handles().insert(p as usize);
    p
}

/// The group behind a C pointer, if it is one we handed out and have not destroyed.
pub fn group<'a>(p: ncclEpGroup_t) -> Result<&'a mut Group> {
    ep_core::ensure_arg!(!p.is_null(), "ep_group is NULL");
    ep_core::ensure_arg!(
        live_groups().contains(&(p as usize)),
        "ep_group {p:p} is not a live group (destroyed already, or never created)"
    );
    // SAFETY: the address is a live Box<ncclEpGroup> we created; callers must not use one group
    // from several threads at once except as documented.
    Ok(unsafe { &mut (*p).inner })
}

pub fn handle<'a>(p: ncclEpHandle_t) -> Result<&'a mut Handle> {
    ep_core::ensure_arg!(!p.is_null(), "handle is NULL");
    ep_core::ensure_arg!(
        live_handles().contains(&(p as usize)),
        "handle {p:p} is not a live handle (destroyed already, or never created)"
    );
    // SAFETY: as in `group`.
    Ok(unsafe { &mut (*p).inner })
}

/// Removes a group from the live set and gives ownership back.
pub fn take_group(p: ncclEpGroup_t) -> Result<Box<ncclEpGroup>> {
    group(p)?;
    live_groups().remove(&(p as usize));
    // SAFETY: created by publish_group and now unreachable from C.
    Ok(unsafe { Box::from_raw(p) })
}

pub fn take_handle(p: ncclEpHandle_t) -> Result<Box<ncclEpHandle>> {
    handle(p)?;
    live_handles().remove(&(p as usize));
    // SAFETY: created by publish_handle and now unreachable from C.
    Ok(unsafe { Box::from_raw(p) })
}
