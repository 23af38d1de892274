// Low-latency combine (docs/LL.md). Compiled by NVRTC after ll_common.cuh with:
//   EP_TOPK (1..32), EP_EM (1 expert-major, 0 rank-major), EP_IDX64 (topk_idx is int64),
//   EP_MASK (1: the group has enable_mask; 0: no mask code, a timeout traps),
//   EP_DTYPE (token type of the expert outputs and of the result: 0 bf16, 1 fp16, 2 fp32;
//   3 bf16 with NCCL_EP_COMB_QUANT_NVFP4: the messages carry E2M1 values and E4M3 block scales).
// Send: every expert output goes straight into the source rank's combine_recv[token][k].
// Receive: each token is reduced over its top-k in fp32 and rounded once to the token type.

#ifndef EP_DTYPE
#define EP_DTYPE 0
#endif

#if EP_DTYPE == 3
#define EP_NVFP4 1
#else
#define EP_NVFP4 0
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

#if EP_NVFP4
// ---------------------------------------------------------------------------------------------
// NVFP4 combine (docs/LL.md, "NVFP4 combine"). A message of a row of H bf16 values is
//   [0, H/2)          E2M1 codes, element 2i in the low nibble of byte i
//   [H/2, H/2 + H/16) E4M3 block scales, one per 16 elements
//   then the row's f32 global scale g (the caller's 2688 / amax, or 0).
// Per block: m = max |x|, sc = E4M3(g · (m · rcp(6))), inv = rcp(value(sc) · rcp(g)) (0 when
// sc is 0), each value E2M1(x · inv); the receiver adds value · ((value(sc) · (1/g)) · w)
// with one fused multiply-add per contribution (1/g: IEEE division, 1 where it is infinite).
// This is NCCL EP's arithmetic (DeepEP's rule), operation for operation, so that its callers
// (ep_bench --validate compares bit for bit) see the same results: the sender's rcp is
// `rcp.approx.ftz.f32`, as NCCL EP's; every other operation is an explicit round-to-nearest
// intrinsic (no contraction), so the CPU reference (ep_reference::ll::nvfp4_encode_row_with,
// nvfp4_decode_add) gives the same bits when handed the GPU's reciprocals.
//
// The conversions: sm_100 and later families with FP4 (arch-specific or family-specific
// targets) use the cvt instructions; every other target (sm_90: Hopper has none) converts in
// software, to the same bits (round to nearest even, saturating to the largest finite value,
// the sign kept). EP_FP4_SOFT forces the software path (compile checks).
#if !defined(EP_FP4_SOFT) &&                                                                        \
    ((defined(__CUDA_ARCH_FAMILY_SPECIFIC__) &&                                                     \
      (__CUDA_ARCH_FAMILY_SPECIFIC__ == 1000 || __CUDA_ARCH_FAMILY_SPECIFIC__ == 1100 ||            \
       __CUDA_ARCH_FAMILY_SPECIFIC__ == 1200)) ||                                                   \
     (defined(__CUDA_ARCH_SPECIFIC__) &&                                                            \
      (__CUDA_ARCH_SPECIFIC__ == 1000 || __CUDA_ARCH_SPECIFIC__ == 1010 || __CUDA_ARCH_SPECIFIC__ == 1030 || \
       __CUDA_ARCH_SPECIFIC__ == 1100 || __CUDA_ARCH_SPECIFIC__ == 1200 || __CUDA_ARCH_SPECIFIC__ == 1210)))
#define EP_FP4_HW 1
#else
#define EP_FP4_HW 0
#endif

// f32 to E2M1 (4 bits) in software: the rounding midpoints of the grid 0, .5, 1, 1.5, 2, 3, 4,
// 6, ties to the even code; above 6 (and NaN) the largest code.
__device__ __forceinline__ u32 f32_to_e2m1_sw(float x) {
  const float a = fabsf(x);
  const u32 s = a == a ? (__float_as_uint(x) >> 31) << 3 : 0u;  // NaN: 7, whatever its sign
  const u32 c = a <= 0.25f ? 0u
                : a < 0.75f ? 1u
                : a <= 1.25f ? 2u
                : a < 1.75f ? 3u
                : a <= 2.5f ? 4u
                : a < 3.5f ? 5u
                : a <= 5.f ? 6u
                : 7u;
  return c | s;
}

