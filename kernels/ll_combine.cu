// Low-latency combine (docs/LL.md). Compiled by NVRTC after ll_common.cuh with:
//   EP_TOPK (1..32), EP_EM (1 expert-major, 0 rank-major), EP_IDX64 (topk_idx is int64),
//   EP_MASK (1: the group has enable_mask; 0: no mask code, a timeout traps),
//   EP_DTYPE (token type of the expert outputs and of the result: 0 bf16, 1 fp16, 2 fp32).
// Send: every expert output goes straight into the source rank's combine_recv[token][k].
// Receive: each token is reduced over its top-k in fp32 and rounded once to the token type.

#ifndef EP_DTYPE
#define EP_DTYPE 0
#endif

// A compile-time choice, so that each type has its own kernel with no branch on the type. The
// reduction works on 16-byte chunks of a row: EP_ELEMS values, widened exactly to fp32
// (EP_TO_F32) and, for the 16-bit types, rounded back once to nearest even (EP_FROM_F32).
// (Written inline in the loop: as helper functions the bf16 kernel's code came out scheduled
// differently from the single-type kernel it replaces.)
#if EP_DTYPE == 2
#define EP_ELEMS 4
#elif EP_DTYPE == 1
#define EP_ELEMS 8
#define EP_TO_F32 half_to_f32
#define EP_FROM_F32 f32_to_half
#else
#define EP_ELEMS 8
#define EP_TO_F32 bf16_to_f32
#define EP_FROM_F32 f32_to_bf16
#endif

// Sends the expert outputs of every message this rank received in the matching dispatch, except
// to sources masked since (not in `active`).
__device__ void combine_send(const LlParams& p, u32 epoch, u64 active) {
  const int N = p.nranks, K = EP_TOPK;
  const int* meta = (const int*)p.meta;
  const int lane = threadIdx.x & 31;
  const int gwarp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int gwarps = (gridDim.x * blockDim.x) >> 5;
  int total = 0;
  for (int s = 0; s < N; ++s) total += meta[s];
  // Work items: (received message, top-k entry (EM) , segment).
  const int nseg = num_segments(p.row_bytes);
#if EP_EM
  const int per_msg = K * nseg;
#else
  const int per_msg = nseg;
#endif
  for (int it = gwarp; it < total * per_msg; it += gwarps) {
    const int seg = it % nseg;
    int s = 0, slot = it / per_msg;
    while (slot >= meta[s]) slot -= meta[s++];
    if (!((active >> s) & 1ull)) continue;
    const int* mrow = meta + 2 * N + ((i64)s * p.max_tokens + slot) * (K + 1);
    const int token = mrow[0];
    char* recv = send_base(p, s, epoch) + p.off_data;
    const i64 off = (i64)seg * EP_SEG_BYTES;
    const int bytes = segment_bytes(p.row_bytes, seg);
#if EP_EM
    // One expert-output row per local top-k entry; k is the position in the source's row.
    const int k = (it / nseg) % K;
    const int row = mrow[1 + k];
    if (row < 0) continue;
    warp_copy(recv + ((i64)token * K + k) * p.cmsg + off, (const char*)p.x + (i64)row * p.row_bytes + off, bytes, lane);
#else
    // One pre-reduced row per (source, slot), stored at the first local top-k position (a
    // remote source's staging region has one row per token).
    const int j = mrow[1];
    const char* src = (const char*)p.x + ((i64)s * p.max_tokens + slot) * p.row_bytes + off;
    const i64 cell = is_remote(p, s) ? (i64)token : (i64)token * K + j;
    warp_copy(recv + cell * p.cmsg + off, src, bytes, lane);
#endif
  }
  prof_mark(p, 2);
  sends_done(p);
  prof_mark(p, 3);
  if (blockIdx.x == gridDim.x - 1) {
    for (int s = threadIdx.x; s < N; s += blockDim.x) {
      if (!((active >> s) & 1ull)) continue;
      u64* f = (u64*)(send_base(p, s, epoch) + p.off_cflag) + p.rank;
      st_release_sys(f, ((u64)(epoch + 1u) << 32) | 1u);
    }
  }
}

// Reduces the received rows of every own token (one warp per token). Contributions of absent
// expert ranks (masked, or silent past the timeout) are left out, with no renormalisation.
__device__ void combine_recv(const LlParams& p, u32 epoch) {
  const int N = p.nranks, K = EP_TOPK;
  const u32 tag = epoch + 1u;
#if EP_MASK
  __shared__ u64 present_s;
  if (threadIdx.x == 0) present_s = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < N; s += blockDim.x)
    if (wait_source(p, (const u64*)(recv_base(p, s, epoch) + p.off_cflag) + s, s, tag, EP_WAIT_COMBINE) >= 0)
      atomicOr((unsigned long long*)&present_s, 1ull << s);
  __syncthreads();
  const u64 present = present_s;
