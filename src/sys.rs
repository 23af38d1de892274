//! Types that other libraries' headers own (nccl.h, cuda_runtime.h) and that cross this
//! library's boundary: the C ABI receives them, the runtime and the transport pass them on. A
//! leaf module, so that neither of those imports the ABI layer for them. Never emitted into our
//! headers (nccl_ep.h includes nccl.h and cuda_runtime.h).
#![allow(non_camel_case_types)]

use std::ffi::c_int;

/// Opaque NCCL communicator (`struct ncclComm` in nccl.h).
pub enum ncclComm {}
pub type ncclComm_t = *mut ncclComm;
/// Opaque NCCL window (`ncclWindow_t` in nccl.h); we only pass it through.
pub enum ncclWindow_vidmem {}
pub type ncclWindow_t = *mut ncclWindow_vidmem;
/// Opaque CUDA stream (`cudaStream_t` / `CUstream`).
pub enum CUstream_st {}
pub type cudaStream_t = *mut CUstream_st;
/// `ncclResult_t` from nccl.h, a 4-byte enum.
pub type ncclResult_t = c_int;
/// `ncclDataType_t` from nccl.h, a 4-byte enum.
pub type ncclDataType_t = c_int;
/// `cudaError_t` from the CUDA runtime, a 4-byte enum.
pub type cudaError_t = c_int;
