// Generated from the Rust definitions by src/runtime/kernel_header.rs (`make header`); do not edit:
// change the Rust side and regenerate (tests/kernel_params.rs fails while this file is stale).
// The runtime prepends it to every LL and HT kernel source, after kernels/ep_device.cuh (u64,
// i64, u32). Header-free on purpose: NVRTC compiles the kernels with no include path.
#pragma once

// src/runtime/ll_params.rs
#define LL_MAX_RANKS 64
#define EP_STATE_BYTES 64
#define MASK_BLOCK_BYTES 768
#define MASK_DECIDE_OFF 256
#define ERR_BLOCK_BYTES 16
#define PHASE_SEND 1
#define PHASE_RECV 2

// src/runtime/ll_params.rs
#define LL_THREADS 512
#define LL_CLEAN_THREADS 64

// crates/core/src/ht_layout.rs
#define HT_MAX_RANKS 64
#define HT_MAX_TOPK 32
#define HT_PIECES 32
#define HT_PTR_SLOTS 4
#define HT_HDR_BYTES 256

// src/runtime/ht_params.rs
#define HT_THREADS 512

// src/runtime/ll_params.rs
struct EpState {
  // operations completed so far; tag = epoch + 1; LL: bank = epoch & 1
  u32 epoch;
  // blocks of the current kernel that finished (LL: to advance the epoch; HT dispatch and combine: the last one closes the operation)
  u32 done;
  // LL: blocks of the current kernel that finished sending
  u32 sent_done;
  // LL, masking off: set by the first thread that reports a timeout (one message)
  u32 trapping;
  u32 pad[12];
};
static_assert(sizeof(EpState) == 64, "EpState: size of src/runtime/ll_params.rs");
static_assert(alignof(EpState) == 4, "EpState: alignment of src/runtime/ll_params.rs");
#ifdef EP_LAYOUT_CHECKS
static_assert(__builtin_offsetof(EpState, epoch) == 0 && sizeof(((EpState*)0)->epoch) == 4, "EpState.epoch: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(EpState, done) == 4 && sizeof(((EpState*)0)->done) == 4, "EpState.done: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(EpState, sent_done) == 8 && sizeof(((EpState*)0)->sent_done) == 4, "EpState.sent_done: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(EpState, trapping) == 12 && sizeof(((EpState*)0)->trapping) == 4, "EpState.trapping: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(EpState, pad) == 16 && sizeof(((EpState*)0)->pad) == 48, "EpState.pad: offset and size in src/runtime/ll_params.rs");
#endif

