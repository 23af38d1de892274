//! Our extensions (`ncclEpx*`, declared in `include/nccl_ep_ext.h`).

use super::enums::{Algorithm, Layout};
use super::guard::{ffi_call, out_ptr, read_req};
use super::types::*;
use crate::core::config::{EnvOverrides, validate_group_config};
use crate::core::handle_rules::check_handle;
use crate::core::ll_layout::LlLayout;
use std::ffi::{c_char, c_int};

/// The message of the last failed `ncclEp*`/`ncclEpx*` call on this thread ("" if none).
/// The string stays valid until the next failing call on the same thread.
#[unsafe(no_mangle)]
pub extern "C" fn ncclEpxGetLastError() -> *const c_char {
    super::guard::last_error_ptr()
}

/// Bytes of the per-rank communication buffer a LOW_LATENCY group of `num_ranks` ranks needs
/// for handles of (`layout`, `num_topk`); needs no GPU and no communicator. Both LL layouts need
/// the same size. The config is checked as `ncclEpCreateGroup` checks it; its `rdma_buffer_size`
/// is ignored (an explicit size is compared against this value when a handle is created).
/// Returns ncclInvalidArgument for a NULL `bytes`, a bad config or top-k, and ncclInvalidUsage
/// for a layout LL does not offer or a HIGH_THROUGHPUT config.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpxBufferSize(
    config: *const ncclEpGroupConfig_t,
    num_ranks: c_int,
    layout: ncclEpLayout_t,
    num_topk: c_int,
    bytes: *mut usize,
) -> ncclResult_t {
    ffi_call("ncclEpxBufferSize", || {
        // SAFETY: C contract.
        let out = unsafe { out_ptr(bytes, "bytes") }?;
        // SAFETY: C contract.
        let cfg = unsafe { read_req(config, "config") }?;
        crate::ensure_arg!(num_ranks > 0, "num_ranks is {num_ranks}, must be at least 1");
        let p = validate_group_config(&cfg, 0, num_ranks as u32, 0, &EnvOverrides::default())?;
        crate::ensure_usage!(
            p.algorithm == Algorithm::LowLatency,
            "HIGH_THROUGHPUT sizes are not available yet (only LOW_LATENCY configs are sized)"
        );
        let layout =
            Layout::from_raw(layout).map_err(|v| crate::invalid_arg!("layout is {v}, not an ncclEpLayout_t value"))?;
        let h = check_handle(&p, layout, num_topk as i64, 0)?;
        let l = LlLayout::new(p.nranks, p.num_experts, p.max_tokens, p.max_token_bytes, h.num_topk)?;
        *out = l.total_bytes;
        Ok(())
    })
}
