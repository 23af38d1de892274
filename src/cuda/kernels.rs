//! The registry of CUDA source files under `kernels/` and their specialisation variants.
//!
//! Every `kernels/*.cu` file must appear in [`KERNEL_FILES`] (the `nvrtc_compile` test checks
//! this) together with a function listing the `-D` define sets the library may compile it with,
//! so CI compiles every variant for every supported architecture. A kernel module exposes its
//! `SOURCE` and `variants()` and adds one line here.

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

pub static KERNEL_FILES: &[KernelFile] = &[
    KernelFile {
        source: SELFTEST,
        variants: selftest_variants,
    },
    KernelFile {
        source: crate::runtime::kernels::LL_DISPATCH,
        variants: crate::runtime::kernels::ll_dispatch_variants,
    },
    KernelFile {
        source: crate::runtime::kernels::LL_COMBINE,
        variants: crate::runtime::kernels::ll_combine_variants,
    },
    KernelFile {
        source: crate::runtime::kernels::LL_CLEAN,
        variants: crate::runtime::kernels::ll_clean_variants,
    },
    KernelFile {
        source: crate::runtime::ht_kernels::HT_META,
        variants: crate::runtime::ht_kernels::ht_meta_variants,
    },
    KernelFile {
        source: crate::runtime::ht_kernels::HT_DISPATCH,
        variants: crate::runtime::ht_kernels::ht_dispatch_variants,
    },
    KernelFile {
        source: crate::runtime::ht_kernels::HT_COMBINE,
        variants: crate::runtime::ht_kernels::ht_combine_variants,
    },
];
