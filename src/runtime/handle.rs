//! A routing handle: layout, top-k, the caller's routing tensor and the metadata block that
//! dispatch writes and combine reads.

use crate::runtime::alloc::GroupMem;
use crate::runtime::group::GroupRef;
use ep_core::error::Result;
use ep_core::handle_rules::HandleParams;
use ep_core::tensor::TensorView;
use parking_lot::{Mutex, MutexGuard};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A handle's identity for the lifetime of the process: never reused, unlike its address (a
/// pending `send_only` is keyed by it, so a new handle at a freed handle's address cannot
/// complete the old one's operation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HandleId(u64);

impl HandleId {
    /// A fresh id (a process-wide counter; 2^64 handles never wrap).
    pub fn next() -> HandleId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        HandleId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// Where the handle's metadata block lives.
#[derive(Debug)]
pub enum HandleMem {
    /// None: HIGH_THROUGHPUT (until its issue lands), or a group without GPU state.
    None,
    /// The caller's `handle_mem` tensor (never freed by us).
    Caller { ptr: u64, bytes: usize },
    /// Allocated for the handle, freed with it.
    Owned(GroupMem),
}

pub struct Handle {
    pub id: HandleId,
    /// The owning group (the group refuses `ncclEpGroupDestroy` while it has live handles).
    pub group: GroupRef,
    pub params: HandleParams,
    /// The last routing given to `ncclEpUpdateHandle`/`ncclEpCreateHandle`.
    pub topk_idx: Option<TensorView>,
    pub mem: HandleMem,
    /// A dispatch ran on this handle, so combine has its metadata.
    pub dispatched: bool,
    /// HT local groups: the last update was not waited for (one thread may drive every rank),
    /// so the next dispatch or combine checks its result first (docs/HT.md).
    pub ht_unchecked: bool,
    /// `ncclEpHandleDestroy` ran (see [`SharedHandle::lock`]).
    pub destroyed: bool,
}

impl Handle {
    pub fn meta_ptr(&self) -> u64 {
        match &self.mem {
            HandleMem::None => 0,
            HandleMem::Caller { ptr, .. } => *ptr,
            HandleMem::Owned(m) => m.ptr(),
        }
    }
}

/// A handle as the ABI registry (and any call in progress on it) holds it. Its lock serialises
/// the calls on the handle and is taken before its group's (`SharedGroup`); parking_lot, as
/// there.
pub struct SharedHandle {
    state: Mutex<Handle>,
}

pub type HandleRef = Arc<SharedHandle>;

impl SharedHandle {
    pub fn new(h: Handle) -> HandleRef {
        Arc::new(SharedHandle { state: Mutex::new(h) })
    }

    /// Locks the handle for one call; fails if `ncclEpHandleDestroy` ran meanwhile.
    pub fn lock(&self) -> Result<MutexGuard<'_, Handle>> {
        let h = self.state.lock();
        ep_core::ensure_arg!(
            !h.destroyed,
            "the handle was destroyed (ncclEpHandleDestroy on another thread) while this call waited for it"
        );
        Ok(h)
    }
}