// src/runtime/ll_params.rs
struct LlParams {
  // communication buffer of every rank (ours included)
  u64 peers[64];
  // bytes between bank 0 and bank 1
  u64 bank_stride;
  // inside a bank: dispatch_flag[N] (u64)
  u64 off_dflag;
  // expert_count[N][L] (i32)
  u64 off_ecount;
  // combine_flag[N] (u64)
  u64 off_cflag;
  // dispatch_recv / combine_recv union
  u64 off_data;
  // dispatch: tokens [T,H]; combine: expert outputs
  u64 x;
  // [T,K] int64 or int32 (EP_IDX64)
  u64 topk_idx;
  // dispatch: [T,K] f32 or 0; combine EM: [T,K] f32
  u64 weights;
  // dispatch: EM [L,N*B,H] / RM [N,B,H]; combine: [T,H]
  u64 out;
  // dispatch EM: expert_counters[L]; RM: src_rank_counters[N] (0 = none)
  u64 out_counters;
  // dispatch RM: [N,B,K] i32
  u64 out_topk_idx;
  // dispatch RM: [N,B,K] f32 (0 = none)
  u64 out_weights;
  // handle metadata: n[N], msgs[N], then [N][B][K+1] i32
  u64 meta;
  // group device state (EpState)
  u64 state;
  // host-mapped: int flag (1 after a timeout), then u64 clean_missing
  u64 err;
  // NCCL_EP_PROFILE: u64[gridDim.x][8] phase timestamps, else 0
  u64 prof;
  // enable_mask: int[N] active ranks (1 active), else 0 (masking off)
  u64 mask;
  // enable_mask: u64[N] per-source decision of the current operation
  u64 decide;
  // bank 0: clean_flag[N] (u64), the ncclEpMaskClean barrier
  u64 off_clean;
  // bit r: rank r is remote (docs/MULTINODE.md): peers[r] is this rank's send staging
  // region for it, its messages arrive in a receive region; 0 = every rank by load/store
  u64 remote;
  // receive staging regions, one per remote rank in rank order (0 = none)
  u64 rstage;
  // bytes between two staging regions
  u64 stage_stride;
  // bound on every wait in nanoseconds of %globaltimer (0 = wait forever)
  i64 timeout_ns;
  // combine NVFP4: the caller's global scales, f32 [rows of x] (else 0)
  u64 comb_scales;
  // dispatch RM zero-copy (`direct_out`): every rank's outputs->tokens, from its NCCL
  // window (docs/ZERO_COPY.md); the sender stores payloads straight into row [rank][slot]
  u64 out_peers[64];
  int rank;
  int nranks;
  int num_experts;
  int local_experts;
  int max_tokens;
  int num_tokens;
  // H * element size (multiple of 16)
  int row_bytes;
  // dispatch slot stride
  int dmsg;
  // dispatch header bytes
  int hdr;
  // combine slot stride
  int cmsg;
  // PHASE_SEND, PHASE_RECV or both
  int phases;
  // RM: global expert ids in outputs->topk_idx
  int recv_global;
  // ll_clean: this ncclEpMaskClean's sequence number (from 1)
  int clean_seq;
  // dispatch RM: 1 = payloads go straight to `out_peers` (only headers to the receive
  // region, the receiver copies no payload)
  int direct_out;
  // dispatch QUANT_FWD: inputs->scales [T, S] (scale_bytes per row), else 0
  u64 x_scales;
  // dispatch with a recipe: outputs->scales, scale_bytes per output row, else 0
  u64 out_scales;
  // dispatch: scale bytes per token, carried after the row_bytes token bytes (0 = none)
  int scale_bytes;
  // dispatch recipe: 0 none, 1 QUANT_FWD (raw bytes), 2 DS_FP8E3M4 (bf16 quantised to E4M3)
  int quant;
  // DS_FP8E3M4: power-of-two scales
  int round_scales;
  // 1: every peer's buffer is on this GPU (1 rank, or a local group on one device): the
  // kernels' fences and flag releases use GPU scope instead of system scope
  int gpu_scope;
  // combine, both phases in this call (not send_only): the rows this rank sends itself
  // are not staged; the send phase stores each row's address (u64) in its cell and the
  // receive phase reads the expert output in place (NVFP4 stages as before)
  int self_direct;
  // keeps the size a multiple of 8 (the struct's alignment)
  int pad0;
};
static_assert(sizeof(LlParams) == 1312, "LlParams: size of src/runtime/ll_params.rs");
static_assert(alignof(LlParams) == 8, "LlParams: alignment of src/runtime/ll_params.rs");
#ifdef EP_LAYOUT_CHECKS
static_assert(__builtin_offsetof(LlParams, peers) == 0 && sizeof(((LlParams*)0)->peers) == 512, "LlParams.peers: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, bank_stride) == 512 && sizeof(((LlParams*)0)->bank_stride) == 8, "LlParams.bank_stride: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, off_dflag) == 520 && sizeof(((LlParams*)0)->off_dflag) == 8, "LlParams.off_dflag: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, off_ecount) == 528 && sizeof(((LlParams*)0)->off_ecount) == 8, "LlParams.off_ecount: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, off_cflag) == 536 && sizeof(((LlParams*)0)->off_cflag) == 8, "LlParams.off_cflag: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, off_data) == 544 && sizeof(((LlParams*)0)->off_data) == 8, "LlParams.off_data: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, x) == 552 && sizeof(((LlParams*)0)->x) == 8, "LlParams.x: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, topk_idx) == 560 && sizeof(((LlParams*)0)->topk_idx) == 8, "LlParams.topk_idx: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, weights) == 568 && sizeof(((LlParams*)0)->weights) == 8, "LlParams.weights: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, out) == 576 && sizeof(((LlParams*)0)->out) == 8, "LlParams.out: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, out_counters) == 584 && sizeof(((LlParams*)0)->out_counters) == 8, "LlParams.out_counters: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, out_topk_idx) == 592 && sizeof(((LlParams*)0)->out_topk_idx) == 8, "LlParams.out_topk_idx: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, out_weights) == 600 && sizeof(((LlParams*)0)->out_weights) == 8, "LlParams.out_weights: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, meta) == 608 && sizeof(((LlParams*)0)->meta) == 8, "LlParams.meta: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, state) == 616 && sizeof(((LlParams*)0)->state) == 8, "LlParams.state: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, err) == 624 && sizeof(((LlParams*)0)->err) == 8, "LlParams.err: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, prof) == 632 && sizeof(((LlParams*)0)->prof) == 8, "LlParams.prof: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, mask) == 640 && sizeof(((LlParams*)0)->mask) == 8, "LlParams.mask: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, decide) == 648 && sizeof(((LlParams*)0)->decide) == 8, "LlParams.decide: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, off_clean) == 656 && sizeof(((LlParams*)0)->off_clean) == 8, "LlParams.off_clean: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, remote) == 664 && sizeof(((LlParams*)0)->remote) == 8, "LlParams.remote: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, rstage) == 672 && sizeof(((LlParams*)0)->rstage) == 8, "LlParams.rstage: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, stage_stride) == 680 && sizeof(((LlParams*)0)->stage_stride) == 8, "LlParams.stage_stride: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, timeout_ns) == 688 && sizeof(((LlParams*)0)->timeout_ns) == 8, "LlParams.timeout_ns: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, comb_scales) == 696 && sizeof(((LlParams*)0)->comb_scales) == 8, "LlParams.comb_scales: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, out_peers) == 704 && sizeof(((LlParams*)0)->out_peers) == 512, "LlParams.out_peers: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, rank) == 1216 && sizeof(((LlParams*)0)->rank) == 4, "LlParams.rank: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, nranks) == 1220 && sizeof(((LlParams*)0)->nranks) == 4, "LlParams.nranks: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, num_experts) == 1224 && sizeof(((LlParams*)0)->num_experts) == 4, "LlParams.num_experts: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, local_experts) == 1228 && sizeof(((LlParams*)0)->local_experts) == 4, "LlParams.local_experts: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, max_tokens) == 1232 && sizeof(((LlParams*)0)->max_tokens) == 4, "LlParams.max_tokens: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, num_tokens) == 1236 && sizeof(((LlParams*)0)->num_tokens) == 4, "LlParams.num_tokens: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, row_bytes) == 1240 && sizeof(((LlParams*)0)->row_bytes) == 4, "LlParams.row_bytes: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, dmsg) == 1244 && sizeof(((LlParams*)0)->dmsg) == 4, "LlParams.dmsg: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, hdr) == 1248 && sizeof(((LlParams*)0)->hdr) == 4, "LlParams.hdr: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, cmsg) == 1252 && sizeof(((LlParams*)0)->cmsg) == 4, "LlParams.cmsg: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, phases) == 1256 && sizeof(((LlParams*)0)->phases) == 4, "LlParams.phases: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, recv_global) == 1260 && sizeof(((LlParams*)0)->recv_global) == 4, "LlParams.recv_global: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, clean_seq) == 1264 && sizeof(((LlParams*)0)->clean_seq) == 4, "LlParams.clean_seq: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, direct_out) == 1268 && sizeof(((LlParams*)0)->direct_out) == 4, "LlParams.direct_out: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, x_scales) == 1272 && sizeof(((LlParams*)0)->x_scales) == 8, "LlParams.x_scales: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, out_scales) == 1280 && sizeof(((LlParams*)0)->out_scales) == 8, "LlParams.out_scales: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, scale_bytes) == 1288 && sizeof(((LlParams*)0)->scale_bytes) == 4, "LlParams.scale_bytes: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, quant) == 1292 && sizeof(((LlParams*)0)->quant) == 4, "LlParams.quant: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, round_scales) == 1296 && sizeof(((LlParams*)0)->round_scales) == 4, "LlParams.round_scales: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, gpu_scope) == 1300 && sizeof(((LlParams*)0)->gpu_scope) == 4, "LlParams.gpu_scope: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, self_direct) == 1304 && sizeof(((LlParams*)0)->self_direct) == 4, "LlParams.self_direct: offset and size in src/runtime/ll_params.rs");
static_assert(__builtin_offsetof(LlParams, pad0) == 1308 && sizeof(((LlParams*)0)->pad0) == 4, "LlParams.pad0: offset and size in src/runtime/ll_params.rs");
#endif

