//! `ncclEpxBufferSize` through its C entry point: sizes, the struct-size rule and error codes.

use nccl_ep::abi::ext::{ncclEpxBufferSize, ncclEpxGetLastError};
use nccl_ep::abi::guard::struct_default;
use nccl_ep::abi::types::*;
use std::ffi::CStr;

const EM: ncclEpLayout_t = ncclEpLayout_t(1);
const RM: ncclEpLayout_t = ncclEpLayout_t(2);

fn anchor() -> ncclEpGroupConfig_t {
    let mut c: ncclEpGroupConfig_t = struct_default();
    c.version = 2;
    c.algorithm = ncclEpAlgorithm_t(0);
    c.num_experts = 256;
    c.max_dispatch_tokens_per_rank = 128;
    c.max_token_bytes = 14336;
    c
}

fn size(c: *const ncclEpGroupConfig_t, n: i32, layout: ncclEpLayout_t, k: i32) -> Result<usize, (i32, String)> {
    let mut bytes = usize::MAX;
    // SAFETY: c is NULL or a live config; bytes is a live usize.
    let rc = unsafe { ncclEpxBufferSize(c, n, layout, k, &mut bytes) };
    if rc == 0 {
        Ok(bytes)
    } else {
        assert_eq!(bytes, usize::MAX, "bytes written on failure");
        // SAFETY: the library returns a NUL-terminated thread-local string.
        let msg = unsafe { CStr::from_ptr(ncclEpxGetLastError()) }
            .to_string_lossy()
            .into_owned();
        Err((rc, msg))
    }
}

#[test]
fn anchor_config_bytes_for_both_layouts() {
    let c = anchor();
    assert_eq!(size(&c, 8, EM, 8), Ok(29_592_064));
    assert_eq!(size(&c, 8, RM, 8), Ok(29_592_064));
    assert_eq!(size(&c, 64, EM, 8), Ok(236_721_152));
}

/// fp32 tokens: the caller sizes max_token_bytes = H x 4 (as NCCL EP's ep_bench does); the
/// buffer follows the bytes, not the type. N=8, B=128, K=8: dmsg = 112 + 28672, data =
/// align256(1024 x 28784) = 29 474 816, signals 1280, two banks.
#[test]
fn fp32_rows_size_by_max_token_bytes() {
    let mut c = anchor();
    c.max_token_bytes = 7168 * 4;
    assert_eq!(size(&c, 8, EM, 8), Ok(2 * (1280 + 29_474_816)));
    assert_eq!(size(&c, 8, RM, 8), Ok(58_952_192));
}

#[test]
fn explicit_rdma_buffer_size_does_not_change_the_answer() {
    let mut c = anchor();
    c.rdma_buffer_size = 1 << 20;
    assert_eq!(size(&c, 8, EM, 8), Ok(29_592_064));
}

#[test]
fn grows_with_topk() {
    let c = anchor();
    let k8 = size(&c, 8, EM, 8).unwrap();
    let k32 = size(&c, 8, EM, 32).unwrap();
    assert!(k32 > k8);
}

#[test]
fn v1_sized_config_is_accepted() {
    let mut c = anchor();
    c.size = 96;
    assert_eq!(size(&c, 8, RM, 8), Ok(29_592_064));
    c.size = 95;
    assert_eq!(size(&c, 8, RM, 8).unwrap_err().0, 4);
}

#[test]
fn argument_errors() {
    let c = anchor();
    // SAFETY: NULL bytes is what is being tested.
    assert_eq!(unsafe { ncclEpxBufferSize(&c, 8, EM, 8, std::ptr::null_mut()) }, 4);
    assert_eq!(size(std::ptr::null(), 8, EM, 8).unwrap_err().0, 4);
    let mut bad = anchor();
    bad.magic = 0x1234;
    let e = size(&bad, 8, EM, 8).unwrap_err();
    assert_eq!(e.0, 4);
    assert!(e.1.contains("magic"), "{}", e.1);
    assert_eq!(size(&c, 0, EM, 8).unwrap_err().0, 4);
    assert_eq!(size(&c, 8, EM, 0).unwrap_err().0, 4);
    assert_eq!(size(&c, 8, EM, 33).unwrap_err().0, 4);
    assert_eq!(size(&c, 8, ncclEpLayout_t(0), 8).unwrap_err().0, 4);
    assert_eq!(size(&c, 8, ncclEpLayout_t(9), 8).unwrap_err().0, 4);
    // 256 experts do not split over 7 ranks.
    assert_eq!(size(&c, 7, EM, 8).unwrap_err().0, 5);
}

