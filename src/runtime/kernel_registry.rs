//! The registry of CUDA source files under `kernels/` and their specialisation variants.
//!
//! Every `kernels/*.cu` file must appear in [`KERNEL_FILES`] (the `nvrtc_compile` test checks
//! this) together with a function listing the `-D` define sets the library may compile it with,
//! so CI compiles every variant for every supported architecture. A kernel module exposes its
//! `SOURCE` and `variants()` and adds one line here. It lives in the runtime, which owns the
//! kernels, so that `crate::cuda` never depends on the runtime.

use crate::cuda::kernels::{KernelFile, SELFTEST, selftest_variants};
use crate::runtime::{ht_kernels, kernels};

pub static KERNEL_FILES: &[KernelFile] = &[
    KernelFile {
        source: SELFTEST,
        variants: selftest_variants,
    },
    KernelFile {
        source: kernels::LL_DISPATCH,
        variants: kernels::ll_dispatch_variants,
    },
    KernelFile {
        source: kernels::LL_COMBINE,
        variants: kernels::ll_combine_variants,
    },
    KernelFile {
        source: kernels::LL_CLEAN,
        variants: kernels::ll_clean_variants,
    },
    KernelFile {
        source: ht_kernels::HT_META,
        variants: ht_kernels::ht_meta_variants,
    },
    KernelFile {
        source: ht_kernels::HT_DISPATCH,
        variants: ht_kernels::ht_dispatch_variants,
    },
    KernelFile {
        source: ht_kernels::HT_COMBINE,
        variants: ht_kernels::ht_combine_variants,
    },
];
