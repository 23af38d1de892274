//! Whether NVRTC can be used here, for the tests that compile kernels (tests/nvrtc_compile.rs,
//! tests/kernel_params.rs include it with `#[path]`).

use nccl_ep::cuda::nvrtc;

/// False (after printing why) when NVRTC is missing and not required; panics when required
/// (`NCCL_EP_REQUIRE_NVRTC=1`, which `make test` sets).
pub fn have_nvrtc() -> bool {
    match nvrtc::ensure_nvrtc() {
        Ok(()) => true,
        Err(e) => {
            let required = std::env::var("NCCL_EP_REQUIRE_NVRTC").is_ok_and(|v| v == "1");
            assert!(!required, "NCCL_EP_REQUIRE_NVRTC=1 but NVRTC is unusable: {e}");
            eprintln!("skipped: libnvrtc not found ({e})");
            false
        }
    }
}