// src/runtime/ht_params.rs
struct HtParams {
  // group buffer of every rank (ours included)
  u64 peers[64];
  // group device state (EpState: epoch)
  u64 state;
  // host-mapped int: raised on a timeout or a captured overflow
  u64 err;
  // handle metadata block (HtHdr, recv, send, bwd tables)
  u64 hmem;
  // update: topk_idx; dispatch/combine: tokens
  u64 in0;
  // dispatch/combine: topk_weights (0 = none)
  u64 in1;
  // update: expert_counters; dispatch, combine: tokens
  u64 out0;
  // update: expert_offsets; dispatch: topk_idx; combine: topk_weights
  u64 out1;
  // dispatch: topk_weights
  u64 out2;
  // update: recv_total_counter
  u64 out3;
  // offsets in the group buffer (core::ht_layout::HtLayout)
  u64 off_open;
  u64 off_done;
  u64 off_ptrs;
  u64 off_own;
  u64 off_all;
  u64 off_cnt;
  u64 off_tot;
  u64 off_zoff;
  u64 off_rbase;
  u64 off_sbase;
  // staging (groups spanning processes)
  u64 off_stage_tok;
  u64 off_stage_w;
  // offsets inside hmem
  u64 recv_off;
  u64 send_off;
  u64 bwd_off;
  // bound on every wait in nanoseconds of %globaltimer (0 = wait forever)
  i64 timeout_ns;
  int rank;
  int nranks;
  int num_experts;
  int local_experts;
  // B
  int max_tokens;
  // K of the handle
  int topk;
  // T: rows of this rank's routing
  int rows;
  // S: receive bound (fixed budget, or the eager bound)
  int recv_rows;
  // tokens per piece of the metadata scans
  int piece_len;
  // H * element size (multiple of 16)
  int row_bytes;
  // EM zone alignment (>= 1)
  int align;
  // overflow policy DROP (else TRAP)
  int drop;
  // the update is being captured: a TRAP overflow raises `err`
  int capturing;
  // expert_counters / expert_offsets are int64
  int ec64;
  // recv_total_counter is int64
  int tot64;
  // FLAT dispatch: global expert ids in outputs->topk_idx
  int recv_global;
  // peers read staging copies (groups spanning processes)
  int staged;
  int pad;
  // dispatch with NCCL_EP_DISP_QUANT_FWD: inputs->scales (0 = no scales)
  u64 in2;
  // dispatch with NCCL_EP_DISP_QUANT_FWD: outputs->scales
  u64 out4;
  // S_t * scale element size (multiple of 16; 0 = no scales). Staged scales follow the
  // staged tokens at off_stage_tok + max_tokens * row_bytes (row_bytes + scale_bytes <= Hb).
  int scale_bytes;
  int pad2;
  // EM: offset in hmem of the inverse receive table (crates/core/src/ht_layout.rs, `inv`)
  u64 inv_off;
  // bit r: rank r is on another node (docs/MULTINODE.md, "HT across nodes"): `peers[r]`
  // is this rank's mirror of its buffer, filled by the exchange before the pull; no
  // flags are written to it and ht_close does not wait for it (0: one node)
  u64 remote;
};
static_assert(sizeof(HtParams) == 824, "HtParams: size of src/runtime/ht_params.rs");
static_assert(alignof(HtParams) == 8, "HtParams: alignment of src/runtime/ht_params.rs");
#ifdef EP_LAYOUT_CHECKS
static_assert(__builtin_offsetof(HtParams, peers) == 0 && sizeof(((HtParams*)0)->peers) == 512, "HtParams.peers: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, state) == 512 && sizeof(((HtParams*)0)->state) == 8, "HtParams.state: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, err) == 520 && sizeof(((HtParams*)0)->err) == 8, "HtParams.err: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, hmem) == 528 && sizeof(((HtParams*)0)->hmem) == 8, "HtParams.hmem: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, in0) == 536 && sizeof(((HtParams*)0)->in0) == 8, "HtParams.in0: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, in1) == 544 && sizeof(((HtParams*)0)->in1) == 8, "HtParams.in1: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, out0) == 552 && sizeof(((HtParams*)0)->out0) == 8, "HtParams.out0: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, out1) == 560 && sizeof(((HtParams*)0)->out1) == 8, "HtParams.out1: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, out2) == 568 && sizeof(((HtParams*)0)->out2) == 8, "HtParams.out2: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, out3) == 576 && sizeof(((HtParams*)0)->out3) == 8, "HtParams.out3: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_open) == 584 && sizeof(((HtParams*)0)->off_open) == 8, "HtParams.off_open: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_done) == 592 && sizeof(((HtParams*)0)->off_done) == 8, "HtParams.off_done: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_ptrs) == 600 && sizeof(((HtParams*)0)->off_ptrs) == 8, "HtParams.off_ptrs: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_own) == 608 && sizeof(((HtParams*)0)->off_own) == 8, "HtParams.off_own: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_all) == 616 && sizeof(((HtParams*)0)->off_all) == 8, "HtParams.off_all: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_cnt) == 624 && sizeof(((HtParams*)0)->off_cnt) == 8, "HtParams.off_cnt: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_tot) == 632 && sizeof(((HtParams*)0)->off_tot) == 8, "HtParams.off_tot: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_zoff) == 640 && sizeof(((HtParams*)0)->off_zoff) == 8, "HtParams.off_zoff: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_rbase) == 648 && sizeof(((HtParams*)0)->off_rbase) == 8, "HtParams.off_rbase: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_sbase) == 656 && sizeof(((HtParams*)0)->off_sbase) == 8, "HtParams.off_sbase: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_stage_tok) == 664 && sizeof(((HtParams*)0)->off_stage_tok) == 8, "HtParams.off_stage_tok: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, off_stage_w) == 672 && sizeof(((HtParams*)0)->off_stage_w) == 8, "HtParams.off_stage_w: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, recv_off) == 680 && sizeof(((HtParams*)0)->recv_off) == 8, "HtParams.recv_off: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, send_off) == 688 && sizeof(((HtParams*)0)->send_off) == 8, "HtParams.send_off: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, bwd_off) == 696 && sizeof(((HtParams*)0)->bwd_off) == 8, "HtParams.bwd_off: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, timeout_ns) == 704 && sizeof(((HtParams*)0)->timeout_ns) == 8, "HtParams.timeout_ns: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, rank) == 712 && sizeof(((HtParams*)0)->rank) == 4, "HtParams.rank: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, nranks) == 716 && sizeof(((HtParams*)0)->nranks) == 4, "HtParams.nranks: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, num_experts) == 720 && sizeof(((HtParams*)0)->num_experts) == 4, "HtParams.num_experts: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, local_experts) == 724 && sizeof(((HtParams*)0)->local_experts) == 4, "HtParams.local_experts: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, max_tokens) == 728 && sizeof(((HtParams*)0)->max_tokens) == 4, "HtParams.max_tokens: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, topk) == 732 && sizeof(((HtParams*)0)->topk) == 4, "HtParams.topk: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, rows) == 736 && sizeof(((HtParams*)0)->rows) == 4, "HtParams.rows: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, recv_rows) == 740 && sizeof(((HtParams*)0)->recv_rows) == 4, "HtParams.recv_rows: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, piece_len) == 744 && sizeof(((HtParams*)0)->piece_len) == 4, "HtParams.piece_len: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, row_bytes) == 748 && sizeof(((HtParams*)0)->row_bytes) == 4, "HtParams.row_bytes: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, align) == 752 && sizeof(((HtParams*)0)->align) == 4, "HtParams.align: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, drop) == 756 && sizeof(((HtParams*)0)->drop) == 4, "HtParams.drop: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, capturing) == 760 && sizeof(((HtParams*)0)->capturing) == 4, "HtParams.capturing: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, ec64) == 764 && sizeof(((HtParams*)0)->ec64) == 4, "HtParams.ec64: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, tot64) == 768 && sizeof(((HtParams*)0)->tot64) == 4, "HtParams.tot64: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, recv_global) == 772 && sizeof(((HtParams*)0)->recv_global) == 4, "HtParams.recv_global: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, staged) == 776 && sizeof(((HtParams*)0)->staged) == 4, "HtParams.staged: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, pad) == 780 && sizeof(((HtParams*)0)->pad) == 4, "HtParams.pad: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, in2) == 784 && sizeof(((HtParams*)0)->in2) == 8, "HtParams.in2: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, out4) == 792 && sizeof(((HtParams*)0)->out4) == 8, "HtParams.out4: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, scale_bytes) == 800 && sizeof(((HtParams*)0)->scale_bytes) == 4, "HtParams.scale_bytes: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, pad2) == 804 && sizeof(((HtParams*)0)->pad2) == 4, "HtParams.pad2: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, inv_off) == 808 && sizeof(((HtParams*)0)->inv_off) == 8, "HtParams.inv_off: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtParams, remote) == 816 && sizeof(((HtParams*)0)->remote) == 8, "HtParams.remote: offset and size in src/runtime/ht_params.rs");
#endif

