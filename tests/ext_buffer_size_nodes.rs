//! `ncclEpxBufferSize` with `NCCL_EP_NODE_SIZE` set (docs/MULTINODE.md): what the rank with the
//! most remote ranks allocates in all. Its own test binary with one test, because it sets the
//! variable for the whole process.

use ep_core::ht_layout::{HtLayout, staging_rows};
use ep_core::ll_layout::{LlLayout, LlStage};
use nccl_ep::abi::ext::ncclEpxBufferSize;
use nccl_ep::abi::guard::struct_default;
use nccl_ep::abi::types::*;

fn size(c: &ncclEpGroupConfig_t, n: i32, layout: i32, k: i32) -> usize {
    let mut bytes = 0usize;
    // SAFETY: c is a live config; bytes is a live usize.
    let rc = unsafe { ncclEpxBufferSize(c, n, ncclEpLayout_t(layout), k, &mut bytes) };
    assert_eq!(rc, 0);
    bytes
}

#[test]
fn node_size_adds_the_remote_staging_of_both_modes() {
    let mut c: ncclEpGroupConfig_t = struct_default();
    c.version = 2;
    c.num_experts = 64;
    c.max_dispatch_tokens_per_rank = 128;
    c.max_token_bytes = 14336;
    let ll = |c: &ncclEpGroupConfig_t| {
        let mut c = *c;
        c.algorithm = ncclEpAlgorithm_t(0);
        size(&c, 8, 1, 8)
    };
    // HT with S = 2048 (FLAT).
    let ht = |c: &ncclEpGroupConfig_t| {
        let mut c = *c;
        c.algorithm = ncclEpAlgorithm_t(1);
        c.max_recv_tokens_per_rank = 2048;
        size(&c, 8, 3, 8)
    };
    let ll_one = ll(&c);
    let ht_one = ht(&c);
    assert_eq!(ht_one, HtLayout::new(8, 64, 128, 14336, 8, 0).unwrap().total_bytes);

    // SAFETY: this binary's only test; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("NCCL_EP_NODE_SIZE", "3") };
    // Nodes {0,1,2} {3,4,5} {6,7}: ranks 6 and 7 have 6 remote ranks.
    let slot = ep_core::config::ll_slot_bytes(14336);
    let lay = LlLayout::new(8, 64, 128, slot, 8).unwrap();
    assert_eq!(ll(&c), ll_one + LlStage::new(&lay).unwrap().total_bytes(6).unwrap());
    // HT: the buffer with max(B, S) = 2048 staging rows, and 6 mirrors of it.
    let mut hc = c;
    hc.algorithm = ncclEpAlgorithm_t(1);
    hc.max_recv_tokens_per_rank = 2048;
    let p = ep_core::config::validate_group_config(
        &nccl_ep::abi::convert::group_config(&hc).0,
        0,
        8,
        0,
        &Default::default(),
    )
    .unwrap();
    let h = ep_core::handle_rules::check_handle(&p, Some(ep_core::enums::Layout::Flat), 8, 0).unwrap();
    assert_eq!(staging_rows(&p, &h), 2048);
    let staged = HtLayout::new(8, 64, 128, 14336, 8, 2048).unwrap().total_bytes;
    assert_eq!(ht(&c), 7 * staged);
    assert!(ht(&c) > 7 * 2048 * 14336);

    // A node holding every rank: no remote rank, the one-node figures.
    // SAFETY: as above.
    unsafe { std::env::set_var("NCCL_EP_NODE_SIZE", "8") };
    assert_eq!(ht(&c), ht_one);
    assert_eq!(ll(&c), ll_one);
}
