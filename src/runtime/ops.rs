//! Dispatch, combine and complete: per-mode validation, then the GPU work.

use crate::abi::types::cudaStream_t;
use crate::core::error::Result;
use crate::core::op_args::{CombineArgs, DispatchArgs};
use crate::runtime::handle::Handle;

pub fn dispatch(h: &mut Handle, _args: &DispatchArgs, _stream: cudaStream_t) -> Result<()> {
    let g = crate::abi::objects::group(h.group)?;
    Err(g.not_implemented("ncclEpDispatch"))
}

pub fn combine(h: &mut Handle, _args: &CombineArgs, _stream: cudaStream_t) -> Result<()> {
    let g = crate::abi::objects::group(h.group)?;
    Err(g.not_implemented("ncclEpCombine"))
}

/// Nothing is ever pending until send_only lands, so completing is a no-op.
pub fn complete(_h: &mut Handle, _stream: cudaStream_t) -> Result<()> {
    Ok(())
}
