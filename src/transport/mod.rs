//! How ranks reach each other's memory. Kernels see plain pointers, never the transport.

pub mod identity;
pub mod ipc;
pub mod ipc_maps;
pub mod local;
pub mod nccl;
pub mod peers;
pub mod watchdog;
