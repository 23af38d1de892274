//! Dispatch, combine and complete: route the call to its mode.

use crate::abi::enums::Algorithm;
use crate::abi::types::cudaStream_t;
use crate::core::error::Result;
use crate::core::op_args::{CombineArgs, DispatchArgs};
use crate::runtime::handle::Handle;
use crate::runtime::{ht, ll};

pub fn dispatch(h: &mut Handle, args: &DispatchArgs, stream: cudaStream_t) -> Result<()> {
    let g = crate::abi::objects::group(h.group)?;
    match g.params.algorithm {
        Algorithm::LowLatency => ll::dispatch(g, h, args, stream),
        Algorithm::HighThroughput => ht::dispatch(g, h, args, stream),
    }
}

pub fn combine(h: &mut Handle, args: &CombineArgs, stream: cudaStream_t) -> Result<()> {
    let g = crate::abi::objects::group(h.group)?;
    match g.params.algorithm {
        Algorithm::LowLatency => ll::combine(g, h, args, stream),
        Algorithm::HighThroughput => ht::combine(g, h, args, stream),
    }
}

pub fn complete(h: &mut Handle, stream: cudaStream_t) -> Result<()> {
    let g = crate::abi::objects::group(h.group)?;
    match g.params.algorithm {
        Algorithm::LowLatency => ll::complete(g, h, stream),
        Algorithm::HighThroughput => Ok(()),
    }
}
