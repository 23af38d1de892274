//! The argument block of the high-throughput kernels and the handle header the host reads. The
//! kernels get the C versions from kernels/ep_params.cuh, which `runtime::kernel_abi` generates
//! from these definitions (the kernels take `HtParams` by value).

use crate::runtime::kernel_abi::c_struct;

/// Threads per block of every HT kernel (their `__launch_bounds__`, via ep_params.cuh).
pub const HT_THREADS: u32 = 512;
use ep_core::ht_layout::HT_MAX_RANKS;

c_struct! {
    /// The argument block of every HT kernel (8-byte fields first).
    #[derive(Clone, Copy, Debug)]
    pub struct HtParams {
        /// group buffer of every rank (ours included)
        pub peers: [u64; HT_MAX_RANKS as usize],
        /// group device state (EpState: epoch)
        pub state: u64,
        /// host-mapped int: raised on a timeout or a captured overflow
        pub err: u64,
        /// handle metadata block (HtHdr, recv, send, bwd tables)
        pub hmem: u64,
        /// update: topk_idx; dispatch/combine: tokens
        pub in0: u64,
        /// dispatch/combine: topk_weights (0 = none)
        pub in1: u64,
        /// update: expert_counters; dispatch, combine: tokens
        pub out0: u64,
        /// update: expert_offsets; dispatch: topk_idx; combine: topk_weights
        pub out1: u64,
        /// dispatch: topk_weights
        pub out2: u64,
        /// update: recv_total_counter
        pub out3: u64,
        /// offsets in the group buffer (core::ht_layout::HtLayout)
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
        /// staging (groups spanning processes)
        pub off_stage_tok: u64,
        pub off_stage_w: u64,
        /// offsets inside hmem
        pub recv_off: u64,
        pub send_off: u64,
        pub bwd_off: u64,
        /// bound on every wait in nanoseconds of %globaltimer (0 = wait forever)
        pub timeout_ns: i64,
        pub rank: i32,
        pub nranks: i32,
        pub num_experts: i32,
        pub local_experts: i32,
        /// B
        pub max_tokens: i32,
        /// K of the handle
        pub topk: i32,
        /// T: rows of this rank's routing
        pub rows: i32,
        /// S: receive bound (fixed budget, or the eager bound)
        pub recv_rows: i32,
        /// tokens per piece of the metadata scans
        pub piece_len: i32,
        /// H * element size (multiple of 16)
        pub row_bytes: i32,
        /// EM zone alignment (>= 1)
        pub align: i32,
        /// overflow policy DROP (else TRAP)
        pub drop: i32,
        /// the update is being captured: a TRAP overflow raises `err`
        pub capturing: i32,
        /// expert_counters / expert_offsets are int64
        pub ec64: i32,
        /// recv_total_counter is int64
        pub tot64: i32,
        /// FLAT dispatch: global expert ids in outputs->topk_idx
        pub recv_global: i32,
        /// peers read staging copies (groups spanning processes)
        pub staged: i32,
        pub pad: i32,
        /// dispatch with NCCL_EP_DISP_QUANT_FWD: inputs->scales (0 = no scales)
        pub in2: u64,
        /// dispatch with NCCL_EP_DISP_QUANT_FWD: outputs->scales
        pub out4: u64,
        /// S_t * scale element size (multiple of 16; 0 = no scales). Staged scales follow the
        /// staged tokens at off_stage_tok + max_tokens * row_bytes (row_bytes + scale_bytes <= Hb).
        pub scale_bytes: i32,
        pub pad2: i32,
        /// EM: offset in hmem of the inverse receive table (crates/core/src/ht_layout.rs, `inv`)
        pub inv_off: u64,
        /// bit r: rank r is on another node (docs/MULTINODE.md, "HT across nodes"): `peers[r]`
        /// is this rank's mirror of its buffer, filled by the exchange before the pull; no
        /// flags are written to it and ht_close does not wait for it (0: one node)
        pub remote: u64,
    }
}

impl Default for HtParams {
    fn default() -> Self {
        // SAFETY: all fields are integers; zero is a valid value for each.
        unsafe { std::mem::zeroed() }
    }
}

c_struct! {
    /// The first words of a handle's metadata block (the C struct fills HT_HDR_BYTES); the host
    /// reads them after an update.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct HtHdr {
        /// rows this rank received (after drops): what dispatch writes
        pub count: i32,
        /// rows before drops (recv_total_counter)
        pub total: i32,
        /// T of the routing
        pub rows: i32,
        /// This rank's first bad routing entry, `B·K − (t·K + k)`, 0 = none (atomicMax).
        pub bad: i32,
        /// First rank whose total exceeds S, plus one (0 = none), and that total.
        pub overflow_rank: i32,
        pub overflow_total: i32,
        /// Lowest rank with a bad routing entry, plus one (0 = none), its code and value.
        pub bad_rank: i32,
        pub bad_code: i32,
        pub bad_value: i64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The generated C carries the same numbers (kernels/ep_params.cuh, static_asserts).
    #[test]
    fn size_matches_the_kernel_struct() {
        assert_eq!(
            std::mem::size_of::<HtParams>(),
            8 * 64 + 25 * 8 + 18 * 4 + 2 * 8 + 2 * 4 + 2 * 8
        );
        assert_eq!(std::mem::size_of::<HtParams>(), 824);
        assert_eq!(std::mem::size_of::<HtHdr>(), 40);
    }
}
