//! Which kernel variant a call needs, its NVRTC source and defines, and its launch.

use crate::cuda::jit::{Defines, KernelSource};
use crate::cuda::memory::Stream;
use crate::cuda::module::{Function, launch};
use crate::runtime::kernel_cache::{self, CachedModule};
use crate::runtime::ll_params::{LL_CLEAN_THREADS, LL_THREADS, LlParams};
use crate::sys::cudaStream_t;
use ep_core::enums::{DType, Layout, dtype};
use ep_core::error::Result;
use std::ffi::c_void;

/// The kernels with the common headers prepended (ep_params.cuh is generated from
/// `runtime::kernel_abi`), so NVRTC needs no include path.
pub const LL_DISPATCH: KernelSource = KernelSource {
    name: "ll_dispatch.cu",
    source: concat!(
        include_str!("../../kernels/ep_device.cuh"),
        "\n",
        include_str!("../../kernels/ep_params.cuh"),
        "\n",
        include_str!("../../kernels/ll_common.cuh"),
        "\n",
        include_str!("../../kernels/ll_dispatch.cu")
    ),
};
pub const LL_COMBINE: KernelSource = KernelSource {
    name: "ll_combine.cu",
    source: concat!(
        include_str!("../../kernels/ep_device.cuh"),
        "\n",
        include_str!("../../kernels/ep_params.cuh"),
        "\n",
        include_str!("../../kernels/ll_common.cuh"),
        "\n",
        include_str!("../../kernels/ll_combine.cu")
    ),
};

pub const LL_CLEAN: KernelSource = KernelSource {
    name: "ll_clean.cu",
    source: concat!(
        include_str!("../../kernels/ep_device.cuh"),
        "\n",
        include_str!("../../kernels/ep_params.cuh"),
        "\n",
        include_str!("../../kernels/ll_common.cuh"),
        "\n",
        include_str!("../../kernels/ll_clean.cu")
    ),
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LlKind {
    Dispatch,
    Combine,
    /// The barrier of `ncclEpMaskClean` (one block; top-k, layout and index width unused).
    Clean,
}

/// Token type of combine's rows (`EP_DTYPE`). Dispatch moves bytes and has one variant for all
/// types; combine reduces in fp32 and needs the type at compile time, so that the bf16 kernel
/// carries no branch for the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LlDtype {
    Bf16 = 0,
    F16 = 1,
    F32 = 2,
    /// bf16 expert outputs and result, combined with `NCCL_EP_COMB_QUANT_NVFP4`: the messages
    /// carry E2M1 values and E4M3 block scales (docs/LL.md, "NVFP4 combine").
    Nvfp4 = 3,
}

impl LlDtype {
    /// Every combine variant key: the three token types, then bf16 with NVFP4.
    pub const ALL: [LlDtype; 4] = [LlDtype::Bf16, LlDtype::F16, LlDtype::F32, LlDtype::Nvfp4];

    /// The type of an `ncclDataType_t` the LL rules accepted.
    pub fn from_nccl(dt: DType) -> Result<Self> {
        match dt {
            dtype::BFLOAT16 => Ok(Self::Bf16),
            dtype::FLOAT16 => Ok(Self::F16),
            dtype::FLOAT32 => Ok(Self::F32),
            _ => Err(ep_core::internal_err!(
                "LOW_LATENCY has no kernel for tokens of type {}",
                dt.name()
            )),
        }
    }
}

/// One compiled specialisation: the kernel, its top-k, layout, routing-index width, whether
/// the group masks (`EP_MASK`: kernels of groups without `enable_mask` carry no mask code) and,
/// for combine, the token type (`Bf16` for the other kernels, which do not depend on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LlKernel {
    pub kind: LlKind,
    pub topk: u32,
    pub expert_major: bool,
    pub idx64: bool,
    pub mask: bool,
    pub dtype: LlDtype,
}

impl LlKernel {
    pub fn dispatch(topk: u32, layout: Layout, idx64: bool, mask: bool) -> Self {
        Self {
            kind: LlKind::Dispatch,
            topk,
            expert_major: layout == Layout::ExpertMajor,
            idx64,
            mask,
            dtype: LlDtype::Bf16,
        }
    }
    pub fn combine(topk: u32, layout: Layout, idx64: bool, mask: bool, dtype: LlDtype) -> Self {
        Self {
            kind: LlKind::Combine,
            topk,
            expert_major: layout == Layout::ExpertMajor,
            idx64,
            mask,
            dtype,
        }
    }

    /// The one variant of the clean kernel (only groups with `enable_mask` run it).
    pub fn clean() -> Self {
        Self {
            kind: LlKind::Clean,
            topk: 1,
            expert_major: false,
            idx64: false,
            mask: true,
            dtype: LlDtype::Bf16,
        }
    }

