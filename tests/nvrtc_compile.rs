//! Proves the NVRTC path without a GPU: every `kernels/*.cu` file compiles to a CUBIN for every
//! specialisation it registers in `src/runtime/kernel_registry.rs`, for Hopper and (when this NVRTC knows it)
//! Blackwell.
//!
//! NVRTC is found by cudarc's loader (see `src/cuda/nvrtc.rs`): put the directory holding
//! `libnvrtc.so.13` on `LD_LIBRARY_PATH` (`make test` does, from the nvidia-cuda-nvrtc wheel), or
//! set `NCCL_EP_NVRTC_LIB` to the file. Without it the NVRTC tests print
//! "skipped: libnvrtc not found" and pass, unless `NCCL_EP_REQUIRE_NVRTC=1` (CI), which makes a
//! missing NVRTC a failure.

#[path = "common/nvrtc.rs"]
mod common_nvrtc;
#[path = "gpu/harness.rs"]
mod harness;
use common_nvrtc::have_nvrtc;
use std::path::Path;
use std::time::Instant;

use nccl_ep::cuda::cache::DiskCache;
use nccl_ep::cuda::jit::{self, Defines, KernelSource, Origin};
use nccl_ep::cuda::nvrtc;
use nccl_ep::runtime::kernel_registry::KERNEL_FILES;

fn kernel_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

fn cu_files() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(kernel_dir())
        .expect("kernels/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    v.sort();
    v
}

/// Architectures CI compiles for: what the runtime picks for H100/H200 and, if supported, B200.
fn archs() -> Vec<String> {
    let supported = nvrtc::supported_archs().expect("nvrtcGetSupportedArchs");
    let mut v = vec![jit::arch_for_cc(9, 0)];
    if supported.contains(&100) {
        v.push(jit::arch_for_cc(10, 0));
    } else {
        eprintln!("note: this NVRTC does not support sm_100; compiling for sm_90a only");
    }
    v
}

#[test]
fn every_kernel_file_is_registered_and_the_registry_matches_disk() {
    let registered: Vec<&str> = KERNEL_FILES.iter().map(|k| k.source.name).collect();
    for f in cu_files() {
        assert!(
            registered.contains(&f.as_str()),
            "kernels/{f} is not registered in src/runtime/kernel_registry.rs"
        );
    }
    for k in KERNEL_FILES {
        let on_disk = std::fs::read_to_string(kernel_dir().join(k.source.name)).expect("registered file exists");
        // A kernel's source may have shared `kernels/*.cuh` text prepended (no include paths).
        assert!(
            k.source.source.ends_with(&on_disk),
            "{}: include_str! out of date",
            k.source.name
        );
        assert!(!(k.variants)().is_empty(), "{} lists no variants", k.source.name);
    }
}

#[test]
fn kernels_are_header_free() {
    for k in KERNEL_FILES {
        for (i, line) in k.source.source.lines().enumerate() {
            assert!(
                !line.trim_start().starts_with("#include"),
                "{}:{}: kernels must not include headers (NVRTC gets none): {line}",
                k.source.name,
                i + 1
            );
        }
    }
}

#[test]
fn nvrtc_library_names() {
    // Documents (in the test log) the names cudarc's loader tries, in order.
    eprintln!("cudarc tries: {:?}", cudarc::get_lib_name_candidates("nvrtc"));
    assert!(cudarc::get_lib_name_candidates("nvrtc").contains(&"libnvrtc.so.13".to_string()));
}

