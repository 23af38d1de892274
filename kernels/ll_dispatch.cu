// Low-latency dispatch (docs/LL.md). Compiled by NVRTC after ll_common.cuh with:
//   EP_TOPK (1..32), EP_EM (1 expert-major, 0 rank-major), EP_IDX64 (topk_idx is int64),
//   EP_MASK (1: the group has enable_mask; 0: no mask code, a timeout traps).
// One kernel runs the send phase, the receive phase, or both (p.phases).
//
// Dynamic shared memory (bytes, LlKernel::smem_bytes in src/runtime/kernels.rs):
//   send: hist_e[E] + hist_r[align4(N)] + TokenRoute per own token + idx[T*K];
//   receive: counts[64] + base[L*N].

struct TokenRoute {
  int pos[EP_TOPK];   // selections of the same expert before this one (this source)
  int slot[EP_TOPK];  // slot at the destination rank, valid where `first` has the bit
  u32 first;          // bit k: top-k k is the first of its destination rank, which is active
};

// Header record of one top-k entry (12 bytes, after the int32 token index).
struct HdrRec {
  int expert;
  float weight;
  int pos;
};

__device__ __forceinline__ int tokens_per_block(const LlParams& p) {
  return (p.num_tokens + gridDim.x - 1) / gridDim.x;
}

// Counts, for the tokens before this block's range, the distinct (token, expert) pairs per expert
// and the tokens per destination rank; then walks the block's own tokens in order to assign pos
// and slots. The routing rows up to t1 are staged in shared memory first (`idx`, as int). Slots
// are numbered over all destinations; `first` leaves out masked ones (not in `active`), so that
// nothing is sent to them.
__device__ void route_tokens(const LlParams& p, int* hist_e, int* hist_r, int* idx, TokenRoute* routes, int t0,
                             int t1, u64 active) {
  const int L = p.local_experts;
  for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x) hist_e[i] = 0;
  for (int i = threadIdx.x; i < p.nranks; i += blockDim.x) hist_r[i] = 0;
  for (int i = threadIdx.x; i < t1 * EP_TOPK; i += blockDim.x) idx[i] = topk_at(p, i / EP_TOPK, i % EP_TOPK);
  __syncthreads();
  // Tokens before this block: distinct (token, expert) pairs per expert, tokens per rank.
  for (int t = threadIdx.x; t < t0; t += blockDim.x) {
    const int* row = idx + t * EP_TOPK;
    u64 seen = 0;
    for (int k = 0; k < EP_TOPK; ++k) {
      int e = row[k];
      if (e < 0) continue;
      bool dup = false;
      for (int j = 0; j < k; ++j) dup |= row[j] == e;
      if (!dup) atomicAdd(&hist_e[e], 1);
      seen |= 1ull << (e / L);
    }
    while (seen) {
      int d = __ffsll((i64)seen) - 1;
      seen &= seen - 1;
      atomicAdd(&hist_r[d], 1);
    }
  }
  __syncthreads();
  // One warp walks the own tokens in order; lane k handles top-k entry k.
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const u32 lt = (1u << lane) - 1u;
    for (int t = t0; t < t1; ++t) {
      int e = lane < EP_TOPK ? idx[t * EP_TOPK + lane] : -1;
      int key_e = e >= 0 ? e : -100 - lane;  // unmatched lanes never group together
      u32 same_e = __match_any_sync(0xffffffffu, key_e);
      // Only the first occurrence of an expert in the row counts (docs/LL.md, duplicates).
      bool first_e = (same_e & lt) == 0;
      int pos = 0;
      if (e >= 0 && first_e) pos = hist_e[e];
      __syncwarp();
      if (e >= 0 && first_e) hist_e[e] += 1;
      int d = e >= 0 ? e / L : -100 - lane;
      u32 same_d = __match_any_sync(0xffffffffu, d);
      int leader = __ffs(same_d) - 1;
      int slot = 0;
      if (e >= 0 && leader == lane) slot = atomicAdd(&hist_r[d], 1);
      slot = __shfl_sync(0xffffffffu, slot, leader);
      u32 first = __ballot_sync(0xffffffffu, e >= 0 && leader == lane && ((active >> d) & 1ull));
      TokenRoute& r = routes[t - t0];
      if (lane < EP_TOPK) {
        r.pos[lane] = pos;
        r.slot[lane] = slot;
      }
      if (lane == 0) r.first = first;
      __syncwarp();
    }
  }
  __syncthreads();
}