// src/runtime/ht_params.rs
struct HtHdr {
  // rows this rank received (after drops): what dispatch writes
  int count;
  // rows before drops (recv_total_counter)
  int total;
  // T of the routing
  int rows;
  // This rank's first bad routing entry, `B·K − (t·K + k)`, 0 = none (atomicMax).
  int bad;
  // First rank whose total exceeds S, plus one (0 = none), and that total.
  int overflow_rank;
  int overflow_total;
  // Lowest rank with a bad routing entry, plus one (0 = none), its code and value.
  int bad_rank;
  int bad_code;
  i64 bad_value;
  // the rest of the 256 bytes (not read by the host)
  int pad[54];
};
static_assert(sizeof(HtHdr) == 256, "HtHdr: 256 bytes, the 40 of src/runtime/ht_params.rs padded");
static_assert(alignof(HtHdr) == 8, "HtHdr: alignment of src/runtime/ht_params.rs");
#ifdef EP_LAYOUT_CHECKS
static_assert(__builtin_offsetof(HtHdr, count) == 0 && sizeof(((HtHdr*)0)->count) == 4, "HtHdr.count: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtHdr, total) == 4 && sizeof(((HtHdr*)0)->total) == 4, "HtHdr.total: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtHdr, rows) == 8 && sizeof(((HtHdr*)0)->rows) == 4, "HtHdr.rows: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtHdr, bad) == 12 && sizeof(((HtHdr*)0)->bad) == 4, "HtHdr.bad: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtHdr, overflow_rank) == 16 && sizeof(((HtHdr*)0)->overflow_rank) == 4, "HtHdr.overflow_rank: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtHdr, overflow_total) == 20 && sizeof(((HtHdr*)0)->overflow_total) == 4, "HtHdr.overflow_total: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtHdr, bad_rank) == 24 && sizeof(((HtHdr*)0)->bad_rank) == 4, "HtHdr.bad_rank: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtHdr, bad_code) == 28 && sizeof(((HtHdr*)0)->bad_code) == 4, "HtHdr.bad_code: offset and size in src/runtime/ht_params.rs");
static_assert(__builtin_offsetof(HtHdr, bad_value) == 32 && sizeof(((HtHdr*)0)->bad_value) == 8, "HtHdr.bad_value: offset and size in src/runtime/ht_params.rs");
#endif
