//! Groups and handles: the objects behind the C handles, tying the pure core to the GPU.

pub mod group;
pub mod handle;
pub mod ops;
