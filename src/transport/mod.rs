//! How ranks reach each other's memory. Kernels see plain pointers, never the transport.

pub mod ipc;
pub mod local;
pub mod nccl;