// f32 to E4M3 (bias 7, largest finite 448) in software: subnormals (below 2^-6) are multiples
// of 2^-9 rounded to nearest even; normals keep 3 mantissa bits, rounded to nearest even by
// bits (a carry into the exponent is the right result); 448 and above saturate; NaN is 0x7F.
__device__ __forceinline__ u32 f32_to_e4m3_sw(float x) {
  const u32 bits = __float_as_uint(x);
  const u32 s = (bits >> 24) & 0x80u;
  const u32 u = bits & 0x7fffffffu;
  u32 c;
  if (u > 0x7f800000u)
    c = 0x7fu;
  else if (u >= 0x43e00000u)
    c = 0x7eu;
  else if (u < 0x3c800000u)
    c = __float2uint_rn(__fmul_rn(__uint_as_float(u), 512.f));
  else
    c = ((u + 0x7ffffu + ((u >> 20) & 1u)) >> 20) - ((127u - 7u) << 3);
  return c | s;
}

__device__ __forceinline__ u32 f32_to_e4m3(float x) {
#if EP_FP4_HW
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.f), "f"(x));
  return r & 0xffu;
#else
  return f32_to_e4m3_sw(x);
#endif
}

// Eight values to eight E2M1 codes, value j in bits 4j..4j+3.
__device__ __forceinline__ u32 pack8_e2m1(const float* v) {
#if EP_FP4_HW
  u32 out;
  // cvt ... d, a, b puts a in the high nibble.
  asm("{ .reg .b8 b0, b1, b2, b3;\n"
      "cvt.rn.satfinite.e2m1x2.f32 b0, %2, %1;\n"
      "cvt.rn.satfinite.e2m1x2.f32 b1, %4, %3;\n"
      "cvt.rn.satfinite.e2m1x2.f32 b2, %6, %5;\n"
      "cvt.rn.satfinite.e2m1x2.f32 b3, %8, %7;\n"
      "mov.b32 %0, {b0, b1, b2, b3}; }"
      : "=r"(out)
      : "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3]), "f"(v[4]), "f"(v[5]), "f"(v[6]), "f"(v[7]));
  return out;
#else
  u32 out = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) out |= f32_to_e2m1_sw(v[j]) << (4 * j);
  return out;
#endif
}

// The value of an E2M1 code (low 4 bits; exact on every target).
__device__ __forceinline__ float e2m1_val(u32 c) {
  const u32 e = (c >> 1) & 3u, m = c & 1u;
  const float v = e ? __int2float_rn((int)((2u + m) << (e - 1u))) * 0.5f : (float)m * 0.5f;
  return __uint_as_float(__float_as_uint(v) | ((c & 8u) << 28));
}

// The value of an E4M3 code (exact; 0x7F, NaN, never comes from finite scales).
__device__ __forceinline__ float e4m3_val(u32 c) {
  const u32 e = (c >> 3) & 15u, m = c & 7u;
  const float v = e ? __uint_as_float(((e + 120u) << 23) | (m << 20)) : __int2float_rn((int)m) * (1.f / 512.f);
  return __uint_as_float(__float_as_uint(v) | ((c & 0x80u) << 24));
}

// The sender's reciprocal: NCCL EP's (within 1 ulp of 1/x; subnormals flushed).
__device__ __forceinline__ float nvfp4_rcp(float x) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}

// Encodes elements [e0, e0 + n) of bf16 row `src` (n a multiple of 256, so that every lane runs
// the same iterations: the two lanes of a 16-element block exchange their maxima) into the
// message `msg` of a row of H elements with global scale g.
__device__ __forceinline__ void nvfp4_encode(char* msg, const char* src, int e0, int n, int H, float g, int lane) {
  const float rcp6 = nvfp4_rcp(6.f);
  const float rg = g != 0.f ? nvfp4_rcp(g) : 0.f;
  for (int c = lane; c < n / 8; c += 32) {
    const int e = e0 + 8 * c;
    const int4 v = *((const int4*)src + e / 8);
    const unsigned short* hb = (const unsigned short*)&v;
    float x[8];
    float m = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      x[j] = bf16_to_f32(hb[j]);
      m = fmaxf(m, fabsf(x[j]));
    }
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
    const u32 sc = f32_to_e4m3(__fmul_rn(g, __fmul_rn(m, rcp6)));
    const float scv = e4m3_val(sc);
    const float inv = scv != 0.f ? nvfp4_rcp(__fmul_rn(scv, rg)) : 0.f;
    float y[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) y[j] = __fmul_rn(x[j], inv);
    *(u32*)(msg + e / 2) = pack8_e2m1(y);
    if (!(c & 1)) msg[H / 2 + e / 16] = (char)sc;
  }
  if (e0 == 0 && lane == 0) *(float*)(msg + H / 2 + H / 16) = g;
}
#endif

