//! Dispatch, combine and complete: route the call to its mode.

use crate::runtime::group::Group;
use crate::runtime::handle::Handle;
use crate::runtime::{ht, ll};
use crate::sys::cudaStream_t;
use ep_core::enums::Algorithm;
use ep_core::error::Result;
use ep_core::op_args::{CombineArgs, DispatchArgs};

pub fn dispatch(g: &mut Group, h: &mut Handle, args: &DispatchArgs, stream: cudaStream_t) -> Result<()> {
    match g.params.algorithm {
        Algorithm::LowLatency => ll::dispatch(g, h, args, stream),
        Algorithm::HighThroughput => ht::dispatch(g, h, args, stream),
    }
}

pub fn combine(g: &mut Group, h: &mut Handle, args: &CombineArgs, stream: cudaStream_t) -> Result<()> {
    match g.params.algorithm {
        Algorithm::LowLatency => ll::combine(g, h, args, stream),
        Algorithm::HighThroughput => ht::combine(g, h, args, stream),
    }
}

pub fn complete(g: &mut Group, h: &mut Handle, stream: cudaStream_t) -> Result<()> {
    match g.params.algorithm {
        Algorithm::LowLatency => ll::complete(g, h, stream),
        Algorithm::HighThroughput => Ok(()),
    }
}
