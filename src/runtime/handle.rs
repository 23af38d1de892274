//! A routing handle: layout, top-k, the caller's routing tensor and the metadata block that
//! dispatch writes and combine reads.

use crate::runtime::alloc::GroupMem;
use ep_core::handle_rules::HandleParams;
use ep_core::tensor::TensorView;

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
    /// The owning group's C object, by address: the ABI layer's registry resolves it (kept
    /// alive: a group with live handles refuses to be destroyed).
    pub group: usize,
    pub params: HandleParams,
    /// The last routing given to `ncclEpUpdateHandle`/`ncclEpCreateHandle`.
    pub topk_idx: Option<TensorView>,
    pub mem: HandleMem,
    /// A dispatch ran on this handle, so combine has its metadata.
    pub dispatched: bool,
    /// HT local groups: the last update was not waited for (one thread may drive every rank),
    /// so the next dispatch or combine checks its result first (docs/HT.md).
    pub ht_unchecked: bool,
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
