//! Our extensions (`ncclEpx*`, declared in `include/nccl_ep_ext.h`).

use super::guard::{ffi_call, out_ptr, read_req};
use super::types::*;
use ep_core::config::{EnvOverrides, validate_group_config};
use ep_core::enums::{Algorithm, Layout};
use ep_core::handle_rules::check_handle;
use ep_core::ht_layout::{HtLayout, staging_rows};
use ep_core::ll_layout::LlLayout;
use std::ffi::{c_char, c_int};

/// The message of the last failed `ncclEp*`/`ncclEpx*` call on this thread ("" if none).
/// The string stays valid until the next failing call on the same thread.
#[unsafe(no_mangle)]
pub extern "C" fn ncclEpxGetLastError() -> *const c_char {
    super::guard::last_error_ptr()
}

/// Creates `num_ranks` ranks of one EP group inside this process, with no communicator:
/// `groups[r]` is rank r. `devices[r]` is rank r's CUDA device; `devices == NULL` puts every
/// rank on the calling thread's current device (device 0 when none is current). Every rank is
/// then driven like a rank of an NCCL group (each collective call issued once per rank, on a
/// stream of that rank's device; one thread may drive all ranks). On failure every
/// `groups[r]` is NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn ncclEpxCreateLocalGroups(
    groups: *mut ncclEpGroup_t,
    num_ranks: c_int,
    devices: *const c_int,
    config: *const ncclEpGroupConfig_t,
) -> ncclResult_t {
    super::guard::ffi_call("ncclEpxCreateLocalGroups", || {
        ep_core::ensure_arg!(!groups.is_null(), "groups is NULL");
        ep_core::ensure_arg!(
            num_ranks >= 1 && num_ranks as usize <= crate::runtime::ll_params::LL_MAX_RANKS,
            "num_ranks is {num_ranks}, expected 1..={}",
            crate::runtime::ll_params::LL_MAX_RANKS
        );
        let n = num_ranks as usize;
        // SAFETY: C contract: groups holds num_ranks entries.
        let out = unsafe { std::slice::from_raw_parts_mut(groups, n) };
        out.fill(std::ptr::null_mut());
        // SAFETY: C contract.
        let cfg = unsafe { super::guard::read_req(config, "config") }?;
        let (gcfg, alloc) = super::convert::group_config(&cfg);
        let devs: Vec<i32> = if devices.is_null() {
            let d = crate::cuda::context::current_device()?.unwrap_or(0);
            vec![d; n]
        } else {
            // SAFETY: C contract: devices holds num_ranks entries.
            unsafe { std::slice::from_raw_parts(devices, n) }.to_vec()
        };
        let count = crate::cuda::driver::device_count()?;
        for (r, &d) in devs.iter().enumerate() {
            ep_core::ensure_arg!(
                d >= 0 && d < count,
                "devices[{r}] is {d}, but there are {count} CUDA devices"
            );
        }
        for &a in &devs {
            for &b in &devs {
                if a != b {
                    ep_core::ensure_usage!(
                        crate::cuda::driver::can_access_peer(a, b)?,
                        "device {a} cannot access device {b} directly (no P2P); local groups need P2P between their devices"
                    );
                    crate::cuda::context::enable_peer_access(a, b)?;
                }
            }
        }
        let world = std::sync::Arc::new(crate::transport::local::LocalWorld::new(devs));
        let mut made = Vec::with_capacity(n);
        for r in 0..n {
            match crate::runtime::group::Group::local(&world, r, &gcfg, alloc) {
                Ok(g) => made.push(g),
                Err(e) => return Err(e.context(format_args!("local rank {r}"))),
            }
        }
        for (slot, g) in out.iter_mut().zip(made) {
            *slot = super::objects::publish_group(g);
        }
        Ok(())
    })
}

/// With `NCCL_EP_NODE_SIZE`: the remote ranks of the rank with the most (one in the smallest
/// node), docs/MULTINODE.md; 0 without it.
fn most_remote(nranks: u32) -> ep_core::error::Result<usize> {
    let n = nranks as usize;
    if n == 0 {
        return Ok(0);
    }
    // A rank's remote set depends only on its node, so the first node (full) and the last (the
    // smallest when n is not a multiple of the node size) cover every case: two evaluations, not
    // one per rank (num_ranks may be huge here; each evaluation reads the environment).
    let first = crate::transport::identity::remote_ranks_from_env(0, n)?.count_ones() as usize;
    let last = crate::transport::identity::remote_ranks_from_env(n - 1, n)?.count_ones() as usize;
    Ok(first.max(last))
}

/// Bytes of the per-rank communication buffer a group of `num_ranks` ranks needs for handles of
/// (`layout`, `num_topk`); needs no GPU and no communicator. LOW_LATENCY: both layouts need the
/// same size (docs/LL.md). HIGH_THROUGHPUT: the group buffer of docs/HT.md for ranks that share one
/// process (groups spanning processes add staging: `max(B, receive bound)` rows of
/// `max_token_bytes + 4·num_topk` bytes). With `NCCL_EP_NODE_SIZE` splitting the ranks into nodes, the figure is
/// what the rank with the most remote ranks allocates in all (docs/MULTINODE.md): LOW_LATENCY adds
/// the staging regions of the remote ranks ("Buffer sizes"), HIGH_THROUGHPUT counts the buffer with
/// its staging plus one mirror of it per remote rank ("HT across nodes"), allocated beside the
/// buffer. The query sees no hosts: ranks that group creation finds on other hosts by their host id
/// add staging beyond the figure unless `NCCL_EP_NODE_SIZE` describes them. The config is checked
/// as `ncclEpCreateGroup` checks it; its `rdma_buffer_size` is ignored. Returns ncclInvalidArgument
/// for a NULL `bytes`, a bad config or top-k, and ncclInvalidUsage for a layout the algorithm does
/// not offer.
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
        ep_core::ensure_arg!(num_ranks > 0, "num_ranks is {num_ranks}, must be at least 1");
        let (gcfg, _) = super::convert::group_config(&cfg);
        let p = validate_group_config(&gcfg, 0, num_ranks as u32, 0, &EnvOverrides::default())?;
        let layout = Layout::from_raw(layout.0)
            .map_err(|v| ep_core::invalid_arg!("layout is {v}, not an ncclEpLayout_t value"))?;
        let h = check_handle(&p, layout, num_topk as i64, 0)?;
        *out = match p.algorithm {
            Algorithm::LowLatency => {
                let slot = ep_core::config::ll_slot_bytes(p.max_token_bytes);
                let lay = LlLayout::new(p.nranks, p.num_experts, p.max_tokens, slot, h.num_topk)?;
                let remote = most_remote(p.nranks)?;
                let stage = ep_core::ll_layout::LlStage::new(&lay)?.total_bytes(remote)?;
                lay.total_bytes
                    .checked_add(stage)
                    .ok_or_else(|| ep_core::invalid_arg!("the low-latency buffer size overflows"))?
            }
            Algorithm::HighThroughput => match most_remote(p.nranks)? {
                0 => HtLayout::for_group(&p, h.num_topk, 0)?.total_bytes,
                // Across nodes (docs/MULTINODE.md, "HT across nodes"): the buffer with its
                // staging, plus one mirror of it per remote rank.
                remote => HtLayout::for_group(&p, h.num_topk, staging_rows(&p, &h))?.with_mirrors(remote)?,
            },
        };
        Ok(())
    })
}
