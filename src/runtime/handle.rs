//! A routing handle: layout, top-k and the caller's routing tensor.

use crate::abi::types::ncclEpGroup_t;
use crate::core::handle_rules::HandleParams;
use crate::core::tensor::TensorView;

/// Where the handle's metadata block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleMem {
    /// Not allocated yet.
    None,
    /// The caller's `handle_mem` tensor (never freed by us).
    Caller { ptr: u64, bytes: usize },
}

pub struct Handle {
    /// The owning group (kept alive: a group with live handles refuses to be destroyed).
    pub group: ncclEpGroup_t,
    pub params: HandleParams,
    /// The last routing given to `ncclEpUpdateHandle`/`ncclEpCreateHandle`.
    pub topk_idx: Option<TensorView>,
    pub mem: HandleMem,
}