// Writes segment `seg` of the message for token t to rank d's dispatch receive slot (the header
// goes with segment 0).
__device__ void send_segment(const LlParams& p, const TokenRoute& r, int t, int k, int seg, u32 epoch, int lane) {
  int d = topk_at(p, t, k) / p.local_experts;
  char* msg = bank_base(p, d, epoch) + p.off_data + ((u64)p.rank * p.max_tokens + r.slot[k]) * (u64)p.dmsg;
  if (seg == 0) {
    if (lane == 0) *(int*)msg = t;
    if (lane < EP_TOPK) {
      HdrRec* dst = (HdrRec*)(msg + 4) + lane;
      dst->expert = topk_at(p, t, lane);
      dst->weight = p.weights ? ((const float*)p.weights)[(i64)t * EP_TOPK + lane] : 0.f;
      dst->pos = r.pos[lane];
    }
  }
  const i64 off = (i64)seg * EP_SEG_BYTES;
  char* dst = msg + p.hdr + off;
#if !EP_EM
  // Zero-copy (docs/ZERO_COPY.md): the payload goes straight into rank d's outputs->tokens
  // window, row [rank][slot]; only the header above went to its receive region. The flags are
  // released after sends_done's system fence, which orders these stores too.
  if (p.direct_out) dst = (char*)p.out_peers[d] + ((i64)p.rank * p.max_tokens + r.slot[k]) * p.row_bytes + off;
#endif
  warp_copy(dst, (const char*)p.x + (i64)t * p.row_bytes + off, segment_bytes(p.row_bytes, seg), lane);
}

// Masked destinations (not in `active`) get neither messages nor counts nor a flag; slots are
// still numbered over all destinations, so nothing else changes.
__device__ void dispatch_send(const LlParams& p, int* hist_e, int* hist_r, int* idx, TokenRoute* routes, u32 epoch,
                              u64 active) {
  const int tpb = tokens_per_block(p);
  const int t0 = min(p.num_tokens, (int)blockIdx.x * tpb), t1 = min(p.num_tokens, t0 + tpb);
  route_tokens(p, hist_e, hist_r, idx, routes, t0, t1, active);
  prof_mark(p, 1);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nwarps = blockDim.x >> 5;
  // Work items: (own token, top-k entry that is the first of its destination rank, segment).
  const int nseg = num_segments(p.row_bytes);
  const int items = (t1 - t0) * EP_TOPK * nseg;
  for (int i = warp; i < items; i += nwarps) {
    const int seg = i % nseg, tk = i / nseg, k = tk % EP_TOPK;
    const TokenRoute& r = routes[tk / EP_TOPK];
    if (r.first & (1u << k)) send_segment(p, r, t0 + tk / EP_TOPK, k, seg, epoch, lane);
  }
  prof_mark(p, 2);
  sends_done(p);
  prof_mark(p, 3);
  if (blockIdx.x == gridDim.x - 1) {
    // hist_e / hist_r now cover every token: publish counts, then the flags (release).
    const int L = p.local_experts;
    for (int i = threadIdx.x; i < p.num_experts; i += blockDim.x) {
      int d = i / L, l = i % L;
      if (!((active >> d) & 1ull)) continue;
      int* ec = (int*)(bank_base(p, d, epoch) + p.off_ecount) + (u64)p.rank * L + l;
      *ec = hist_e[i];
    }
    __threadfence_system();
    __syncthreads();
    for (int d = threadIdx.x; d < p.nranks; d += blockDim.x) {
      if (!((active >> d) & 1ull)) continue;
      u64* f = (u64*)(bank_base(p, d, epoch) + p.off_dflag) + p.rank;
      st_release_sys(f, ((u64)(epoch + 1u) << 32) | (u32)hist_r[d]);
    }
  }
}

__device__ void dispatch_recv(const LlParams& p, int* counts, int* base, u32 epoch) {
  const int N = p.nranks, L = p.local_experts, K = EP_TOPK;
  const u32 tag = epoch + 1u;
  char* bank = bank_base(p, p.rank, epoch);
  // An absent source (masked, or silent past the timeout) counts as 0 tokens.
  for (int s = threadIdx.x; s < N; s += blockDim.x)
    counts[s] = max(0, wait_source(p, (const u64*)(bank + p.off_dflag) + s, s, tag, EP_WAIT_DISPATCH));
  __syncthreads();
  prof_mark(p, 4);
#if EP_EM
  // base[l*N + s]: rows of expert l taken by sources before s.
  const int* ecount = (const int*)(bank + p.off_ecount);
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int acc = 0;
    for (int s = 0; s < N; ++s) {
      base[l * N + s] = acc;
      acc += counts[s] > 0 ? ld_cg_int(ecount + s * L + l) : 0;
    }
    if (blockIdx.x == 0) {
      if (p.out_counters) ((int*)p.out_counters)[l] = acc;
    }
  }
  __syncthreads();
#endif
  int* meta = (int*)p.meta;
  if (blockIdx.x == 0) {
    for (int s = threadIdx.x; s < N; s += blockDim.x) {
      meta[s] = counts[s];
#if EP_EM
      int m = 0;
      if (counts[s] > 0)
        for (int l = 0; l < L; ++l) m += ld_cg_int(ecount + s * L + l);
      meta[N + s] = m;
#else
      meta[N + s] = counts[s];
      if (p.out_counters) ((int*)p.out_counters)[s] = counts[s];
#endif
    }
  }
  const int lane = threadIdx.x & 31;
  const int gwarp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int gwarps = (gridDim.x * blockDim.x) >> 5;
  const int lo = p.rank * L;
