//! Groups and handles: the objects behind the C handles, tying the pure core to the GPU.

pub mod alloc;
pub mod create;
pub mod group;
pub mod handle;
pub mod ht;
pub mod ht_kernels;
pub mod ht_params;
pub mod kernel_abi;
pub mod kernel_cache;
pub mod kernel_header;
pub mod kernel_registry;
pub mod kernels;
pub mod ll;
pub mod ll_params;
pub mod ops;
pub mod window;