    pub fn name(&self) -> &'static str {
        self.kernels()[0]
    }

    /// The kernels of its module: the one named [`LlKernel::name`].
    pub fn kernels(&self) -> &'static [&'static str] {
        match self.kind {
            LlKind::Dispatch => &["ll_dispatch"],
            LlKind::Combine => &["ll_combine"],
            LlKind::Clean => &["ll_clean"],
        }
    }

    pub fn source(&self) -> &'static KernelSource {
        match self.kind {
            LlKind::Dispatch => &LL_DISPATCH,
            LlKind::Combine => &LL_COMBINE,
            LlKind::Clean => &LL_CLEAN,
        }
    }

    pub fn defines(&self) -> Defines {
        let d = Defines::new()
            .set("EP_TOPK", self.topk)
            .set("EP_EM", self.expert_major as u32)
            .set("EP_IDX64", self.idx64 as u32)
            .set("EP_MASK", self.mask as u32);
        match self.kind {
            LlKind::Combine => d.set("EP_DTYPE", self.dtype as u32),
            LlKind::Dispatch | LlKind::Clean => d,
        }
    }

    /// Every variant the library may compile for one kernel: K in 1..=32, both layouts,
    /// both routing-index widths, with and without masking, and for combine each token type.
    pub fn variants(kind: LlKind) -> Vec<LlKernel> {
        if kind == LlKind::Clean {
            return vec![Self::clean()];
        }
        let dtypes = match kind {
            LlKind::Combine => LlDtype::ALL.to_vec(),
            _ => vec![LlDtype::Bf16],
        };
        let mut v = Vec::new();
        for dtype in dtypes {
            for topk in 1..=ep_core::config::LL_MAX_TOPK {
                for expert_major in [false, true] {
                    for idx64 in [false, true] {
                        for mask in [false, true] {
                            v.push(LlKernel {
                                kind,
                                topk,
                                expert_major,
                                idx64,
                                mask,
                                dtype,
                            });
                        }
                    }
                }
            }
        }
        v
    }

    /// Dynamic shared memory of one launch (bytes).
    pub fn smem_bytes(&self, p: &LlParams, blocks: u32) -> usize {
        match self.kind {
            LlKind::Combine | LlKind::Clean => 0,
            LlKind::Dispatch => {
                let tpb = (p.num_tokens.max(0) as usize).div_ceil(blocks.max(1) as usize);
                let route = 4 * (2 * self.topk as usize + 1);
                let idx = 4 * p.num_tokens.max(0) as usize * self.topk as usize;
                let send = 4 * p.num_experts as usize + 4 * (p.nranks as usize).next_multiple_of(4) + tpb * route + idx;
                let recv = 4 * 64 + 4 * p.num_experts as usize;
                send.max(recv)
            }
        }
    }

    /// The loaded kernel for `device` (the runtime's kernel cache: the first call per
    /// (variant, device) compiles or reads the JIT's caches, later calls are one lookup).
    fn function(&self, device: i32) -> Result<Function> {
        kernel_cache::function(*self, self.name(), device)
    }
}

/// Compiles (or finds in the cache) and loads one LL kernel now, so that a later launch does not
/// compile while peers already wait for it (the clean kernel of groups with `enable_mask`).
pub fn preload(device: i32, k: LlKernel) -> Result<()> {
    let _ctx = crate::cuda::context::CtxGuard::enter(device)?;
    k.function(device).map(|_| ())
}

/// Compiles (or finds in the cache) and launches one LL kernel on the caller's stream.
pub fn launch_ll(device: i32, k: LlKernel, p: &LlParams, blocks: u32, stream: cudaStream_t) -> Result<()> {
    let threads = match k.kind {
        LlKind::Clean => LL_CLEAN_THREADS,
        _ => LL_THREADS,
    };
    let _ctx = crate::cuda::context::CtxGuard::enter(device)?;
    crate::host_profile::mark("context");
    let f = k.function(device)?;
    crate::host_profile::mark("function");
    let smem = k.smem_bytes(p, blocks);
    if smem > 48 * 1024 {
        f.set_max_dynamic_smem(smem)?;
        crate::host_profile::mark("smem attribute");
    }
    // The driver only reads the argument (and copies it before returning), so it gets `p`
    // itself: no copy of the 1.3 KB block on the host path.
    let mut args = [p as *const LlParams as *mut c_void];
    // SAFETY: ll_dispatch / ll_combine take one `LlParams` by value; every pointer in it was
    // validated against the caller's tensors, which must outlive the operation (C contract).
    unsafe {
        let stream = Stream::from_raw(stream.cast());
        launch(f, blocks, threads, smem as u32, stream, &mut args)
    }
}

/// Define sets of every dispatch variant (for the NVRTC registry in `kernel_registry`).
pub fn ll_dispatch_variants() -> Vec<Defines> {
    LlKernel::variants(LlKind::Dispatch)
        .iter()
        .map(LlKernel::defines)
        .collect()
}

/// Define sets of every combine variant.
pub fn ll_combine_variants() -> Vec<Defines> {
    LlKernel::variants(LlKind::Combine)
        .iter()
        .map(LlKernel::defines)
        .collect()
}

/// Define sets of the clean kernel (one).
pub fn ll_clean_variants() -> Vec<Defines> {
    LlKernel::variants(LlKind::Clean)
        .iter()
        .map(LlKernel::defines)
        .collect()
}

impl CachedModule for LlKernel {
    fn source(&self) -> &'static KernelSource {
        LlKernel::source(self)
    }
    fn defines(&self) -> Defines {
        LlKernel::defines(self)
    }
    fn kernels(&self) -> &'static [&'static str] {
        LlKernel::kernels(self)
    }
    fn loaded() -> &'static parking_lot::Mutex<kernel_cache::Map<Self>> {
        static LOADED: std::sync::LazyLock<parking_lot::Mutex<kernel_cache::Map<LlKernel>>> =
            std::sync::LazyLock::new(Default::default);
        &LOADED
    }
}