/// Compiles every registered variant of every file for every arch, on as many threads as the
/// machine has (NVRTC is thread-safe, and the library compiles concurrently too): there are
/// over a thousand variants per arch, most of them LL top-k x layout x index width x mask (x
/// token type for combine).
#[test]
fn every_variant_compiles_for_every_arch() {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    if !have_nvrtc() {
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    eprintln!("NVRTC {major}.{minor}");
    // NCCL_EP_COMPILE_FILTER=ht_ compiles only the variants whose "file [defines]" contains it
    // (development: every variant takes minutes on two cores); unset, CI compiles everything.
    let filter = std::env::var("NCCL_EP_COMPILE_FILTER").unwrap_or_default();
    let mut jobs = Vec::new();
    for arch in archs() {
        for k in KERNEL_FILES {
            for defines in (k.variants)() {
                if format!("{} [{defines}]", k.source.name).contains(filter.as_str()) {
                    jobs.push((arch.clone(), k, defines));
                }
            }
        }
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(32);
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((arch, k, defines)) = jobs.get(i) else {
                        break;
                    };
                    let opts = jit::build_options(arch, defines).unwrap();
                    let t = Instant::now();
                    let what = format!("{} [{arch}; {defines}]", k.source.name);
                    match nvrtc::compile_to_cubin(k.source.source, k.source.name, &opts) {
                        Ok(out) if out.cubin.starts_with(b"\x7fELF") => eprintln!(
                            "{what}: {} bytes in {:.0} ms",
                            out.cubin.len(),
                            t.elapsed().as_secs_f64() * 1e3
                        ),
                        Ok(_) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{what}: the CUBIN is no ELF file")),
                        Err(e) => failures.lock().unwrap().push(format!("{what}: {e}")),
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(!jobs.is_empty());
    eprintln!(
        "{} variants compiled in {:.1} s on {threads} threads",
        jobs.len(),
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn compile_errors_carry_the_log() {
    if !have_nvrtc() {
        return;
    }
    let bad = "extern \"C\" __global__ void k(int* p) { *p = undeclared_thing; }";
    let opts = jit::build_options("sm_90", &Defines::new()).unwrap();
    let e = nvrtc::compile_to_cubin(bad, "bad.cu", &opts).unwrap_err();
    assert!(e.msg.contains("NVRTC_ERROR_COMPILATION"), "{e}");
    assert!(e.msg.contains("undeclared_thing"), "the log is in the message: {e}");
    assert!(e.msg.contains("bad.cu"), "{e}");
}

#[test]
fn jit_uses_the_disk_cache() {
    if !have_nvrtc() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("nccl_ep-jit-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cache = DiskCache::at(&dir).unwrap();
    // A source of its own so the process-wide memory cache cannot answer first.
    let src = KernelSource {
        name: "cachetest.cu",
        source: "extern \"C\" __global__ void ep_cachetest(unsigned* o) { o[threadIdx.x] = VALUE; }",
    };
    let d = Defines::new().set("VALUE", 41);
    let t = Instant::now();
    let (a, origin) = jit::compile_with_cache(&src, "sm_90a", &d, Some(&cache)).unwrap();
    let cold = t.elapsed();
    assert_eq!(origin, Origin::Compiled);
    assert!(cache.load(src.name, &a.key).is_some(), "stored on disk");
    let (b, origin) = jit::compile_with_cache(&src, "sm_90a", &d, Some(&cache)).unwrap();
    assert_eq!(origin, Origin::MemoryCache);
    assert_eq!(a.image, b.image);
    // Another define misses both caches.
    let (c, origin) = jit::compile_with_cache(&src, "sm_90a", &d.clone().set("VALUE", 42), Some(&cache)).unwrap();
    assert_eq!(origin, Origin::Compiled);
    assert_ne!(c.key, a.key);
    // As a new process would: memory cache empty, the disk answers.
    jit::forget_compiled();
    let t = Instant::now();
    let (e, origin) = jit::compile_with_cache(&src, "sm_90a", &d, Some(&cache)).unwrap();
    let warm = t.elapsed();
    assert_eq!(origin, Origin::DiskCache);
    assert_eq!(e.image, a.image);
    // A corrupt file is ignored and replaced.
    std::fs::write(cache.path_for(src.name, &a.key), b"junk").unwrap();
    jit::forget_compiled();
    let (f, origin) = jit::compile_with_cache(&src, "sm_90a", &d, Some(&cache)).unwrap();
    assert_eq!(origin, Origin::Compiled);
    assert_eq!(f.image, a.image, "NVRTC output is deterministic");
    assert!(cache.load(src.name, &a.key).is_some());
    eprintln!("disk cache hit: {:.2} ms", warm.as_secs_f64() * 1e3);
    eprintln!("cold compile of a one-line kernel: {:.0} ms", cold.as_secs_f64() * 1e3);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// End to end on a real GPU: JIT the self-test kernel, launch it on the legacy stream and on a
/// stream of our own (also under graph capture), and check the results. `#[ignore]`d, since it
/// needs a GPU; once asked for, it fails without a GPU or without NVRTC.
#[test]
#[ignore = "needs an NVIDIA GPU: scripts/gpu_check.sh, or cargo test -- --include-ignored"]
fn selftest_kernel_runs_on_a_gpu() {
    use cudarc::driver::sys;
    use nccl_ep::cuda::{self, CtxGuard, DeviceMem, Stream, kernels::SELFTEST, memory};
    match nccl_ep::cuda::device_count() {
        Ok(n) if n > 0 => {}
        Ok(_) => panic!("this test needs an NVIDIA GPU: the CUDA driver sees no device"),
        Err(e) => panic!("this test needs an NVIDIA GPU: {}", e.msg),
    }
    if let Err(e) = nvrtc::ensure_nvrtc() {
        panic!("this test needs NVRTC (libnvrtc.so.13 on LD_LIBRARY_PATH, or NCCL_EP_NVRTC_LIB): {e}");
    }
    let dev = 0;
    let (major, minor) = cuda::compute_capability(dev).unwrap();
    eprintln!("device 0: cc {major}.{minor}, {} SMs", cuda::sm_count(dev).unwrap());
    let before = nccl_ep::cuda::context::current_context().unwrap();
    let n: u32 = 1000;
    let out = DeviceMem::alloc(dev, n as usize * 4).unwrap();
    for (stride, defines) in [(1u32, Defines::new()), (3, Defines::new().set("EP_SELFTEST_STRIDE", 3))] {
        let t = Instant::now();
        let f = cuda::get_function(dev, &SELFTEST, &defines, "ep_selftest").unwrap();
        eprintln!("get_function [{defines}]: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(
            nccl_ep::cuda::context::current_context().unwrap(),
            before,
            "context restored"
        );
        let _g = CtxGuard::enter(dev).unwrap();
        assert!(f.max_active_blocks_per_sm(256, 0).unwrap() >= 1);
        f.set_max_dynamic_smem(64 * 1024).unwrap();
        let (ptr, v) = (out.ptr(), 7u32);
        let mut args = nccl_ep::kernel_args![&ptr, &v, &n];
        let s = Stream::LEGACY_DEFAULT;
        // SAFETY: `out` holds n u32 and outlives the synchronised work below.
        unsafe { memory::memset_d8_async(ptr, 0, n as usize * 4, s) }.unwrap();
        // SAFETY: ep_selftest(unsigned* out, unsigned v, unsigned n) gets a device pointer and two
        // u32s, in order; it writes out[0..n), which `out` holds; `args` lives past the launch.
        unsafe { cuda::launch(f, n.div_ceil(256), 256, 0, s, &mut args) }.unwrap();
        cuda::stream_synchronize(s).unwrap();
        let mut host = vec![0u32; n as usize];
        // SAFETY: `out` holds the n u32 `host` receives; any bits are a valid u32.
        unsafe { memory::memcpy_dtoh(&mut host, ptr) }.unwrap();
        for (i, &x) in host.iter().enumerate() {
            assert_eq!(x, 7 + i as u32 * stride, "out[{i}]");
        }
        // Cooperative launch of the same kernel.
        // SAFETY: as for the launch above (4 x 256 threads write at most out[0..n)).
        unsafe { cuda::launch_cooperative(f, 4, 256, 0, s, &mut args) }.unwrap();
        cuda::stream_synchronize(s).unwrap();
    }

    // A stream of our own: the device check, async copies, and graph capture.
    let _g = CtxGuard::enter(dev).unwrap();
    let mut raw: sys::CUstream = std::ptr::null_mut();
    // SAFETY: the driver is loaded (device_count succeeded) and device 0's context current; it
    // writes one handle (flags 1 = non-blocking).
    assert_eq!(unsafe { sys::cuStreamCreate(&mut raw, 1) }, sys::CUresult::CUDA_SUCCESS);
    // SAFETY: a stream just created, destroyed only at the end of this test.
    let s = unsafe { Stream::from_raw(raw.cast()) };
    cuda::ensure_stream_on_device(s, dev).unwrap();
    assert_eq!(cuda::stream_device(s).unwrap(), dev);
    assert!(cuda::ensure_stream_on_device(s, dev + 1).is_err());
    let src: Vec<u32> = (0..n).collect();
    // SAFETY: `src` and `out` both hold n u32 and live past the stream_synchronize below.
    unsafe { memory::memcpy_htod_async(out.ptr(), src.as_ptr().cast(), src.len() * 4, s) }.unwrap();
    let mut back = vec![0u32; n as usize];
    // SAFETY: as above, for `back`.
    unsafe { memory::memcpy_dtoh_async(back.as_mut_ptr().cast(), out.ptr(), back.len() * 4, s) }.unwrap();
    cuda::stream_synchronize(s).unwrap();
    assert_eq!(back, src);
    assert!(!cuda::stream_is_capturing(s).unwrap());
    let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    assert_eq!(
        // SAFETY: `raw` is our live stream.
        unsafe { sys::cuStreamBeginCapture_v2(raw, mode) },
        sys::CUresult::CUDA_SUCCESS
    );
    assert!(cuda::stream_is_capturing(s).unwrap());
    let f = cuda::get_function(dev, &SELFTEST, &Defines::new(), "ep_selftest").unwrap();
    let (ptr, v) = (out.ptr(), 1u32);
    let mut args = nccl_ep::kernel_args![&ptr, &v, &n];
    // SAFETY: as for the launches above; captured, it runs when the graph is launched, while
    // `out` is still alive (the kernel arguments are copied at capture).
    unsafe { cuda::launch(f, n.div_ceil(256), 256, 0, s, &mut args) }.unwrap();
    let mut graph: sys::CUgraph = std::ptr::null_mut();
    assert_eq!(
        // SAFETY: `raw` is our live stream, being captured; it writes one handle.
        unsafe { sys::cuStreamEndCapture(raw, &mut graph) },
        sys::CUresult::CUDA_SUCCESS
    );
    assert!(!cuda::stream_is_capturing(s).unwrap());
    let mut exec: sys::CUgraphExec = std::ptr::null_mut();
    assert_eq!(
        // SAFETY: `graph` was just captured; it writes one handle.
        unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) },
        sys::CUresult::CUDA_SUCCESS
    );
    // SAFETY: a live executable graph and our live stream.
    assert_eq!(unsafe { sys::cuGraphLaunch(exec, raw) }, sys::CUresult::CUDA_SUCCESS);
    cuda::stream_synchronize(s).unwrap();
    // SAFETY: `out` holds the n u32 `back` receives; any bits are a valid u32.
    unsafe { memory::memcpy_dtoh(&mut back, out.ptr()) }.unwrap();
    assert!(back.iter().enumerate().all(|(i, &x)| x == 1 + i as u32));
    // SAFETY: each handle is ours, idle (synchronised above) and destroyed once.
    unsafe {
        sys::cuGraphExecDestroy(exec);
        sys::cuGraphDestroy(graph);
        sys::cuStreamDestroy_v2(raw);
    }
    // IPC handle of our allocation, pinned mapped host memory.
    let h = memory::ipc_get_mem_handle(out.ptr()).unwrap();
    assert!(h.iter().any(|&b| b != 0));
    let pinned = memory::PinnedHostMem::alloc(dev, 4096).unwrap();
    // SAFETY: the mapped allocation holds 4096 bytes = 1024 words and outlives the fill.
    unsafe { memory::memset_d32_async(pinned.device_ptr(), 5, 1024, Stream::LEGACY_DEFAULT) }.unwrap();
    cuda::stream_synchronize(Stream::LEGACY_DEFAULT).unwrap();
    // SAFETY: word 1023 is the last of the 1024 the live allocation holds (page-aligned); the
    // device is idle (synchronised), so nothing writes it concurrently.
    assert_eq!(unsafe { *pinned.host_ptr().cast::<u32>().add(1023) }, 5);
}

/// HT: every module the runtime may load is registered, so `every_variant_compiles_for_every_arch`
/// compiles each of them (ht_meta 2 x 2, ht_dispatch 2 x 2, ht_combine 2 x 2 x 3 token types).
#[test]
fn ht_registry_lists_every_module() {
    use nccl_ep::runtime::ht_kernels::{HtModule, ht_combine_variants, ht_dispatch_variants, ht_meta_variants};
    assert_eq!(ht_meta_variants().len(), 4);
    assert_eq!(ht_dispatch_variants().len(), 4);
    assert_eq!(ht_combine_variants().len(), 12);
    for m in HtModule::all() {
        let file = KERNEL_FILES
            .iter()
            .find(|k| k.source.name == m.source().name)
            .unwrap_or_else(|| panic!("{} is not registered", m.source().name));
        assert!(
            (file.variants)().contains(&m.defines()),
            "{m:?} is not among the registered variants"
        );
    }
}

/// LL: every kernel the runtime may launch is registered, so `every_variant_compiles_for_every_arch`
/// compiles each of them: dispatch (byte moves, one variant for every token type) and combine
/// for each of bf16, fp16, fp32 and bf16 with NVFP4, over K 1..=32, both layouts, both index widths, with and
/// without masks.
#[test]
fn ll_registry_lists_every_kernel() {
    use ep_core::enums::Layout;
    use nccl_ep::runtime::kernels::{LlDtype, LlKernel, ll_clean_variants, ll_combine_variants, ll_dispatch_variants};
    let dispatch = ll_dispatch_variants();
    let combine = ll_combine_variants();
    assert_eq!(dispatch.len(), 32 * 2 * 2 * 2);
    assert_eq!(combine.len(), 4 * 32 * 2 * 2 * 2);
    assert_eq!(ll_clean_variants().len(), 1);
    for topk in 1..=32 {
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            for idx64 in [false, true] {
                for mask in [false, true] {
                    let d = LlKernel::dispatch(topk, layout, idx64, mask).defines();
                    assert!(dispatch.contains(&d), "{d} not registered");
                    assert!(
                        !d.to_string().contains("EP_DTYPE"),
                        "dispatch does not depend on the type: {d}"
                    );
                    for (i, dt) in LlDtype::ALL.into_iter().enumerate() {
                        let c = LlKernel::combine(topk, layout, idx64, mask, dt).defines();
                        assert!(combine.contains(&c), "{c} not registered");
                        assert!(c.to_string().contains(&format!("EP_DTYPE={i}")), "{c}");
                    }
                }
            }
        }
    }
    let file = |name: &str| {
        KERNEL_FILES
            .iter()
            .find(|k| k.source.name == name)
            .unwrap_or_else(|| panic!("{name} is not registered"))
    };
    assert_eq!((file("ll_combine.cu").variants)(), combine);
    assert_eq!((file("ll_dispatch.cu").variants)(), dispatch);
}

/// NVFP4 combine (docs/LL.md, "NVFP4 combine"): the software conversions on sm_90a (Hopper has
/// no FP4 instructions: if any reached its PTX, ptxas would reject it), the cvt instructions
/// on sm_100a and the other FP4 families, and the forced software path there too. The arch
/// guard is checked from inside: a source that `#error`s unless the path is the expected one.
#[test]
fn nvfp4_combine_compiles_software_and_hardware_paths() {
    use ep_core::enums::Layout;
    use nccl_ep::runtime::kernels::{LL_COMBINE, LlDtype, LlKernel};
    if !have_nvrtc() {
        return;
    }
    let supported = nvrtc::supported_archs().expect("nvrtcGetSupportedArchs");
    let with_check = |hw: bool| {
        format!(
            "{}\n#if EP_FP4_HW != {}\n#error the NVFP4 conversions took the wrong path\n#endif\n",
            LL_COMBINE.source, hw as i32
        )
    };
    let compile = |src: &str, arch: &str, d: &Defines| -> Result<usize, String> {
        let opts = jit::build_options(arch, d).unwrap();
        nvrtc::compile_to_cubin(src, "ll_combine.cu", &opts)
            .map(|o| o.cubin.len())
            .map_err(|e| format!("[{arch}; {d}]: {e}"))
    };
    let mut cases = vec![(jit::arch_for_cc(9, 0), false)];
    for (cc, arch) in [(100, jit::arch_for_cc(10, 0)), (120, jit::arch_for_cc(12, 0))] {
        if supported.contains(&cc) {
            cases.push((arch, true));
        } else {
            eprintln!("note: this NVRTC does not support sm_{cc}; its FP4 path is not compiled");
        }
    }
    for (arch, hw) in &cases {
        for layout in [Layout::ExpertMajor, Layout::RankMajor] {
            for topk in [1, 8, 32] {
                let d = LlKernel::combine(topk, layout, topk == 8, topk != 1, LlDtype::Nvfp4).defines();
                assert!(d.to_string().contains("EP_DTYPE=3"), "{d}");
                let n = compile(&with_check(*hw), arch, &d).unwrap();
                assert!(n > 0);
                // The wrong expectation must fail: the guard really decides.
                assert!(compile(&with_check(!*hw), arch, &d).is_err(), "[{arch}] guard is inert");
                if *hw {
                    let soft = d.clone().set("EP_FP4_SOFT", 1);
                    compile(&with_check(false), arch, &soft).unwrap();
                }
            }
        }
    }
}

/// The GPU tests' reciprocal oracle (tests/gpu/harness.rs, `GpuRcp`) compiles for sm_90a, so
/// that the NVFP4 GPU tests cannot fail on it.
#[test]
fn nvfp4_rcp_oracle_compiles() {
    if !have_nvrtc() {
        return;
    }
    let opts = jit::build_options(&jit::arch_for_cc(9, 0), &Defines::new()).unwrap();
    let out = nvrtc::compile_to_cubin(harness::RCP_ORACLE.source, harness::RCP_ORACLE.name, &opts).unwrap();
    assert!(out.cubin.starts_with(b"\x7fELF"));
}
