//! C structs into the core's and the runtime's types: the only place that knows both. Values
//! are copied out of the caller's struct (already read through the checked helpers); no
//! pointer is kept except the allocator callbacks and their context, which the caller owns.

use super::types::ncclEpGroupConfig_t;
use crate::runtime::alloc::CustomAlloc;
use ep_core::config::GroupConfig;

/// The fields of a group config, and the caller's allocator when both callbacks are set (the
/// rules refuse one without the other).
pub fn group_config(c: &ncclEpGroupConfig_t) -> (GroupConfig, Option<CustomAlloc>) {
    let cfg = GroupConfig {
        algorithm: c.algorithm.0,
        num_experts: c.num_experts,
        max_dispatch_tokens_per_rank: c.max_dispatch_tokens_per_rank,
        max_recv_tokens_per_rank: c.max_recv_tokens_per_rank,
        max_token_bytes: c.max_token_bytes,
        rdma_buffer_size: c.rdma_buffer_size,
        max_num_sms: c.max_num_sms,
        has_alloc_fn: c.alloc.alloc_fn.is_some(),
        has_free_fn: c.alloc.free_fn.is_some(),
        enable_mask: c.enable_mask,
        timeout_ns: c.timeout_ns,
        zero_copy: c.zero_copy.0,
        overflow_policy: c.overflow_policy.0,
        num_topk: c.num_topk,
    };
    let alloc = match (c.alloc.alloc_fn, c.alloc.free_fn) {
        (Some(alloc_fn), Some(free_fn)) => Some(CustomAlloc {
            alloc_fn,
            free_fn,
            context: c.alloc.context,
        }),
        _ => None,
    };
    (cfg, alloc)
}
