// High-throughput combine (docs/HT.md, "Combine"): pull. Compiled by NVRTC after
// ht_common.cuh with EP_EM (expert-major handle), EP_BWD (backward: also gathers the weights)
// and EP_DTYPE (0 bf16, 1 fp16, 2 fp32). Its last block closes the operation (ht_common.cuh).
//
// Every rank publishes its inputs (tokens [>= count, H], backward topk_weights). For each own
// token t a warp walks the send table row of t (its contributions in combine order: FLAT by
// destination rank, EM by (rank, local expert)) and reads each contribution from the rank that
// holds it, adding in fp32 in that order; one rounding to the output type.

#if EP_DTYPE == 2
#define ELEMS 4
#else
#define ELEMS 8
#endif

// half_to_f32 / f32_to_half: kernels/ep_device.cuh.


// Adds the ELEMS values of one 16-byte chunk to acc (in element order).
__device__ __forceinline__ void add_chunk(float* acc, int4 v) {
#if EP_DTYPE == 2
  acc[0] += __int_as_float(v.x);
  acc[1] += __int_as_float(v.y);
  acc[2] += __int_as_float(v.z);
  acc[3] += __int_as_float(v.w);
#else
  const unsigned short* h = (const unsigned short*)&v;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#if EP_DTYPE == 1
    acc[i] += half_to_f32(h[i]);
#else
    acc[i] += __uint_as_float(((u32)h[i]) << 16);
#endif
  }
#endif
}

__device__ __forceinline__ int4 round_chunk(const float* acc) {
  int4 o;
#if EP_DTYPE == 2
  o.x = __float_as_int(acc[0]);
  o.y = __float_as_int(acc[1]);
  o.z = __float_as_int(acc[2]);
  o.w = __float_as_int(acc[3]);
#else
  unsigned short* h = (unsigned short*)&o;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#if EP_DTYPE == 1
    h[i] = f32_to_half(acc[i]);
#else
    h[i] = f32_to_bf16(acc[i]);
#endif
  }
#endif
  return o;
}

// Chunks of 16 bytes each lane keeps in flight per contribution.
#define UNROLL 4

extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_combine_kernel(const HtParams p) {
  __shared__ u64 sp[HT_MAX_RANKS][HT_PTR_SLOTS];
  const u32 tag = cur_epoch(p) + 1u;
  const u64 mine[HT_PTR_SLOTS] = {p.in0, p.in1, 0, 0};
  const u64 present = open_op(p, tag, mine, sp);
  const int K = p.topk;
  const int2* send = (const int2*)(p.hmem + p.send_off);
  const int lane = threadIdx.x & 31;
  const int gwarp = spread_warp();
  const int gwarps = grid_warps();
  const int nseg = num_segments(p.row_bytes);
  for (i64 it = gwarp; it < (i64)p.rows * nseg; it += gwarps) {
    const int t = (int)(it / nseg), seg = (int)(it % nseg);
    // Lane j holds contribution j of token t.
    int2 c = make_int2(-1, -1);
    if (lane < K) c = send[(i64)t * K + lane];
    const bool use = c.x >= 0 && ((present >> c.x) & 1);
    const unsigned mask = __ballot_sync(0xffffffffu, use);
    const i64 off = (i64)seg * HT_SEG_BYTES;
    const int n16 = segment_bytes(p.row_bytes, seg) >> 4;
    int4* out = (int4*)((char*)p.out0 + (i64)t * p.row_bytes + off);
    // Warp-uniform chunk loop (every lane runs every step, predicated per chunk): the shuffles
    // inside need all 32 lanes, which a lane-dependent bound (c0 = lane; c0 < n16) does not
    // give when n16 % 128 is between 1 and 31.
    for (int cb = 0; cb < n16; cb += 32 * UNROLL) {
      const int c0 = cb + lane;
      float acc[UNROLL][ELEMS];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
#pragma unroll
        for (int i = 0; i < ELEMS; ++i) acc[u][i] = 0.f;
      unsigned m = mask;
      while (m) {
        const int j = __ffs(m) - 1;
        m &= m - 1;
        const int d = __shfl_sync(0xffffffffu, c.x, j);
        const int slot = __shfl_sync(0xffffffffu, c.y, j);
        const char* base = p.staged ? peer_buf(p, d) + p.off_stage_tok : (const char*)sp[d][0];
        const int4* src = (const int4*)(base + (i64)slot * p.row_bytes + off);
        int4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
          if (c0 + 32 * u < n16) v[u] = ld_cg(src + c0 + 32 * u);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
          if (c0 + 32 * u < n16) add_chunk(acc[u], v[u]);
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)
        if (c0 + 32 * u < n16) out[c0 + 32 * u] = round_chunk(acc[u]);
    }
#if EP_BWD
    // out_w[t][k]: the value the hosting rank supplied for (t's row, expert topk[t][k]).
    if (seg == 0) {
      const int* bwd = (const int*)(p.hmem + p.bwd_off) + (i64)t * K;
      for (int k0 = 0; k0 < K; k0 += 32) {
        const int k = k0 + lane;
        const int b = k < K ? bwd[k] : -1;
        float w = 0.f;
        if (b >= 0) {
          const int2 e = send[(i64)t * K + (b >> 16)];
          if (e.x >= 0 && ((present >> e.x) & 1)) {
            const float* ws = p.staged ? (const float*)(peer_buf(p, e.x) + p.off_stage_w) : (const float*)sp[e.x][1];
#if EP_EM
            w = ws[e.y];
#else
            w = ws[(i64)e.y * K + (b & 0xffff)];
#endif
          }
        }
        if (k < K) ((float*)p.out1)[(i64)t * K + k] = w;
      }
    }
#endif
  }
  close_when_last(p);
}
