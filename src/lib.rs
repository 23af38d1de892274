//! nccl-ep-rs: NVIDIA NCCL EP (Mixture-of-Experts dispatch and combine) as a C-ABI drop-in
//! `libnccl_ep.so`. See README.md for the layout of the crate.

pub mod abi;
pub mod cuda;
pub mod host_profile;
pub mod log;
pub mod runtime;
pub mod sys;
pub mod transport;
