// Shared pieces of the high-throughput kernels (docs/HT.md, "GPU design"): the argument block,
// the handle header, the open/close protocol and segment helpers; kernels/ep_device.cuh (loads,
// stores, copies) comes first.
// Header-free on purpose: NVRTC compiles this at run time with no CUDA include path.
#pragma once

#define HT_MAX_RANKS 64
#define HT_MAX_TOPK 32
#define HT_PIECES 32
#define HT_PTR_SLOTS 4
#define HT_THREADS 512

// Mirrors `HtParams` in src/runtime/ht_params.rs field for field (8-byte fields first).
struct HtParams {
  u64 peers[HT_MAX_RANKS];  // group buffer of every rank (ours included)
  u64 state;                // group device state (EpState: epoch)
  u64 err;                  // host-mapped int: raised on a timeout or a captured overflow
  u64 hmem;                 // handle metadata block (HtHdr, recv, send, bwd tables)
  u64 in0, in1;             // update: topk_idx; dispatch/combine: tokens, topk_weights (0 = none)
  u64 out0, out1, out2, out3;  // update: expert_counters, expert_offsets, recv_total_counter;
                               // dispatch: tokens, topk_idx, topk_weights; combine: tokens, topk_weights
  u64 off_open, off_done, off_ptrs, off_own, off_all, off_cnt, off_tot, off_zoff, off_rbase, off_sbase;
  u64 off_stage_tok, off_stage_w;  // staging (groups spanning processes)
  u64 recv_off, send_off, bwd_off;  // inside hmem
  i64 timeout_cycles;               // wait bound in clock cycles (0 = forever)
  int rank, nranks, num_experts, local_experts;
  int max_tokens;  // B
  int topk;        // K of the handle
  int rows;        // T: rows of this rank's routing
  int recv_rows;   // S: receive bound (fixed budget, or the eager bound)
  int piece_len;   // tokens per piece of the metadata scans
  int row_bytes;   // H * element size (multiple of 16)
  int align;       // EM zone alignment (>= 1)
  int drop;        // overflow policy DROP (else TRAP)
  int capturing;   // the update is being captured: a TRAP overflow raises `err`
  int ec64;        // expert_counters / expert_offsets are int64
  int tot64;       // recv_total_counter is int64
  int recv_global; // FLAT dispatch: global expert ids in outputs->topk_idx
  int staged;      // peers read staging copies (groups spanning processes)
  int pad;
};
static_assert(sizeof(HtParams) == 8 * HT_MAX_RANKS + 25 * 8 + 18 * 4, "HtParams mirrors src/runtime/ht_params.rs");

// The first 256 bytes of a handle's metadata block (int32 words).
struct HtHdr {
  int count;           // rows this rank received (after drops): what dispatch writes
  int total;           // rows before drops (recv_total_counter)
  int rows;            // T of the routing
  int bad;             // B*K - (t*K + k) of this rank's first bad routing entry, 0 = none (atomicMax)
  int overflow_rank;   // first rank whose total exceeds S (+1), 0 = none
  int overflow_total;  // that rank's total
  int bad_rank;        // lowest rank with a bad routing entry (+1), 0 = none
  int bad_code;        // its `bad`
  i64 bad_value;       // the bad value
  int pad[54];
};
static_assert(sizeof(HtHdr) == 256, "HtHdr is the 256-byte handle header");

// Group-owned device state, zeroed at creation (the same struct LL uses).
struct EpState {
  u32 epoch;  // HT operations completed so far; tag = epoch + 1
  u32 pad[15];
};






__device__ __forceinline__ u32 cur_epoch(const HtParams& p) { return ((volatile EpState*)p.state)->epoch; }

__device__ __forceinline__ char* peer_buf(const HtParams& p, int r) { return (char*)p.peers[r]; }

