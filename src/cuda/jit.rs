//! The JIT: specialised CUDA source -> CUBIN (NVRTC, disk and memory caches) -> loaded kernel.
//!
//! * [`compile`] turns `(source, arch, defines)` into a CUBIN, consulting an in-process cache,
//!   then the disk cache ([`super::cache`]), and only then NVRTC.
//! * [`load_function`] loads a CUBIN into the current context once and caches the kernel
//!   handle per `(cache key, context, kernel name)`; modules are never unloaded.
//! * [`get_function`] does both for a device: arch from its compute capability, context entered.
//!
//! `NCCL_EP_JIT_LOG=1` prints one line per compile or cache hit to stderr.

use std::collections::HashMap;
use std::fmt::Display;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::Mutex;

use super::cache::{CacheKey, DiskCache, cache_key};
use super::context::{CtxGuard, current_context};
use super::driver::compute_capability;
use super::module::{Function, Module};
use super::nvrtc;
use ep_core::error::Result;

/// A kernel source file shipped inside the library.
#[derive(Clone, Copy, Debug)]
pub struct KernelSource {
    /// File name, e.g. `"selftest.cu"`; used in diagnostics and cache file names.
    pub name: &'static str,
    pub source: &'static str,
}

/// `-D` specialisation constants, kept sorted by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Defines(Vec<(String, String)>);

impl Defines {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces `name`; `value` is printed with `Display`.
    pub fn set(mut self, name: &str, value: impl Display) -> Self {
        let value = value.to_string();
        match self.0.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (name.to_owned(), value)),
        }
        self
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Display for Defines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (n, v)) in self.iter().enumerate() {
            write!(f, "{}{n}={v}", if i > 0 { " " } else { "" })?;
        }
        Ok(())
    }
}

/// The NVRTC architecture for a compute capability: the architecture-specific `sm_XYa` from
/// Hopper on (so kernels may use wgmma/TMA multicast; such a CUBIN runs only on exactly that
/// capability, which is what we compile for), plain `sm_XY` before.
pub fn arch_for_cc(major: i32, minor: i32) -> String {
    if major >= 9 {
        format!("sm_{major}{minor}a")
    } else {
        format!("sm_{major}{minor}")
    }
}

/// The full NVRTC option list. `arch` is `sm_XY` or `sm_XYa`.
///
/// `-std=c++17`; `-default-device` so helper functions need no `__device__`; `-lineinfo` for
/// profilers and sanitizers (no effect on code). `--use_fast_math` stays off: results must match
/// the CPU reference bit for bit where the reference says so.
pub fn build_options(arch: &str, defines: &Defines) -> Result<Vec<String>> {
    let digits = arch
        .strip_prefix("sm_")
        .map(|s| s.strip_suffix('a').unwrap_or(s))
        .unwrap_or("");
    ep_core::ensure_arg!(
        !digits.is_empty() && digits.len() <= 4 && digits.bytes().all(|b| b.is_ascii_digit()),
        "bad GPU architecture {arch:?} (want sm_XY or sm_XYa)"
    );
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        "-default-device".into(),
        "-lineinfo".into(),
    ];
    for (name, value) in defines.iter() {
        let ident = name
            .bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()));
        ep_core::ensure_arg!(!name.is_empty() && ident, "bad define name {name:?}");
        ep_core::ensure_arg!(
            !value.is_empty() && !value.chars().any(|c| c.is_control()),
            "bad value {value:?} for define {name}"
        );
        opts.push(format!("-D{name}={value}"));
    }
    Ok(opts)
}

/// Where a [`Cubin`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Compiled,
    DiskCache,
    MemoryCache,
}

/// A compiled kernel image.
#[derive(Debug)]
pub struct Cubin {
    pub key: CacheKey,
    pub arch: String,
    pub name: &'static str,
    pub image: Vec<u8>,
}

fn log_enabled() -> bool {
    std::env::var_os("NCCL_EP_JIT_LOG").is_some_and(|v| !v.is_empty() && v != "0")
}

fn memory_cache() -> &'static Mutex<HashMap<[u8; 32], Arc<Cubin>>> {
    static M: OnceLock<Mutex<HashMap<[u8; 32], Arc<Cubin>>>> = OnceLock::new();
    M.get_or_init(Default::default)
}

fn process_disk_cache() -> Option<&'static DiskCache> {
    static D: OnceLock<Option<DiskCache>> = OnceLock::new();
    D.get_or_init(DiskCache::from_env).as_ref()
}

/// Compiles `src` for `arch` with `defines`, using the process's disk cache (see
/// [`super::cache`]) and memory cache.
pub fn compile(src: &KernelSource, arch: &str, defines: &Defines) -> Result<Arc<Cubin>> {
    compile_with_cache(src, arch, defines, process_disk_cache()).map(|(c, _)| c)
}

