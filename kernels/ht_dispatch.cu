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

#if EP_EM
// Expert-major: a source row goes to up to K receive rows (one per local expert it reaches).
// The handle's inverse table lists them per source token, so each source segment is read once
// and written to all of its rows (streamed stores: output the kernel does not read again);
// walking the receive rows instead reads each source row once per expert. Padding rows and the
// weights output go per receive row, a lane each.
__device__ void dispatch_em(const HtParams& p, u64 present, u64 (*sp)[HT_PTR_SLOTS], int count) {
  const int K = p.topk, B = p.max_tokens, N = p.nranks;
  const int* recv = (const int*)(p.hmem + p.recv_off);
  const int* inv = (const int*)(p.hmem + p.inv_off);
  const int lane = threadIdx.x & 31;
  const int gwarp = spread_warp();
  const int gwarps = grid_warps();
  // (1) Receive rows, 32 per warp step: the weight of a real row (forward), the padding rows
  // zeroed by the whole warp.
  for (i64 base = (i64)gwarp * 32; base < count; base += (i64)gwarps * 32) {
    const i64 slot = base + lane;
    const int src = slot < count ? recv[slot * 2] : 0;
#if !EP_BWD
    if (slot < count && p.out2) {
      float w = 0.f;
      if (src >= 0 && ((present >> (src / B)) & 1))
        w = src_weights(p, sp, src / B)[(i64)(src % B) * K + (recv[slot * 2 + 1] & 255)];
      ((float*)p.out2)[slot] = w;
    }
#endif
    unsigned pad = __ballot_sync(0xffffffffu, slot < count && src < 0);
    while (pad) {
      const int j = __ffs(pad) - 1;
      pad &= pad - 1;
      warp_zero((char*)p.out0 + (base + j) * p.row_bytes, p.row_bytes, lane);
      if (p.scale_bytes > 0) warp_zero((char*)p.out4 + (base + j) * p.scale_bytes, p.scale_bytes, lane);
    }
  }
  // (2) Source tokens x segments (token bytes, then QUANT_FWD scale bytes).
  const int tseg = num_segments(p.row_bytes);
  const int nseg = tseg + (p.scale_bytes > 0 ? num_segments(p.scale_bytes) : 0);
  for (i64 it = gwarp; it < (i64)N * B * nseg; it += gwarps) {
    const int seg = (int)(it % nseg);
    const i64 st = it / nseg;  // s * B + t
    const int s = (int)(st / B), t = (int)(st % B);
    if (!((present >> s) & 1)) continue;
    const bool scales = seg >= tseg;
    const int sg = scales ? seg - tseg : seg;
    const int rb = scales ? p.scale_bytes : p.row_bytes;
    const i64 off = (i64)sg * HT_SEG_BYTES;
    const int n16 = segment_bytes(rb, sg) >> 4;
    const int4* src = (const int4*)((scales ? src_scales(p, sp, s) : src_tokens(p, sp, s)) + (i64)t * rb + off);
    char* out = scales ? (char*)p.out4 : (char*)p.out0;
    for (int k0 = 0; k0 < K; k0 += 32) {
      // Entries k0 .. k0 + 31: lane j holds entry k0 + j.
      // (-1: no row; a dropped row leaves a hole, so every entry is looked at.)
      const int r = k0 + lane < K ? inv[st * K + k0 + lane] : -1;
      const unsigned m = __ballot_sync(0xffffffffu, r >= 0);
      if (!m) continue;
      // The chunk loop is warp-uniform (every lane runs every step, predicated per chunk), so
      // that the shuffle below always has all 32 lanes: a lane-dependent loop bound left lanes
      // out of it on rows of fewer than 32 chunks (QUANT_FWD scale rows) and hung the warp.
      for (int cb = 0; cb < n16; cb += 128) {
        int4 v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int c = cb + lane + 32 * u;
          if (c < n16) v[u] = ld_cg(src + c);
        }
        unsigned mm = m;
        while (mm) {
          const int j = __ffs(mm) - 1;
          mm &= mm - 1;
          int4* d = (int4*)(out + (i64)__shfl_sync(0xffffffffu, r, j) * rb + off);
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int c = cb + lane + 32 * u;
            if (c < n16) st_cs(d + c, v[u]);
          }
        }
      }
    }
  }
}
#endif

extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_dispatch_kernel(const HtParams p) {
  __shared__ u64 sp[HT_MAX_RANKS][HT_PTR_SLOTS];
  const u32 tag = cur_epoch(p) + 1u;
  const u64 mine[HT_PTR_SLOTS] = {p.in0, p.in1, p.in2, 0};
  const u64 present = open_op(p, tag, mine, sp);
  const int K = p.topk, B = p.max_tokens, L = p.local_experts;
  const int count = hdr(p)->count;
#if EP_EM
  (void)K;
  (void)L;
  (void)B;
  dispatch_em(p, present, sp, count);
#else
  const int W = 1 + K;
  const int* recv = (const int*)(p.hmem + p.recv_off);
  const int lane = threadIdx.x & 31;
  const int gwarp = spread_warp();
  const int gwarps = grid_warps();
  const int tseg = num_segments(p.row_bytes);
  const int nseg = tseg + (p.scale_bytes > 0 ? num_segments(p.scale_bytes) : 0);
  for (i64 it = gwarp; it < (i64)count * nseg; it += gwarps) {
    const int slot = (int)(it / nseg), seg = (int)(it % nseg);
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
      if ((present >> s) & 1) warp_copy<EP_LD_CG>(sdst, src_scales(p, sp, s) + (i64)t * p.scale_bytes + soff, sbytes, lane);
      continue;
    }
    const i64 off = (i64)seg * HT_SEG_BYTES;
    char* dst = (char*)p.out0 + (i64)slot * p.row_bytes + off;
    const int bytes = segment_bytes(p.row_bytes, seg);
    if (src < 0) {
      warp_zero(dst, bytes, lane);
      continue;
    }
    const int s = src / B, t = src % B;
    if (!((present >> s) & 1)) continue;
    warp_copy<EP_LD_CG>(dst, src_tokens(p, sp, s) + (i64)t * p.row_bytes + off, bytes, lane);
#if !EP_BWD
    if (seg == 0) {
      const float* w = src_weights(p, sp, s) + (i64)t * K;
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
    }
#endif
  }
#endif
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