// Waits until the flag holds `tag`; false after a timeout (the host-visible error flag is then
// raised and the peer counts as absent).
__device__ __forceinline__ bool wait_tag(const u64* flag, u32 tag, const HtParams& p) {
  i64 start = clock64();
  while (true) {
    if (ld_acquire_sys(flag) == (u64)tag) return true;
    if (p.timeout_cycles > 0 && clock64() - start > p.timeout_cycles) {
      if (p.err) atomicExch((int*)p.err, 1);
      return false;
    }
  }
}

// Opening of an operation. Block 0 publishes this rank's pointers (`ptrs`, HT_PTR_SLOTS values;
// may be null) into every peer's buffer and raises its `open` flag there; then every block
// waits for all sources' flags and returns the mask of present sources, with their pointers in
// `src_ptrs[s][*]` (shared memory).
__device__ u64 open_op(const HtParams& p, u32 tag, const u64* ptrs, u64 (*src_ptrs)[HT_PTR_SLOTS]) {
  __shared__ u64 present_mask;
  if (threadIdx.x == 0) present_mask = 0;
  if (blockIdx.x == 0 && threadIdx.x < p.nranks) {
    const int d = threadIdx.x;
    char* b = peer_buf(p, d);
    if (ptrs) {
      u64* slot = (u64*)(b + p.off_ptrs) + (u64)p.rank * HT_PTR_SLOTS;
      for (int i = 0; i < HT_PTR_SLOTS; ++i) slot[i] = ptrs[i];
    }
    __threadfence_system();
    st_release_sys((u64*)(b + p.off_open) + p.rank, (u64)tag);
  }
  __syncthreads();
  if (threadIdx.x < p.nranks) {
    const int s = threadIdx.x;
    char* mine = peer_buf(p, p.rank);
    if (wait_tag((const u64*)(mine + p.off_open) + s, tag, p)) {
      if (src_ptrs) {
        const u64* slot = (const u64*)(mine + p.off_ptrs) + (u64)s * HT_PTR_SLOTS;
        for (int i = 0; i < HT_PTR_SLOTS; ++i) src_ptrs[s][i] = ld_cg_u64(slot + i);
      }
      atomicOr(&present_mask, 1ull << s);
    }
  }
  __syncthreads();
  return present_mask;
}


__device__ __forceinline__ void warp_zero(void* dst, int bytes, int lane) {
  int4* d = (int4*)dst;
  const int4 z = make_int4(0, 0, 0, 0);
  for (int i = lane; i < (bytes >> 4); i += 32) d[i] = z;
}

// Rows are split into segments of this many bytes so that several warps share one long row.
#define HT_SEG_BYTES 4096

__device__ __forceinline__ int num_segments(int row_bytes) { return (row_bytes + HT_SEG_BYTES - 1) / HT_SEG_BYTES; }

__device__ __forceinline__ int segment_bytes(int row_bytes, int seg) {
  return min(HT_SEG_BYTES, row_bytes - seg * HT_SEG_BYTES);
}

__device__ __forceinline__ HtHdr* hdr(const HtParams& p) { return (HtHdr*)p.hmem; }

// Every HT operation ends here (one block, its own launch so that every pull of the operation
// has finished; in every module so that no module load falls between an operation's
// launches): tell each peer this rank is done reading its data,
// wait until every peer is done with ours, then advance the epoch.
extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_close(const HtParams p) {
  const u32 tag = cur_epoch(p) + 1u;
  if (threadIdx.x < p.nranks) {
    const int d = threadIdx.x;
    st_release_sys((u64*)(peer_buf(p, d) + p.off_done) + p.rank, (u64)tag);
  }
  __syncthreads();
  if (threadIdx.x < p.nranks) wait_tag((const u64*)(peer_buf(p, p.rank) + p.off_done) + threadIdx.x, tag, p);
  __syncthreads();
  if (threadIdx.x == 0) {
    ((EpState*)p.state)->epoch = tag;
    __threadfence();
  }
}

