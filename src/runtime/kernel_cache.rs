//! The runtime's one cache of loaded kernels: (module, kernel, device) -> `Function`. The JIT
//! (`cuda::jit`) caches CUBINs and loaded functions too, but finding them there means building
//! the defines and hashing the whole source; this lookup is one hash of a small `Copy` key, and it
//! is on every dispatch's host path.

use crate::cuda::jit::{Defines, KernelSource, get_function};
use crate::cuda::module::Function;
use crate::runtime::ht_kernels::HtModule;
use crate::runtime::kernels::LlKernel;
use ep_core::error::Result;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::OnceLock;

/// One module the runtime compiles: a kernel source file and its specialisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelModule {
    Ll(LlKernel),
    Ht(HtModule),
}

impl KernelModule {
    fn source(&self) -> &'static KernelSource {
        match self {
            KernelModule::Ll(k) => k.source(),
            KernelModule::Ht(m) => m.source(),
        }
    }

    fn defines(&self) -> Defines {
        match self {
            KernelModule::Ll(k) => k.defines(),
            KernelModule::Ht(m) => m.defines(),
        }
    }

    /// The kernels of the module (each LL file has one).
    fn kernels(&self) -> &'static [&'static str] {
        match self {
            KernelModule::Ll(k) => k.kernels(),
            KernelModule::Ht(m) => m.kernels(),
        }
    }
}

type Key = (KernelModule, &'static str, i32);

fn loaded() -> &'static Mutex<HashMap<Key, Function>> {
    static LOADED: OnceLock<Mutex<HashMap<Key, Function>>> = OnceLock::new();
    LOADED.get_or_init(Default::default)
}

/// The loaded kernel `name` of `module` on `device`. The first use of a module on a device
/// compiles it (or reads the JIT's caches) and loads the code of *every* kernel in it: an
/// operation's later launches then load nothing while its first kernel waits for the other ranks
/// (a lazy load could wait for that kernel to finish: a deadlock between the ranks of a local
/// group). Later calls are one hash-map lookup. No lock is held while compiling: two threads
/// that miss together both ask the JIT, which hands both the same code.
pub fn function(module: KernelModule, name: &'static str, device: i32) -> Result<Function> {
    if let Some(f) = loaded().lock().get(&(module, name, device)) {
        return Ok(*f);
    }
    let mut all = Vec::new();
    for &k in module.kernels() {
        let f = get_function(device, module.source(), &module.defines(), k)?;
        let _ctx = crate::cuda::context::CtxGuard::enter(device)?;
        f.load()?;
        all.push((k, f));
    }
    let mut m = loaded().lock();
    for (k, f) in all {
        m.insert((module, k, device), f);
    }
    m.get(&(module, name, device))
        .copied()
        .ok_or_else(|| ep_core::internal_err!("{name} is not a kernel of {}", module.source().name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::kernels::LlKind;

    #[test]
    fn every_launched_kernel_is_in_its_module() {
        for kind in [LlKind::Dispatch, LlKind::Combine, LlKind::Clean] {
            for k in LlKernel::variants(kind) {
                let m = KernelModule::Ll(k);
                assert_eq!(m.kernels(), [k.name()], "{k:?}");
                assert_eq!(m.source().name, format!("{}.cu", k.name()));
            }
        }
        // The names runtime::ht launches from each module.
        for h in HtModule::all() {
            let launched: &[&str] = match h {
                HtModule::Meta { .. } => &[
                    "ht_reset",
                    "ht_convert",
                    "ht_pull",
                    "ht_close",
                    "ht_count",
                    "ht_offsets",
                    "ht_assign",
                ],
                HtModule::Dispatch { .. } => &["ht_dispatch", "ht_close"],
                HtModule::Combine { .. } => &["ht_combine", "ht_close"],
            };
            let m = KernelModule::Ht(h);
            for k in launched {
                assert!(m.kernels().contains(k), "{k} in {h:?}");
                assert!(
                    m.source().source.contains(&format!(" {k}(")),
                    "{k} in {}",
                    m.source().name
                );
            }
        }
    }
}
