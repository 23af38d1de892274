//! The argument block of the high-throughput kernels; mirrors `struct HtParams` in
//! kernels/ht_common.cuh field for field (the kernels take it by value).

use ep_core::ht_layout::HT_MAX_RANKS;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct HtParams {
    pub peers: [u64; HT_MAX_RANKS as usize],
    pub state: u64,
    pub err: u64,
    pub hmem: u64,
    pub in0: u64,
    pub in1: u64,
    pub out0: u64,
    pub out1: u64,
    pub out2: u64,
    pub out3: u64,
    pub off_open: u64,
    pub off_done: u64,
    pub off_ptrs: u64,
    pub off_own: u64,
    pub off_all: u64,
    pub off_cnt: u64,
    pub off_tot: u64,
    pub off_zoff: u64,
    pub off_rbase: u64,
    pub off_sbase: u64,
    pub off_stage_tok: u64,
    pub off_stage_w: u64,
    pub recv_off: u64,
    pub send_off: u64,
    pub bwd_off: u64,
    pub timeout_cycles: i64,
    pub rank: i32,
    pub nranks: i32,
    pub num_experts: i32,
    pub local_experts: i32,
    pub max_tokens: i32,
    pub topk: i32,
    pub rows: i32,
    pub recv_rows: i32,
    pub piece_len: i32,
    pub row_bytes: i32,
    pub align: i32,
    pub drop: i32,
    pub capturing: i32,
    pub ec64: i32,
    pub tot64: i32,
    pub recv_global: i32,
    pub staged: i32,
    pub pad: i32,
}

impl Default for HtParams {
    fn default() -> Self {
        // SAFETY: all fields are integers; zero is a valid value for each.
        unsafe { std::mem::zeroed() }
    }
}

/// Bytes of the handle header the host reads after an update (`struct HtHdr`, first words).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HtHdr {
    pub count: i32,
    pub total: i32,
    pub rows: i32,
    /// This rank's first bad routing entry, `B·K − (t·K + k)`, 0 = none.
    pub bad: i32,
    /// First rank whose total exceeds S, plus one (0 = none), and that total.
    pub overflow_rank: i32,
    pub overflow_total: i32,
    /// Lowest rank with a bad routing entry, plus one (0 = none), its code and value.
    pub bad_rank: i32,
    pub bad_code: i32,
    pub bad_value: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel side checks the same number with a static_assert (kernels/ht_common.cuh).
    #[test]
    fn size_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<HtParams>(), 8 * 64 + 25 * 8 + 18 * 4);
        assert_eq!(std::mem::size_of::<HtParams>(), 784);
    }
}