#[test]
fn usage_errors() {
    let c = anchor();
    let e = size(&c, 8, ncclEpLayout_t(3), 8).unwrap_err();
    assert_eq!(e.0, 5);
    assert!(e.1.contains("FLAT"), "{}", e.1);
    let mut ht = anchor();
    ht.algorithm = ncclEpAlgorithm_t(1);
    let e = size(&ht, 8, RM, 8).unwrap_err();
    assert_eq!(e.0, 5);
    assert!(e.1.contains("HIGH_THROUGHPUT"), "{}", e.1);
}

/// HIGH_THROUGHPUT: the group buffer of docs/HT.md (signals, routing exchange, scratch), the
/// same for both layouts, growing with K.
#[test]
fn high_throughput_sizes() {
    const FLAT: ncclEpLayout_t = ncclEpLayout_t(3);
    let mut ht = anchor();
    ht.algorithm = ncclEpAlgorithm_t(1);
    ht.max_dispatch_tokens_per_rank = 4096;
    let want = ep_core::ht_layout::HtLayout::new(8, 256, 4096, 14336, 8, 0)
        .unwrap()
        .total_bytes;
    assert_eq!(size(&ht, 8, FLAT, 8), Ok(want));
    assert_eq!(size(&ht, 8, EM, 8), Ok(want));
    assert!(size(&ht, 8, FLAT, 1).unwrap() < want);
    // 8 x 4096 x 8 routing entries twice over, plus counters: under 2 MiB per rank.
    assert!(want < 2 << 20, "{want}");
    assert_eq!(size(&ht, 8, FLAT, 33).unwrap_err().0, 4);
}

/// NCCL_EP_COMB_QUANT_NVFP4 needs nothing more: its combine message, align16(H/2 + H/16 + 4)
/// bytes, is smaller than the bf16 row (2H bytes = max_token_bytes) every combine slot holds,
/// for every H the recipe accepts (a multiple of 512), so ncclEpxBufferSize (which has no
/// recipe argument) and the buffer a group allocates are those of the unquantised combine.
/// (ncclEpHandleMemSize holds routing metadata only: no payload, so no recipe either.)
#[test]
fn nvfp4_combine_fits_the_unquantised_buffer() {
    use ep_core::ll_layout::LlLayout;
    use ep_core::ll_rules::{NVFP4_HIDDEN_MULTIPLE, nvfp4_slot_bytes};
    for hidden in (NVFP4_HIDDEN_MULTIPLE..=32768).step_by(NVFP4_HIDDEN_MULTIPLE) {
        let mut c = anchor();
        c.max_token_bytes = 2 * hidden as u32;
        for k in [1, 8, 32] {
            let lay = LlLayout::new(8, 256, 128, c.max_token_bytes, k).unwrap();
            assert!(nvfp4_slot_bytes(hidden) <= lay.cmsg_bytes, "H = {hidden}");
            assert_eq!(size(&c, 8, EM, k as i32), Ok(lay.total_bytes), "H = {hidden}, K = {k}");
        }
    }
    // The anchor: 4048-byte messages in 14336-byte slots; the buffer stays 29 592 064 bytes.
    assert_eq!(nvfp4_slot_bytes(7168), 4048);
    assert_eq!(size(&anchor(), 8, EM, 8), Ok(29_592_064));
}

/// `zero_copy` does not change the buffer (docs/ZERO_COPY.md, "Buffer sizes under ON"): the LL
/// receive slots keep header + payload in every mode, HT stages only inputs.
#[test]
fn zero_copy_keeps_the_size() {
    for alg in [0, 1] {
        let mut c = anchor();
        c.algorithm = ncclEpAlgorithm_t(alg);
        if alg == 1 {
            c.max_recv_tokens_per_rank = 1024;
        }
        let layouts = if alg == 0 { [EM, RM] } else { [EM, ncclEpLayout_t(3)] };
        for layout in layouts {
            c.zero_copy = ncclEpZeroCopyMode_t(0);
            let auto = size(&c, 8, layout, 8);
            assert!(auto.as_ref().is_ok_and(|&b| b > 0), "algorithm {alg}: {auto:?}");
            for z in [1, 2, 7] {
                c.zero_copy = ncclEpZeroCopyMode_t(z);
                assert_eq!(size(&c, 8, layout, 8), auto, "algorithm {alg}, zero_copy {z}");
            }
        }
    }
}
