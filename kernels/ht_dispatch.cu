// High-throughput dispatch (docs/HT.md, "Dispatch"): pull. Compiled by NVRTC after
// ht_common.cuh with EP_EM (expert-major handle) and EP_BWD (backward pass: tokens only).
// Its last block closes the operation (ht_common.cuh, close_when_last).
//
// Every rank publishes its input pointers (tokens, topk_weights) and raises its open flag; each
// receiver then copies its received rows [0, count) straight from the sources' inputs (or
// their staging copies) into outputs.tokens, a warp per (row, 4 KiB segment), and writes the
// forward top-k outputs. Dtype-agnostic: rows are bytes. With NCCL_EP_DISP_QUANT_FWD every row
// also carries its scale row (p.scale_bytes, from inputs->scales into outputs->scales at the
// same row index): extra segments of the same work loop, copied bytewise like the tokens.

__device__ __forceinline__ const char* src_tokens(const HtParams& p, u64 (*sp)[HT_PTR_SLOTS], int s) {
  return p.staged ? peer_buf(p, s) + p.off_stage_tok : (const char*)sp[s][0];
}

// A source's scale rows: its inputs->scales, or its staging copy right after the staged tokens.
__device__ __forceinline__ const char* src_scales(const HtParams& p, u64 (*sp)[HT_PTR_SLOTS], int s) {
  return p.staged ? peer_buf(p, s) + p.off_stage_tok + (u64)p.max_tokens * (u64)p.row_bytes : (const char*)sp[s][2];
}

__device__ __forceinline__ const float* src_weights(const HtParams& p, u64 (*sp)[HT_PTR_SLOTS], int s) {
  return p.staged ? (const float*)(peer_buf(p, s) + p.off_stage_w) : (const float*)sp[s][1];
}

extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_dispatch_kernel(const HtParams p) {
  __shared__ u64 sp[HT_MAX_RANKS][HT_PTR_SLOTS];
  const u32 tag = cur_epoch(p) + 1u;
  const u64 mine[HT_PTR_SLOTS] = {p.in0, p.in1, p.in2, 0};
  const u64 present = open_op(p, tag, mine, sp);
  const int K = p.topk, B = p.max_tokens, L = p.local_experts;
  const int count = hdr(p)->count;
  (void)K;
  (void)L;
  (void)count;
#if EP_EM
  const int W = 2;
#else
  const int W = 1 + K;
#endif
  const int* recv = (const int*)(p.hmem + p.recv_off);
  const int lane = threadIdx.x & 31;
  const int gwarp = spread_warp();
  const int gwarps = grid_warps();
  const int tseg = num_segments(p.row_bytes);
  const int nseg = tseg + (p.scale_bytes > 0 ? num_segments(p.scale_bytes) : 0);
#if EP_EM
  // Zone walk (docs/HT.md, "Dispatch"): item -> (step j, local expert l), slot = zones[l] + j,
  // steps outermost. Zones list their rows in (source, token) order, so a token sits at about
  // the same fraction of every zone it reaches: walking the zones side by side reads the K
  // copies of a source row close together in time, and all but the first come from L2 (the
  // outputs are streamed past L2 so that they do not evict them). Slot order would read each
  // row K times from HBM.
  const int* zones = (const int*)(p.hmem + p.zone_off);
  __shared__ int zmax_s;
  if (threadIdx.x == 0) zmax_s = 0;
  __syncthreads();
  for (int l = threadIdx.x; l < L; l += blockDim.x) atomicMax(&zmax_s, zones[l + 1] - zones[l]);
  __syncthreads();
  const i64 items = (i64)zmax_s * L * nseg;
#else
  const i64 items = (i64)count * nseg;
#endif
  for (i64 it = gwarp; it < items; it += gwarps) {
#if EP_EM
    const int seg = (int)(it % nseg);
    const i64 q = it / nseg;
    const int l = (int)(q % L);
    const int slot = zones[l] + (int)(q / L);
    if (slot >= zones[l + 1]) continue;
#else
    const int slot = (int)(it / nseg), seg = (int)(it % nseg);
#endif
    const int* rrow = recv + (i64)slot * W;
    const int src = rrow[0];
    if (seg >= tseg) {
      // A segment of the row's scales (QUANT_FWD): same slot, its own output tensor.
      const int sseg = seg - tseg;
      const i64 soff = (i64)sseg * HT_SEG_BYTES;
      char* sdst = (char*)p.out4 + (i64)slot * p.scale_bytes + soff;
      const int sbytes = segment_bytes(p.scale_bytes, sseg);
      if (src < 0) {
        warp_zero(sdst, sbytes, lane);
        continue;
      }
      const int s = src / B, t = src % B;
      if ((present >> s) & 1) warp_copy<true>(sdst, src_scales(p, sp, s) + (i64)t * p.scale_bytes + soff, sbytes, lane);
      continue;
    }
    const i64 off = (i64)seg * HT_SEG_BYTES;
    char* dst = (char*)p.out0 + (i64)slot * p.row_bytes + off;
    const int bytes = segment_bytes(p.row_bytes, seg);
    if (src < 0) {
      // Expert-major padding row: zero tokens, zero weight.
      warp_zero(dst, bytes, lane);
#if EP_EM && !EP_BWD
      if (seg == 0 && lane == 0 && p.out2) ((float*)p.out2)[slot] = 0.f;
#endif
      continue;
    }
    const int s = src / B, t = src % B;
    if (!((present >> s) & 1)) continue;
    warp_copy<true, EP_EM>(dst, src_tokens(p, sp, s) + (i64)t * p.row_bytes + off, bytes, lane);
#if !EP_BWD
    if (seg == 0) {
      const float* w = src_weights(p, sp, s) + (i64)t * K;
#if EP_EM
      if (lane == 0 && p.out2) ((float*)p.out2)[slot] = w[rrow[1] & 255];
#else
      for (int j = lane; j < K; j += 32) {
        const int pk = rrow[1 + j];
        i64 id = -1;
        float wj = 0.f;
        if (pk >= 0) {
          id = p.recv_global ? (i64)p.rank * L + (pk >> 8) : (pk >> 8);
          wj = w[pk & 255];
        }
        if (p.out1) ((i64*)p.out1)[(i64)slot * K + j] = id;
        if (p.out2) ((float*)p.out2)[(i64)slot * K + j] = wj;
      }
#endif
    }
#endif
  }
#if !EP_BWD
  // Rows [count, S) of the forward top-k outputs: -1 / 0.0 (p.recv_rows is S, 0 when eager).
  const int gthread = blockIdx.x * blockDim.x + threadIdx.x, nthreads = gridDim.x * blockDim.x;
#if EP_EM
  for (i64 i = (i64)count + gthread; i < (i64)p.recv_rows; i += nthreads)
    if (p.out2) ((float*)p.out2)[i] = 0.f;
#else
  for (i64 i = (i64)count * K + gthread; i < (i64)p.recv_rows * K; i += nthreads) {
    if (p.out1) ((i64*)p.out1)[i] = -1;
    if (p.out2) ((float*)p.out2)[i] = 0.f;
  }
#endif
#endif
  close_when_last(p);
}
