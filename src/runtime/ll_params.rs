//! The argument block of the low-latency kernels and the group's device state. The kernels get
//! the C versions from kernels/ep_params.cuh, which `runtime::kernel_abi` generates from these
//! definitions (the kernels take `LlParams` by value).

use crate::runtime::kernel_abi::c_struct;

/// Threads per block of the LL dispatch and combine kernels (their `__launch_bounds__`).
pub const LL_THREADS: u32 = 512;

/// Threads of the clean kernel (one per rank at most; its `__launch_bounds__`, via ep_params.cuh).
pub const LL_CLEAN_THREADS: u32 = 64;

/// Most ranks a low-latency group may have (the peer table is a fixed array in the kernel).
pub const LL_MAX_RANKS: usize = 64;
/// Bytes of the group's device state (`struct EpState`).
pub const EP_STATE_BYTES: usize = std::mem::size_of::<EpState>();
/// Bytes of the mask block of a group with `enable_mask`: `int mask[64]` (1 = active), then
/// `u64 decide[64]` (per-source decisions of the current operation, kernels/ll_common.cuh).
pub const MASK_BLOCK_BYTES: usize = 4 * LL_MAX_RANKS + 8 * LL_MAX_RANKS;
/// Offset of `decide` in the mask block.
pub const MASK_DECIDE_OFF: usize = 4 * LL_MAX_RANKS;
/// Bytes of the host-mapped status block: `int err` (the async error flag) at 0, then
/// `u64 clean_missing` at 8 (ranks that did not reach the last ncclEpMaskClean barrier).
pub const ERR_BLOCK_BYTES: usize = 16;

/// `LlParams::phases`: the kernel runs the send phase, the receive phase, or both.
pub const PHASE_SEND: i32 = 1;
pub const PHASE_RECV: i32 = 2;

c_struct! {
    /// Group-owned device state, zeroed at creation (LL and HT groups alike; HT uses `epoch`
    /// and `done`). Operations of a group run in stream order.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct EpState {
        /// operations completed so far; tag = epoch + 1; LL: bank = epoch & 1
        pub epoch: u32,
        /// blocks of the current kernel that finished (LL: to advance the epoch; HT dispatch and combine: the last one closes the operation)
        pub done: u32,
        /// LL: blocks of the current kernel that finished sending
        pub sent_done: u32,
        /// LL, masking off: set by the first thread that reports a timeout (one message)
        pub trapping: u32,
        pub pad: [u32; 12],
    }
}