// Sends the expert outputs of every message this rank received in the matching dispatch, except
// to sources masked since (not in `active`).
__device__ void combine_send(const LlParams& p, u32 epoch, u64 active) {
  const int N = p.nranks, K = EP_TOPK;
  const int* meta = (const int*)p.meta;
  const int lane = threadIdx.x & 31;
  const int gwarp = spread_warp();
  const int gwarps = grid_warps();
  int total = 0, before = 0;  // messages received, and those from ranks below this one
  for (int s = 0; s < N; ++s) {
    total += meta[s];
    if (s < p.rank) before += meta[s];
  }
  const int mine = meta[p.rank];
#if EP_NVFP4
  const bool direct = false;
#else
  // To itself (p.self_direct): each row's address instead of the row, one thread per (message,
  // top-k entry), so that the loop below, over segments of rows, skips these messages entirely
  // (its per-item metadata reads cost more than the address stores themselves).
  const bool direct = p.self_direct && ((active >> p.rank) & 1ull);
  if (direct) {
    const int per = EP_EM ? K : 1;
    char* recv = send_base(p, p.rank, epoch) + p.off_data;
    for (int i = gwarp * 32 + lane; i < mine * per; i += gwarps * 32) {
      const int slot = i / per;
      const int* mrow = meta + meta_entry(p, p.rank, slot);
      const int token = mrow[0];
#if EP_EM
      const int k = i % per, row = mrow[1 + k];
      if (row < 0) continue;
      *(u64*)(recv + ((i64)token * K + k) * p.cmsg) = (u64)((const char*)p.x + (i64)row * p.row_bytes);
#else
      const i64 srow = (i64)p.rank * p.max_tokens + slot;
      *(u64*)(recv + ((i64)token * K + mrow[1]) * p.cmsg) = (u64)((const char*)p.x + srow * p.row_bytes);
#endif
    }
    total -= mine;
  }
#endif
  // Work items: (received message, top-k entry (EM) , segment); with `direct`, this rank's own
  // messages are left out of the numbering.
  const int nseg = num_segments(p.row_bytes);
#if EP_EM
  const int per_msg = K * nseg;
#else
  const int per_msg = nseg;
#endif
  for (int it = gwarp; it < total * per_msg; it += gwarps) {
    const int seg = it % nseg;
    int s = 0, slot = it / per_msg;
    if (direct && slot >= before) slot += mine;
    while (slot >= meta[s]) slot -= meta[s++];
    if (!((active >> s) & 1ull)) continue;
    const int* mrow = meta + meta_entry(p, s, slot);
    const int token = mrow[0];
    char* recv = send_base(p, s, epoch) + p.off_data;
    const i64 off = (i64)seg * EP_SEG_BYTES;
    const int bytes = segment_bytes(p.row_bytes, seg);
#if EP_EM
    // One expert-output row per local top-k entry; k is the position in the source's row.
    const int k = (it / nseg) % K;
    const int row = mrow[1 + k];
    if (row < 0) continue;
#if EP_NVFP4
    nvfp4_encode(recv + ((i64)token * K + k) * p.cmsg, (const char*)p.x + (i64)row * p.row_bytes, (int)(off / 2), bytes / 2,
                 p.row_bytes / 2, ((const float*)p.comb_scales)[row], lane);
#else
    // x is read once: streamed, so that the rows written here stay in L2 for the receive phase.
    warp_copy<EP_LD_CS>(recv + ((i64)token * K + k) * p.cmsg + off, (const char*)p.x + (i64)row * p.row_bytes + off, bytes,
                        lane);
#endif
#else
    // One pre-reduced row per (source, slot), stored at the first local top-k position (a
    // remote source's staging region has one row per token).
    const int j = mrow[1];
    const i64 cell = is_remote(p, s) ? (i64)token : (i64)token * K + j;
#if EP_NVFP4
    const i64 srow = (i64)s * p.max_tokens + slot;
    nvfp4_encode(recv + cell * p.cmsg, (const char*)p.x + srow * p.row_bytes, (int)(off / 2), bytes / 2,
                 p.row_bytes / 2, ((const float*)p.comb_scales)[srow], lane);
#else
    const char* src = (const char*)p.x + ((i64)s * p.max_tokens + slot) * p.row_bytes + off;
    warp_copy<EP_LD_CS>(recv + cell * p.cmsg + off, src, bytes, lane);
#endif
#endif
  }
  prof_mark(p, 2);
  sends_done(p);
  prof_mark(p, 3);
  if (blockIdx.x == gridDim.x - 1) {
    for (int s = threadIdx.x; s < N; s += blockDim.x) {
      if (!((active >> s) & 1ull)) continue;
      u64* f = (u64*)(send_base(p, s, epoch) + p.off_cflag) + p.rank;
      release_to_peer(p, f, ((u64)(epoch + 1u) << 32) | 1u);
    }
  }
}

