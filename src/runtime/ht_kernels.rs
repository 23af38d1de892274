//! The high-throughput kernels: NVRTC sources, specialisations and launches.

use crate::cuda::jit::{Defines, KernelSource};
use crate::cuda::memory::Stream;
use crate::cuda::module::{Function, launch};
use crate::runtime::ht_params::{HT_THREADS, HtParams};
use crate::runtime::kernel_cache::{self, CachedModule};
use crate::sys::cudaStream_t;
use ep_core::error::Result;
use std::ffi::c_void;

pub const HT_META: KernelSource = KernelSource {
    name: "ht_meta.cu",
    source: concat!(
        include_str!("../../kernels/ep_device.cuh"),
        "\n",
        include_str!("../../kernels/ep_params.cuh"),
        "\n",
        include_str!("../../kernels/ht_common.cuh"),
        "\n",
        include_str!("../../kernels/ht_meta.cu")
    ),
};
pub const HT_DISPATCH: KernelSource = KernelSource {
    name: "ht_dispatch.cu",
    source: concat!(
        include_str!("../../kernels/ep_device.cuh"),
        "\n",
        include_str!("../../kernels/ep_params.cuh"),
        "\n",
        include_str!("../../kernels/ht_common.cuh"),
        "\n",
        include_str!("../../kernels/ht_dispatch.cu")
    ),
};
pub const HT_COMBINE: KernelSource = KernelSource {
    name: "ht_combine.cu",
    source: concat!(
        include_str!("../../kernels/ep_device.cuh"),
        "\n",
        include_str!("../../kernels/ep_params.cuh"),
        "\n",
        include_str!("../../kernels/ht_common.cuh"),
        "\n",
        include_str!("../../kernels/ht_combine.cu")
    ),
};

/// Element type of combine's token rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HtDtype {
    Bf16 = 0,
    F16 = 1,
    F32 = 2,
}

/// One compiled module: which file and its specialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HtModule {
    /// ht_meta.cu: every metadata kernel and ht_close.
    Meta {
        idx64: bool,
        em: bool,
    },
    Dispatch {
        em: bool,
        bwd: bool,
    },
    Combine {
        em: bool,
        bwd: bool,
        dtype: HtDtype,
    },
}

impl HtModule {
    pub fn source(&self) -> &'static KernelSource {
        match self {
            HtModule::Meta { .. } => &HT_META,
            HtModule::Dispatch { .. } => &HT_DISPATCH,
            HtModule::Combine { .. } => &HT_COMBINE,
        }
    }

    pub fn defines(&self) -> Defines {
        match *self {
            HtModule::Meta { idx64, em } => Defines::new().set("EP_IDX64", idx64 as u32).set("EP_EM", em as u32),
            HtModule::Dispatch { em, bwd } => Defines::new().set("EP_EM", em as u32).set("EP_BWD", bwd as u32),
            HtModule::Combine { em, bwd, dtype } => Defines::new()
                .set("EP_EM", em as u32)
                .set("EP_BWD", bwd as u32)
                .set("EP_DTYPE", dtype as u32),
        }
    }

    /// Every module the library may compile.
    pub fn all() -> Vec<HtModule> {
        let mut v = Vec::new();
        for a in [false, true] {
            for b in [false, true] {
                v.push(HtModule::Meta { idx64: a, em: b });
                v.push(HtModule::Dispatch { em: a, bwd: b });
                for dtype in [HtDtype::Bf16, HtDtype::F16, HtDtype::F32] {
                    v.push(HtModule::Combine { em: a, bwd: b, dtype });
                }
            }
        }
        v
    }

    /// The kernels of this module.
    pub fn kernels(&self) -> &'static [&'static str] {
        match self {
            HtModule::Meta { .. } => &[
                "ht_reset",
                "ht_convert",
                "ht_pull",
                "ht_close",
                "ht_count",
                "ht_offsets",
                "ht_assign",
                "ht_publish",
            ],
            // ht_publish (ht_common.cuh): groups with remote ranks, before the exchange.
            HtModule::Dispatch { .. } => &["ht_dispatch_kernel", "ht_publish"],
            HtModule::Combine { .. } => &["ht_combine_kernel", "ht_publish"],
        }
    }

    /// The loaded kernel `name` of this module on `device`, from the runtime's kernel cache
    /// (`runtime::kernel_cache`: the first use of a module on a device loads every kernel in it).
    pub fn function(&self, device: i32, name: &'static str) -> Result<Function> {
        kernel_cache::function(*self, name, device)
    }
}

fn variants(pick: fn(&HtModule) -> bool) -> Vec<Defines> {
    HtModule::all()
        .iter()
        .filter(|m| pick(m))
        .map(HtModule::defines)
        .collect()
}

/// Define sets of every ht_meta.cu module (for the NVRTC registry in `kernel_registry`).
pub fn ht_meta_variants() -> Vec<Defines> {
    variants(|m| matches!(m, HtModule::Meta { .. }))
}

pub fn ht_dispatch_variants() -> Vec<Defines> {
    variants(|m| matches!(m, HtModule::Dispatch { .. }))
}

pub fn ht_combine_variants() -> Vec<Defines> {
    variants(|m| matches!(m, HtModule::Combine { .. }))
}

/// Launches kernel `name` of `module` with `blocks` blocks of [`HT_THREADS`] threads.
pub fn launch_ht(
    device: i32,
    module: HtModule,
    name: &'static str,
    p: &HtParams,
    blocks: u32,
    smem: usize,
    stream: cudaStream_t,
) -> Result<()> {
    let _ctx = crate::cuda::context::CtxGuard::enter(device)?;
    let f = module.function(device, name)?;
    if smem > 48 * 1024 {
        f.set_max_dynamic_smem(smem)?;
    }
    let mut arg = *p;
    let mut args = [&mut arg as *mut HtParams as *mut c_void];
    // SAFETY: every HT kernel takes one `HtParams` by value; its pointers were checked against
    // the caller's tensors, which must outlive the operation (C contract).
    unsafe {
        let stream = Stream::from_raw(stream.cast());
        launch(f, blocks.max(1), HT_THREADS, smem as u32, stream, &mut args)
    }
}

impl CachedModule for HtModule {
    fn source(&self) -> &'static KernelSource {
        HtModule::source(self)
    }
    fn defines(&self) -> Defines {
        HtModule::defines(self)
    }
    fn kernels(&self) -> &'static [&'static str] {
        HtModule::kernels(self)
    }
    fn loaded() -> &'static parking_lot::Mutex<kernel_cache::Map<Self>> {
        static LOADED: std::sync::LazyLock<parking_lot::Mutex<kernel_cache::Map<HtModule>>> =
            std::sync::LazyLock::new(Default::default);
        &LOADED
    }
}
