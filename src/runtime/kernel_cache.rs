//! The runtime's one cache of loaded kernels: (module, kernel, device) -> `Function`. The JIT
//! (`cuda::jit`) caches CUBINs and loaded functions too, but finding them there means building
//! the defines and hashing the whole source; this lookup is one FNV hash of a small `Copy` key in
//! the module type's own map, and it is on every dispatch's host path (issue 15: host time).

use crate::cuda::jit::{Defines, KernelSource, get_function};
use crate::cuda::module::Function;
use ep_core::error::Result;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash};

/// One module the runtime compiles: a kernel source file and its specialisation (LL's
/// `LlKernel`, HT's `HtModule` implement it; this module names neither, so the cache sits below
/// both).
pub trait CachedModule: Copy + Eq + Hash + Send + 'static {
    fn source(&self) -> &'static KernelSource;
    fn defines(&self) -> Defines;
    /// The kernels of the module (each LL file has one).
    fn kernels(&self) -> &'static [&'static str];
    /// This module type's map of loaded kernels: a static of the implementing type (a generic
    /// function cannot own a static per type parameter), `Mutex::new(Map::default())`.
    fn loaded() -> &'static Mutex<Map<Self>>;
}

/// Hashed with FNV-1a: the keys are a few small integers and a kernel name, hashed on every
/// launch; SipHash's protection against chosen keys buys nothing here and costs more.
pub type Map<M> = HashMap<(M, &'static str, i32), Function, BuildHasherDefault<ep_core::fnv::Fnv1a>>;

/// The loaded kernel `name` of `module` on `device`. The first use of a module on a device
/// compiles it (or reads the JIT's caches) and loads the code of *every* kernel in it: an
/// operation's later launches then load nothing while its first kernel waits for the other ranks
/// (a lazy load could wait for that kernel to finish: a deadlock between the ranks of a local
/// group). Later calls are two hash-map lookups. No lock is held while compiling: two threads
/// that miss together both ask the JIT, which hands both the same code.
pub fn function<M: CachedModule>(module: M, name: &'static str, device: i32) -> Result<Function> {
    if let Some(f) = M::loaded().lock().get(&(module, name, device)) {
        return Ok(*f);
    }
    let mut all = Vec::new();
    for &k in module.kernels() {
        let f = get_function(device, module.source(), &module.defines(), k)?;
        let _ctx = crate::cuda::context::CtxGuard::enter(device)?;
        f.load()?;
        all.push((k, f));
    }
    let mut m = M::loaded().lock();
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
    use crate::runtime::ht_kernels::HtModule;
    use crate::runtime::kernels::{LlKernel, LlKind};

    #[test]
    fn every_launched_kernel_is_in_its_module() {
        for kind in [LlKind::Dispatch, LlKind::Combine, LlKind::Clean] {
            for k in LlKernel::variants(kind) {
                let m = k;
                assert_eq!(CachedModule::kernels(&m), [k.name()], "{k:?}");
                assert_eq!(CachedModule::source(&m).name, format!("{}.cu", k.name()));
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
                    "ht_publish",
                ],
                HtModule::Dispatch { .. } => &["ht_dispatch_kernel", "ht_publish"],
                HtModule::Combine { .. } => &["ht_combine_kernel", "ht_publish"],
            };
            let m = h;
            for k in launched {
                assert!(CachedModule::kernels(&m).contains(k), "{k} in {h:?}");
                assert!(
                    CachedModule::source(&m).source.contains(&format!(" {k}(")),
                    "{k} in {}",
                    CachedModule::source(&m).name
                );
            }
        }
    }
}
