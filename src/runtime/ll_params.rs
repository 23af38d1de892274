//! The argument block of the low-latency kernels; mirrors `struct LlParams` in
//! kernels/ll_common.cuh field for field (the kernels take it by value).

/// Most ranks a low-latency group may have (the peer table is a fixed array in the kernel).
pub const LL_MAX_RANKS: usize = 64;
/// Bytes of the group's device state (`struct EpState`).
pub const EP_STATE_BYTES: usize = 64;
/// Bytes of the mask block of a group with `enable_mask`: `int mask[64]` (1 = active), then
/// `u64 decide[64]` (per-source decisions of the current operation, kernels/ll_common.cuh).
pub const MASK_BLOCK_BYTES: usize = 4 * LL_MAX_RANKS + 8 * LL_MAX_RANKS;
/// Offset of `decide` in the mask block.
pub const MASK_DECIDE_OFF: usize = 4 * LL_MAX_RANKS;
/// Bytes of the host-mapped status block: `int err` (the async error flag) at 0, then
/// `u64 clean_missing` at 8 (ranks that did not reach the last ncclEpMaskClean barrier).
pub const ERR_BLOCK_BYTES: usize = 16;

pub const PHASE_SEND: i32 = 1;
pub const PHASE_RECV: i32 = 2;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LlParams {
    pub peers: [u64; LL_MAX_RANKS],
    pub bank_stride: u64,
    pub off_dflag: u64,
    pub off_ecount: u64,
    pub off_cflag: u64,
    pub off_data: u64,
    pub x: u64,
    pub topk_idx: u64,
    pub weights: u64,
    pub out: u64,
    pub out_counters: u64,
    pub out_topk_idx: u64,
    pub out_weights: u64,
    pub meta: u64,
    pub state: u64,
    pub err: u64,
    pub prof: u64,
    pub mask: u64,
    pub decide: u64,
    pub off_clean: u64,
    pub timeout_ns: i64,
    pub rank: i32,
    pub nranks: i32,
    pub num_experts: i32,
    pub local_experts: i32,
    pub max_tokens: i32,
    pub num_tokens: i32,
    pub row_bytes: i32,
    pub dmsg: i32,
    pub hdr: i32,
    pub cmsg: i32,
    pub phases: i32,
    pub recv_global: i32,
    pub clean_seq: i32,
    pub pad0: i32,
}

impl Default for LlParams {
    fn default() -> Self {
        // SAFETY: all fields are integers; zero is a valid value for each.
        unsafe { std::mem::zeroed() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel side checks the same number with a static_assert (kernels/ll_common.cuh).
    #[test]
    fn size_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<LlParams>(), 8 * LL_MAX_RANKS + 20 * 8 + 14 * 4);
        assert_eq!(std::mem::size_of::<LlParams>(), 728);
    }
}
