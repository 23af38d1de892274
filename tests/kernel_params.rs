//! kernels/ep_params.cuh (the kernels' argument blocks, device structs and shared constants) must
//! be exactly what `runtime::kernel_header::c_header` generates from the Rust definitions.
//! `NCCL_EP_BLESS=1 cargo test --test kernel_params` (or `make header`) rewrites it.
//!
//! With NVRTC present (see tests/nvrtc_compile.rs) the header is also compiled on its own, so that
//! its static_asserts (every field's offset and size, taken from the Rust layout) are checked here
//! in a second, and a copy with two fields swapped is shown to fail.

#[path = "common/nvrtc.rs"]
mod common_nvrtc;
use common_nvrtc::have_nvrtc;
use std::path::Path;

use nccl_ep::cuda::jit;
use nccl_ep::cuda::nvrtc;
use nccl_ep::runtime::kernel_header::c_header;
use nccl_ep::runtime::kernel_registry::KERNEL_FILES;

const HEADER: &str = "kernels/ep_params.cuh";

fn committed() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(HEADER)).unwrap_or_default()
}

#[test]
fn ep_params_cuh_is_generated() {
    let want = c_header();
    if std::env::var_os("NCCL_EP_BLESS").is_some() {
        std::fs::write(Path::new(env!("CARGO_MANIFEST_DIR")).join(HEADER), &want).expect("write header");
        return;
    }
    assert!(
        committed() == want,
        "{HEADER} is stale: run `make header` and commit it"
    );
}

/// Every LL and HT kernel source carries the header (include_str! of the committed file) before
/// the code that uses it.
#[test]
fn every_ll_and_ht_source_carries_the_header() {
    if std::env::var_os("NCCL_EP_BLESS").is_some() {
        return; // the sources were compiled with the file being rewritten; the next build has it
    }
    let h = committed();
    let mut n = 0;
    for k in KERNEL_FILES {
        let name = k.source.name;
        if !(name.starts_with("ll_") || name.starts_with("ht_")) {
            continue;
        }
        n += 1;
        let at = k
            .source
            .source
            .find(&h)
            .unwrap_or_else(|| panic!("{name} lacks {HEADER}"));
        let device = include_str!("../kernels/ep_device.cuh");
        assert!(
            k.source.source.find(device).is_some_and(|d| d < at),
            "{name}: ep_device.cuh first"
        );
        for common in ["ll_common.cuh", "ht_common.cuh"] {
            let text =
                std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels").join(common)).unwrap();
            if let Some(c) = k.source.source.find(&text) {
                assert!(at < c, "{name}: {HEADER} before {common}");
            }
        }
    }
    assert_eq!(
        n, 6,
        "ll_dispatch, ll_combine, ll_clean, ht_meta, ht_dispatch, ht_combine"
    );
}

/// `layout_checks`: also the field-offset asserts (EP_LAYOUT_CHECKS; they need an NVRTC with
/// `__builtin_offsetof`, 13.5 has it, 13.0 does not).
fn compile(header: &str, layout_checks: bool) -> Result<(), String> {
    let src = format!(
        "{}\n{header}\nextern \"C\" __global__ void ep_params_probe(const LlParams a, const HtParams b, u64* o) {{ o[0] = a.peers[1] + b.bwd_off; }}\n",
        include_str!("../kernels/ep_device.cuh")
    );
    let defines = if layout_checks {
        jit::Defines::new().set("EP_LAYOUT_CHECKS", 1)
    } else {
        jit::Defines::new()
    };
    let opts = jit::build_options(&jit::arch_for_cc(9, 0), &defines).unwrap();
    nvrtc::compile_to_cubin(&src, "ep_params_probe.cu", &opts)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[test]
fn the_layout_asserts_hold_in_nvrtc_and_catch_a_swap() {
    if !have_nvrtc() {
        return;
    }
    let h = c_header();
    compile(&h, false).expect("the generated header compiles as the kernels include it");
    compile(&h, true).expect("the generated header compiles with its field-offset asserts");
    // Swap two fields of equal size (the declarations only): their offsets no longer match.
    let swapped = h
        .replacen("  u64 off_ecount;\n", "  u64 @;\n", 1)
        .replacen("  u64 off_cflag;\n", "  u64 off_ecount;\n", 1)
        .replacen("  u64 @;\n", "  u64 off_cflag;\n", 1);
    assert_ne!(swapped, h);
    compile(&swapped, false).expect("without the offset asserts only sizes are checked");
    let e = compile(&swapped, true).expect_err("a swapped field must not compile");
    assert!(
        e.contains("LlParams.off_ecount") && e.contains("LlParams.off_cflag"),
        "{e}"
    );
}