c_struct! {
    /// The argument block of ll_dispatch, ll_combine and ll_clean (8-byte fields first).
    #[derive(Clone, Copy, Debug)]
    pub struct LlParams {
        /// communication buffer of every rank (ours included)
        pub peers: [u64; LL_MAX_RANKS],
        /// bytes between bank 0 and bank 1
        pub bank_stride: u64,
        /// inside a bank: dispatch_flag[N] (u64)
        pub off_dflag: u64,
        /// expert_count[N][L] (i32)
        pub off_ecount: u64,
        /// combine_flag[N] (u64)
        pub off_cflag: u64,
        /// dispatch_recv / combine_recv union
        pub off_data: u64,
        /// dispatch: tokens [T,H]; combine: expert outputs
        pub x: u64,
        /// [T,K] int64 or int32 (EP_IDX64)
        pub topk_idx: u64,
        /// dispatch: [T,K] f32 or 0; combine EM: [T,K] f32
        pub weights: u64,
        /// dispatch: EM [L,N*B,H] / RM [N,B,H]; combine: [T,H]
        pub out: u64,
        /// dispatch EM: expert_counters[L]; RM: src_rank_counters[N] (0 = none)
        pub out_counters: u64,
        /// dispatch RM: [N,B,K] i32
        pub out_topk_idx: u64,
        /// dispatch RM: [N,B,K] f32 (0 = none)
        pub out_weights: u64,
        /// handle metadata: n[N], msgs[N], then [N][B][K+1] i32
        pub meta: u64,
        /// group device state (EpState)
        pub state: u64,
        /// host-mapped: int flag (1 after a timeout), then u64 clean_missing
        pub err: u64,
        /// NCCL_EP_PROFILE: u64[gridDim.x][8] phase timestamps, else 0
        pub prof: u64,
        /// enable_mask: int[N] active ranks (1 active), else 0 (masking off)
        pub mask: u64,
        /// enable_mask: u64[N] per-source decision of the current operation
        pub decide: u64,
        /// bank 0: clean_flag[N] (u64), the ncclEpMaskClean barrier
        pub off_clean: u64,
        /// bit r: rank r is remote (docs/MULTINODE.md): peers[r] is this rank's send staging
        /// region for it, its messages arrive in a receive region; 0 = every rank by load/store
        pub remote: u64,
        /// receive staging regions, one per remote rank in rank order (0 = none)
        pub rstage: u64,
        /// bytes between two staging regions
        pub stage_stride: u64,
        /// bound on every wait in nanoseconds of %globaltimer (0 = wait forever)
        pub timeout_ns: i64,
        /// combine NVFP4: the caller's global scales, f32 [rows of x] (else 0)
        pub comb_scales: u64,
        /// dispatch RM zero-copy (`direct_out`): every rank's outputs->tokens, from its NCCL
        /// window (docs/ZERO_COPY.md); the sender stores payloads straight into row [rank][slot]
        pub out_peers: [u64; LL_MAX_RANKS],
        pub rank: i32,
        pub nranks: i32,
        pub num_experts: i32,
        pub local_experts: i32,
        pub max_tokens: i32,
        pub num_tokens: i32,
        /// H * element size (multiple of 16)
        pub row_bytes: i32,
        /// dispatch slot stride
        pub dmsg: i32,
        /// dispatch header bytes
        pub hdr: i32,
        /// combine slot stride
        pub cmsg: i32,
        /// PHASE_SEND, PHASE_RECV or both
        pub phases: i32,
        /// RM: global expert ids in outputs->topk_idx
        pub recv_global: i32,
        /// ll_clean: this ncclEpMaskClean's sequence number (from 1)
        pub clean_seq: i32,
        /// dispatch RM: 1 = payloads go straight to `out_peers` (only headers to the receive
        /// region, the receiver copies no payload)
        pub direct_out: i32,
        /// dispatch QUANT_FWD: inputs->scales [T, S] (scale_bytes per row), else 0
        pub x_scales: u64,
        /// dispatch with a recipe: outputs->scales, scale_bytes per output row, else 0
        pub out_scales: u64,
        /// dispatch: scale bytes per token, carried after the row_bytes token bytes (0 = none)
        pub scale_bytes: i32,
        /// dispatch recipe: 0 none, 1 QUANT_FWD (raw bytes), 2 DS_FP8E3M4 (bf16 quantised to E4M3)
        pub quant: i32,
        /// DS_FP8E3M4: power-of-two scales
        pub round_scales: i32,
        /// 1: every peer's buffer is on this GPU (1 rank, or a local group on one device): the
        /// kernels' fences and flag releases use GPU scope instead of system scope
        pub gpu_scope: i32,
        /// combine, both phases in this call (not send_only): the rows this rank sends itself
        /// are not staged; the send phase stores each row's address (u64) in its cell and the
        /// receive phase reads the expert output in place (NVFP4 stages as before)
        pub self_direct: i32,
        /// keeps the size a multiple of 8 (the struct's alignment)
        pub pad0: i32,
    }
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

    /// The generated C carries the same numbers (kernels/ep_params.cuh, static_asserts).
    #[test]
    fn size_matches_the_kernel_struct() {
        assert_eq!(std::mem::size_of::<LlParams>(), 2 * 8 * LL_MAX_RANKS + 26 * 8 + 20 * 4);
        assert_eq!(std::mem::size_of::<LlParams>(), 1312);
        assert_eq!(EP_STATE_BYTES, 64);
    }
}