/// As [`compile`] with an explicit disk cache (`None`: no disk cache), also saying where the
/// image came from.
pub fn compile_with_cache(
    src: &KernelSource,
    arch: &str,
    defines: &Defines,
    disk: Option<&DiskCache>,
) -> Result<(Arc<Cubin>, Origin)> {
    let options = build_options(arch, defines)?;
    let key = cache_key(src.source, &options, arch, nvrtc::version()?);
    let t0 = Instant::now();
    let log = log_enabled();
    {
        let mem = memory_cache().lock();
        if let Some(c) = mem.get(&key.hash).filter(|c| c.key == key) {
            return Ok((c.clone(), Origin::MemoryCache));
        }
    }
    let (image, origin) = match disk.and_then(|d| d.load(src.name, &key)) {
        Some(image) => {
            if log {
                eprintln!(
                    "nccl_ep jit: {} [{arch}; {defines}] disk cache hit ({} bytes)",
                    src.name,
                    image.len()
                );
            }
            (image, Origin::DiskCache)
        }
        None => {
            let out = nvrtc::compile_to_cubin(src.source, src.name, &options)?;
            if log {
                eprintln!(
                    "nccl_ep jit: {} [{arch}; {defines}] compiled in {:.0} ms ({} bytes){}",
                    src.name,
                    t0.elapsed().as_secs_f64() * 1e3,
                    out.cubin.len(),
                    if out.log.is_empty() {
                        String::new()
                    } else {
                        format!("\n{}", out.log)
                    }
                );
            }
            if let Some(d) = disk
                && let Err(e) = d.store(src.name, &key, &out.cubin)
                && log
            {
                eprintln!("nccl_ep jit: cannot write the cache in {}: {e}", d.dir().display());
            }
            (out.cubin, Origin::Compiled)
        }
    };
    let cubin = Arc::new(Cubin {
        key,
        arch: arch.to_owned(),
        name: src.name,
        image,
    });
    let mut mem = memory_cache().lock();
    match mem.get(&cubin.key.hash) {
        // Another thread got there first: share its copy.
        Some(c) if c.key == cubin.key => Ok((c.clone(), origin)),
        Some(_) => Ok((cubin, origin)),
        None => {
            mem.insert(cubin.key.hash, cubin.clone());
            Ok((cubin, origin))
        }
    }
}

/// Empties the in-process CUBIN cache (loaded kernels stay loaded). For tests and for freeing
/// memory after warm-up; the next [`compile`] goes to the disk cache or NVRTC again.
pub fn forget_compiled() {
    memory_cache().lock().clear();
}

/// `(cache key hash, context)` -> loaded module; `(cache key hash, context, kernel)` -> function.
#[derive(Default)]
struct Loaded {
    modules: HashMap<([u8; 32], usize), Module>,
    functions: HashMap<([u8; 32], usize, String), Function>,
}

fn loaded() -> &'static Mutex<Loaded> {
    static L: OnceLock<Mutex<Loaded>> = OnceLock::new();
    L.get_or_init(Default::default)
}

/// The kernel `func` of `cubin` in the calling thread's current context, loading the module on
/// first use. A context must be current (use [`CtxGuard`]).
pub fn load_function(cubin: &Cubin, func: &str) -> Result<Function> {
    let ctx = current_context()? as usize;
    ep_core::ensure_usage!(ctx != 0, "no CUDA context is current to load {}", cubin.name);
    let mut l = loaded().lock();
    if let Some(&f) = l.functions.get(&(cubin.key.hash, ctx, func.to_owned())) {
        return Ok(f);
    }
    let module = match l.modules.get(&(cubin.key.hash, ctx)) {
        Some(&m) => m,
        None => {
            let m = Module::load(&cubin.image).map_err(|e| e.context(format_args!("loading {}", cubin.name)))?;
            l.modules.insert((cubin.key.hash, ctx), m);
            m
        }
    };
    let f = module
        .function(func)
        .map_err(|e| e.context(format_args!("{} [{}]", cubin.name, cubin.arch)))?;
    l.functions.insert((cubin.key.hash, ctx, func.to_owned()), f);
    Ok(f)
}

/// Compiles (cached) `src` for `device`'s architecture and returns kernel `func` loaded in the
/// device's primary context.
pub fn get_function(device: i32, src: &KernelSource, defines: &Defines, func: &str) -> Result<Function> {
    let (major, minor) = compute_capability(device)?;
    let cubin = compile(src, &arch_for_cc(major, minor), defines)?;
    let _g = CtxGuard::enter(device)?;
    load_function(&cubin, func)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defines_are_sorted_and_replaced() {
        let d = Defines::new().set("B", 2).set("A", "x").set("B", 3);
        assert_eq!(d.to_string(), "A=x B=3");
        assert_eq!(Defines::new().set("A", "x").set("B", 3), d);
    }

    #[test]
    fn options() {
        let o = build_options("sm_90a", &Defines::new().set("HIDDEN", 7168).set("TOPK", 8)).unwrap();
        assert_eq!(
            o,
            [
                "--gpu-architecture=sm_90a",
                "-std=c++17",
                "-default-device",
                "-lineinfo",
                "-DHIDDEN=7168",
                "-DTOPK=8"
            ]
        );
        assert!(build_options("compute_90", &Defines::new()).is_err());
        assert!(build_options("sm_", &Defines::new()).is_err());
        assert!(build_options("sm_90", &Defines::new().set("1X", 1)).is_err());
        assert!(build_options("sm_90", &Defines::new().set("X Y", 1)).is_err());
        assert!(build_options("sm_90", &Defines::new().set("X", "")).is_err());
        assert!(build_options("sm_90", &Defines::new().set("X", "a\nb")).is_err());
    }

    #[test]
    fn arch_names() {
        assert_eq!(arch_for_cc(9, 0), "sm_90a");
        assert_eq!(arch_for_cc(10, 0), "sm_100a");
        assert_eq!(arch_for_cc(8, 0), "sm_80");
    }
}
