//! The CUDA layer: driver calls, contexts, memory, NVRTC and the kernel JIT.
//!
//! * **Dynamic loading.** `libcuda.so.1` and `libnvrtc.so.13` are opened at run time through
//!   cudarc's `dynamic-loading` bindings; nothing CUDA is linked, so `libnccl_ep.so` loads on a
//!   machine without CUDA and its calls return errors there.
//! * **No panics.** cudarc's loaders panic when a library or symbol is missing. [`driver::driver`]
//!   and [`nvrtc`] first ask `is_culib_present()` and then check every symbol this crate uses
//!   (the `SYMBOLS` lists) before the first real call, and remember the outcome. Every public
//!   function returns `Result<_, Error>` with `ErrorKind::System` (library missing) or
//!   `ErrorKind::Cuda` (a CUDA call failed; the message has the call and `cuGetErrorName` text,
//!   or NVRTC's log).
//! * **Primary contexts, saved and restored.** Work happens in each device's primary context —
//!   the CUDA runtime's, hence PyTorch's — retained once per process and never released or
//!   destroyed. [`context::CtxGuard`] makes it current for a scope and restores whatever the
//!   calling thread had current before, including nothing.
//! * **The caller's stream only.** Asynchronous work is queued on the `cudaStream_t` the caller
//!   passed ([`memory::stream_from_raw`]); this layer creates no streams of its own, and
//!   [`context::ensure_stream_on_device`] checks that a stream belongs to the expected device.
//!   [`memory::stream_is_capturing`] tells when a stream is being captured into a CUDA graph, so
//!   nothing synchronises there.
//! * **No event tracking.** Unlike cudarc's safe `CudaSlice`, nothing records or waits on events
//!   behind the caller's back; raw device pointers are used and ordering is the stream's.
//! * **Unresolved (known):** cudarc declares `CUresult`/`nvrtcResult` as Rust enums for the
//!   CUDA 13.0 headers; a newer library returning a code unknown to 13.0 would be undefined
//!   behaviour in principle. The calls we make return long-established codes.
//!
//! # Module graph
//! Nothing here imports `crate::runtime`, `crate::transport` or `crate::abi`; from the rest of
//! the crate only `ep_core::error` and its macros. Inside this layer the imports form a DAG,
//! listed in dependency order (a module imports only modules in rows above it):
//!
//! | module    | imports (within `cuda`)                    |
//! |-----------|--------------------------------------------|
//! | `driver`  | —                                          |
//! | `nvrtc`   | —                                          |
//! | `cache`   | —                                          |
//! | `stream`  | `driver`                                   |
//! | `context` | `driver`, `stream`                         |
//! | `memory`  | `driver`, `stream`, `context`              |
//! | `module`  | `driver`, `stream`                         |
//! | `jit`     | `driver`, `context`, `module`, `nvrtc`, `cache` |
//! | `kernels` | `jit`                                      |
//!
//! The kernel registry (which `kernels/*.cu` exist and their variants) belongs to the runtime:
//! `crate::runtime::kernel_registry`.

pub mod cache;
pub mod context;
pub mod driver;
pub mod jit;
pub mod kernels;
pub mod memory;
pub mod module;
pub mod nvrtc;
pub mod stream;

pub use context::{
    CtxGuard, current_device, enable_peer_access, ensure_stream_on_device, primary_context, stream_device,
};
pub use driver::{
    CUdeviceptr, CUstream, can_access_peer, compute_capability, device_count, driver, driver_available, sm_count,
};
pub use jit::{Defines, KernelSource, arch_for_cc, compile, get_function};
pub use memory::{DeviceMem, Event, PinnedHostMem, stream_is_capturing, stream_synchronize};
pub use module::{Dim3, Function, Module, launch, launch_cooperative};
pub use stream::{Stream, stream_from_raw};
