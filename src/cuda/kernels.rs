//! What a kernel registry entry is, and the CUDA layer's own self-test kernel.
//!
//! The registry itself, `runtime::kernel_registry::KERNEL_FILES`, lives with the
//! runtime, which owns the kernels; this layer only compiles whatever source it is handed.

use super::jit::{Defines, KernelSource};

/// One kernel source file and the define sets it is compiled with.
#[derive(Clone, Copy, Debug)]
pub struct KernelFile {
    pub source: KernelSource,
    /// Every specialisation the library can request (representative ones where the space is
    /// large: each distinct code path at least once).
    pub variants: fn() -> Vec<Defines>,
}

/// `kernels/selftest.cu`: `extern "C" __global__ void ep_selftest(unsigned* out, unsigned v, unsigned n)`
/// writes `out[i] = v + i * EP_SELFTEST_STRIDE` for `i < n`.
pub const SELFTEST: KernelSource = KernelSource {
    name: "selftest.cu",
    source: include_str!("../../kernels/selftest.cu"),
};

pub fn selftest_variants() -> Vec<Defines> {
    vec![Defines::new(), Defines::new().set("EP_SELFTEST_STRIDE", 3)]
}