// Reduces the received rows of every own token (one warp per token). Contributions of absent
// expert ranks (masked, or silent past the timeout) are left out, with no renormalisation.
// one_pass (one rank, p.self_direct): nothing was sent and nothing is waited for; the rows come
// from the handle's own[] table, which the dispatch wrote.
__device__ void combine_recv(const LlParams& p, u32 epoch, bool one_pass) {
  const int N = p.nranks, K = EP_TOPK;
  const u32 tag = epoch + 1u;
  u64 present;
  if (one_pass) {
    present = rank_active(p, p.rank) ? ~0ull : 0ull;  // as wait_source decides for a masked rank
  } else {
#if EP_MASK
    __shared__ u64 present_s;
    if (threadIdx.x == 0) present_s = 0;
    __syncthreads();
    for (int s = threadIdx.x; s < N; s += blockDim.x)
      if (wait_source(p, (const u64*)(recv_base(p, s, epoch) + p.off_cflag) + s, s, tag, EP_WAIT_COMBINE) >= 0)
        atomicOr((unsigned long long*)&present_s, 1ull << s);
    __syncthreads();
    present = present_s;
#else
    // Masking compiled out: every source is present (a timeout traps inside wait_source).
    for (int s = threadIdx.x; s < N; s += blockDim.x)
      wait_source(p, (const u64*)(recv_base(p, s, epoch) + p.off_cflag) + s, s, tag, EP_WAIT_COMBINE);
    __syncthreads();
    present = ~0ull;
#endif
  }
  prof_mark(p, 4);
  const int lane = threadIdx.x & 31;
  const int gwarp = spread_warp();
  const int gwarps = grid_warps();
  const char* recv = bank_base(p, p.rank, epoch) + p.off_data;
  // Work items: (own token, segment of its row). Segments of 2 KiB hold four 16-byte chunks per
  // lane, loaded one after the other; when that leaves warps idle (few tokens), the segments
  // shrink (down to 512 bytes, one chunk per lane) so that more warps each wait for one round of
  // K loads.
  int seg_bytes = EP_SEG_BYTES;
  while (seg_bytes > EP_SEG_BYTES / 4 && p.num_tokens * num_segments(p.row_bytes, seg_bytes) < gwarps) seg_bytes >>= 1;
  const int nseg = num_segments(p.row_bytes, seg_bytes);
  // Last tokens first: the send phases wrote the rows in token order, so the latest ones are
  // the likeliest to be still in L2.
  const int items = p.num_tokens * nseg;
  for (int it = gwarp; it < items; it += gwarps) {
    const int t = (items - 1 - it) / nseg, seg = (items - 1 - it) % nseg;
    // Lane k decides whether entry k contributes and with which weight.
    int e = lane < K ? topk_at(p, t, lane) : -1;
#if !EP_NVFP4
    // One pass: own[t] (EM: lane k's row; RM: the token's slot, the same for every lane) is
    // loaded beside the routing, not after it, to keep one global-load latency off each item.
    int own_v = -1;
    if (one_pass) {
      const int* own = (const int*)p.meta + meta_own(p) + (i64)t * K;
      own_v = EP_EM ? (lane < K ? own[lane] : -1) : own[0];
    }
#endif
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
#if !EP_NVFP4 && EP_EM
    // The row of entry k's first occurrence (src_k is a lane for every lane: its own when unused).
    own_v = __shfl_sync(0xffffffffu, own_v, src_k);
#endif
    // Entry k's row: combine_recv[t][src_k] here, or in the receive region of a remote expert
    // rank: the same [token][k] grid (EM; a duplicate's first occurrence has the same rank) or
    // one row per token (RM).
    const char* row = recv + ((i64)t * K + src_k) * p.cmsg;
    if (er >= 0 && is_remote(p, er)) {
      const char* rb = recv_base(p, er, epoch) + p.off_data;
      row = EP_EM ? rb + ((i64)t * K + src_k) * p.cmsg : rb + (i64)t * p.cmsg;
    }
#if !EP_NVFP4
    // A row this rank sent itself unstaged: the cell holds the expert output's address, or (one
    // pass) the handle's own[t] holds its row of x (a masked-off self has `here` false).
    if (use && p.self_direct && er == p.rank) {
      if (one_pass) {
        const i64 xr = EP_EM ? (i64)own_v : (i64)p.rank * p.max_tokens + own_v;
        row = (const char*)p.x + xr * p.row_bytes;
      } else {
        row = (const char*)ld_cg_u64((const u64*)row);
      }
    }
#endif
    float wk[EP_TOPK];
    const char* rk[EP_TOPK];
#pragma unroll
    for (int k = 0; k < EP_TOPK; ++k) {
      wk[k] = __shfl_sync(0xffffffffu, w, k);
      rk[k] = (const char*)__shfl_sync(0xffffffffu, (unsigned long long)row, k);
    }
    const i64 off = (i64)seg * seg_bytes;
    const int n16 = segment_bytes(p.row_bytes, seg, seg_bytes) >> 4;
    int4* out = (int4*)((char*)p.out + (i64)t * p.row_bytes + off);
#if EP_NVFP4
    // 1/g of each contribution's message (1 where that is infinite: g = 0), lane k reading k's.
    const int H = p.row_bytes / 2;
    float rg = 1.f;
    if (use) {
      const char* m = row;
      rg = __frcp_rn(__int_as_float(ld_cg_int((const int*)(m + H / 2 + H / 16))));
      if ((__float_as_uint(rg) & 0x7fffffffu) == 0x7f800000u) rg = 1.f;
    }
    float gk[EP_TOPK];
#pragma unroll
    for (int k = 0; k < EP_TOPK; ++k) gk[k] = __shfl_sync(0xffffffffu, rg, k);
    for (int c = lane; c < n16; c += 32) {
      const int e = (int)(off / 2) + 8 * c;
      float acc[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = 0.f;
#pragma unroll
      for (int k = 0; k < EP_TOPK; ++k) {
        if (!(use_mask & (1u << k))) continue;
        const char* m = rk[k];
        const u32 q = (u32)ld_cg_int((const int*)(m + e / 2));
        const int si = H / 2 + e / 16;
        const u32 sc = ((u32)ld_cg_int((const int*)(m + (si & ~3))) >> (8 * (si & 3))) & 0xffu;
        const float f = __fmul_rn(__fmul_rn(e4m3_val(sc), gk[k]), wk[k]);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = __fmaf_rn(e2m1_val(q >> (4 * i)), f, acc[i]);
      }
      int4 o;
      unsigned short* oh = (unsigned short*)&o;
#pragma unroll
      for (int i = 0; i < 8; ++i) oh[i] = f32_to_bf16(acc[i]);
      out[c] = o;
    }
#else
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
#endif
  }
}

extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_combine(const LlParams p) {
  prof_mark(p, 0);
  const u32 epoch = ((volatile EpState*)p.state)->epoch;
  // One rank with both phases here (p.self_direct): every row is its own, so the receive phase
  // finds them through the handle's own[] table and no send phase, grid barrier or flag is
  // needed (p.self_direct is 0 for NVFP4, which encodes while sending).
  const bool one_pass = p.self_direct && p.nranks == 1;
  if ((p.phases & PHASE_SEND) && !one_pass) {
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
  if (p.phases & PHASE_RECV) combine_recv(p, epoch, one_pass);
  prof_mark(p, 5);
  finish_op(p, (p.phases & PHASE_RECV) != 0);
}