#else
  // Masking compiled out: every source is present (a timeout traps inside wait_source).
  for (int s = threadIdx.x; s < N; s += blockDim.x)
    wait_source(p, (const u64*)(recv_base(p, s, epoch) + p.off_cflag) + s, s, tag, EP_WAIT_COMBINE);
  __syncthreads();
  const u64 present = ~0ull;
#endif
  prof_mark(p, 4);
  const int lane = threadIdx.x & 31;
  const int gwarp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int gwarps = (gridDim.x * blockDim.x) >> 5;
  const char* recv = bank_base(p, p.rank, epoch) + p.off_data;
  // Work items: (own token, segment of its row).
  const int nseg = num_segments(p.row_bytes);
  for (int it = gwarp; it < p.num_tokens * nseg; it += gwarps) {
    const int t = it / nseg, seg = it % nseg;
    // Lane k decides whether entry k contributes and with which weight.
    int e = lane < K ? topk_at(p, t, lane) : -1;
    float w = 0.f;
    const int er = e >= 0 ? e / p.local_experts : -1;  // the expert's rank
    const bool here = er >= 0 && ((present >> er) & 1ull);
#if EP_EM
    bool use = here;
    if (use) w = ((const float*)p.weights)[(i64)t * K + lane];
    // A duplicate expert reads the row sent for its first occurrence.
    int src_k = __ffs(__match_any_sync(0xffffffffu, use ? e : -100 - lane)) - 1;
#else
    int src_k = lane;
    int d = here ? er : -100 - lane;
    u32 same = __match_any_sync(0xffffffffu, d);
    bool use = here && (__ffs(same) - 1) == lane;
    w = 1.f;
#endif
    u32 use_mask = __ballot_sync(0xffffffffu, use);
    // Entry k's row: combine_recv[t][src_k] here, or in the receive region of a remote expert
    // rank: the same [token][k] grid (EM; a duplicate's first occurrence has the same rank) or
    // one row per token (RM).
    const char* row = recv + ((i64)t * K + src_k) * p.cmsg;
    if (er >= 0 && is_remote(p, er)) {
      const char* rb = recv_base(p, er, epoch) + p.off_data;
      row = EP_EM ? rb + ((i64)t * K + src_k) * p.cmsg : rb + (i64)t * p.cmsg;
    }
    float wk[EP_TOPK];
    const char* rk[EP_TOPK];
#pragma unroll
    for (int k = 0; k < EP_TOPK; ++k) {
      wk[k] = __shfl_sync(0xffffffffu, w, k);
      rk[k] = (const char*)__shfl_sync(0xffffffffu, (unsigned long long)row, k);
    }
    const i64 off = (i64)seg * EP_SEG_BYTES;
    const int n16 = segment_bytes(p.row_bytes, seg) >> 4;
    int4* out = (int4*)((char*)p.out + (i64)t * p.row_bytes + off);
    for (int c = lane; c < n16; c += 32) {
      float acc[EP_ELEMS];
#pragma unroll
      for (int i = 0; i < EP_ELEMS; ++i) acc[i] = 0.f;
#pragma unroll
      for (int k = 0; k < EP_TOPK; ++k) {
        if (!(use_mask & (1u << k))) continue;
        int4 v = ld_cg((const int4*)(rk[k] + off) + c);
#if EP_DTYPE == 2
        const float* f = (const float*)&v;
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] = __fmaf_rn(wk[k], f[i], acc[i]);
#else
        const unsigned short* h = (const unsigned short*)&v;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = __fmaf_rn(wk[k], EP_TO_F32(h[i]), acc[i]);
#endif
      }
      int4 o;
#if EP_DTYPE == 2
      float* of = (float*)&o;
#pragma unroll
      for (int i = 0; i < 4; ++i) of[i] = acc[i];  // fp32: the sums as they are
#else
      unsigned short* oh = (unsigned short*)&o;
#pragma unroll
      for (int i = 0; i < 8; ++i) oh[i] = EP_FROM_F32(acc[i]);
#endif
      out[c] = o;
    }
  }
}

extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_combine(const LlParams p) {
  prof_mark(p, 0);
  const u32 epoch = ((volatile EpState*)p.state)->epoch;
  if (p.phases & PHASE_SEND) {
#if EP_MASK
    __shared__ u64 active_s;
    active_set(p, &active_s);
    const u64 active = active_s;
#else
    const u64 active = ~0ull;  // masking compiled out: every rank is active
#endif
    combine_send(p, epoch, active);
    __syncthreads();
  }
  if (p.phases & PHASE_RECV) combine_recv(p, epoch);
  prof_mark(p, 5);
  finish_op(p, (p.phases & PHASE_RECV) != 0);
}