#if !EP_EM
  // Rank-major: every slot row of topk_idx is rewritten, received or not (no stale ids).
  for (int i = gwarp; i < N * p.max_tokens; i += gwarps) {
    int s = i / p.max_tokens, slot = i % p.max_tokens;
    if (slot >= counts[s] && lane < K) ((int*)p.out_topk_idx)[(i64)i * K + lane] = -1;
  }
#endif
  int total = 0;
  for (int s = 0; s < N; ++s) total += counts[s];
  // Work items: (received message, segment of its payload); segment 0 also does the metadata.
  const int nseg = num_segments(p.row_bytes);
  for (int it = gwarp; it < total * nseg; it += gwarps) {
    const int seg = it % nseg;
    int s = 0, slot = it / nseg;
    while (slot >= counts[s]) slot -= counts[s++];
    const char* msg = bank + p.off_data + ((u64)s * p.max_tokens + slot) * (u64)p.dmsg;
    const HdrRec* rec = (const HdrRec*)(msg + 4);
    int e = lane < K ? ld_cg_int(&rec[lane].expert) : -1;
    bool in_range = e >= lo && e < lo + L;
    u32 same_e = __match_any_sync(0xffffffffu, in_range ? e : -100 - lane);
    int* mrow = meta + 2 * N + ((i64)s * p.max_tokens + slot) * (K + 1);
    const i64 off = (i64)seg * EP_SEG_BYTES;
    const int n16 = segment_bytes(p.row_bytes, seg) >> 4;
    const int4* src = (const int4*)(msg + p.hdr + off);
#if EP_EM
    // A duplicate expert in the row is delivered once, at its first occurrence.
    bool local = in_range && (__ffs(same_e) - 1) == lane;
    int row = -1;
    if (local) row = (e - lo) * (N * p.max_tokens) + base[(e - lo) * N + s] + ld_cg_int(&rec[lane].pos);
    if (seg == 0) {
      if (lane == 0) mrow[0] = ld_cg_int((const int*)msg);
      if (lane < K) mrow[1 + lane] = row;
    }
    u32 rows_mask = __ballot_sync(0xffffffffu, local);
    int rows[EP_TOPK];
#pragma unroll
    for (int k = 0; k < EP_TOPK; ++k) rows[k] = __shfl_sync(0xffffffffu, row, k);
    // Read each 16-byte chunk once (four in flight per lane) and store it into every local row.
    for (int c0 = lane; c0 < n16; c0 += 128) {
      int4 v[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (c0 + 32 * u < n16) v[u] = ld_cg(src + c0 + 32 * u);
#pragma unroll
      for (int k = 0; k < EP_TOPK; ++k) {
        if (!(rows_mask & (1u << k))) continue;
        int4* dst = (int4*)((char*)p.out + (i64)rows[k] * p.row_bytes + off);
#pragma unroll
        for (int u = 0; u < 4; ++u)
          if (c0 + 32 * u < n16) dst[c0 + 32 * u] = v[u];
      }
    }
#else
    (void)same_e;
    bool local = in_range;
    u32 local_mask = __ballot_sync(0xffffffffu, local);
    i64 orow = (i64)s * p.max_tokens + slot;
    if (seg == 0) {
      if (lane == 0) {
        mrow[0] = ld_cg_int((const int*)msg);
        mrow[1] = local_mask ? __ffs(local_mask) - 1 : 0;
      }
      if (lane < K) {
        ((int*)p.out_topk_idx)[orow * K + lane] = local ? (p.recv_global ? e : e - lo) : -1;
        if (p.out_weights) ((float*)p.out_weights)[orow * K + lane] = __int_as_float(ld_cg_int((const int*)&rec[lane].weight));
      }
    }
    // Zero-copy: the sender already stored the payload in our outputs->tokens.
    if (!p.direct_out) warp_copy<true>((char*)p.out + orow * p.row_bytes + off, src, n16 << 4, lane);
#endif
  }
}

extern "C" __global__ void __launch_bounds__(LL_THREADS) ll_dispatch(const LlParams p) {
  extern __shared__ int smem[];
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
    int* hist_e = smem;
    int* hist_r = hist_e + p.num_experts;
    TokenRoute* routes = (TokenRoute*)(hist_r + ((p.nranks + 3) & ~3));
    int* idx = (int*)(routes + tokens_per_block(p));
    dispatch_send(p, hist_e, hist_r, idx, routes, epoch, active);
    __syncthreads();
  }
  if (p.phases & PHASE_RECV) {
    int* counts = smem;
    int* base = counts + LL_MAX_RANKS;
    dispatch_recv(p, counts, base, epoch);
  }
  prof_mark(p, 5);
  finish_op(p, (p.phases & PHASE_RECV) != 0);
}
