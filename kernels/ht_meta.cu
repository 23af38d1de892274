// High-throughput metadata pass (docs/HT.md, "Metadata"), run by ncclEpCreateHandle /
// ncclEpUpdateHandle on the caller's stream, plus the closing barrier every HT operation ends
// with. Compiled by NVRTC after ht_common.cuh with EP_IDX64 (topk_idx is int64) and EP_EM
// (expert-major handle). Kernels, in launch order:
//   ht_convert  validate this rank's routing into own[B][K]; reset the send/bwd tables
//   ht_pull     open; pull every rank's own[] into all[N][B][K]
//   ht_close    closing barrier (ht_common.cuh)
//   ht_count    counts per (source, piece, counter)
//   ht_offsets  totals, zone offsets, slot bases, overflow, layout_info outputs (one block)
//   ht_assign   receive and send slots, in (source rank, source token) order
//
// Routing encoding in own[] / all[]: e >= 0 the first occurrence of expert e in the row; -1
// none (also invalid ids and rows >= T); -2 - j a repeat of the expert at position j.

__device__ __forceinline__ char* my_buf(const HtParams& p) { return peer_buf(p, p.rank); }

__device__ __forceinline__ int gthread() { return blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int gthreads() { return gridDim.x * blockDim.x; }

extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_reset(const HtParams p) {
  int* h = (int*)p.hmem;
  for (int i = threadIdx.x; i < (int)(sizeof(HtHdr) / 4); i += blockDim.x) h[i] = 0;
}

extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_convert(const HtParams p) {
  const int K = p.topk, B = p.max_tokens;
  int* own = (int*)(my_buf(p) + p.off_own);
  for (int t = gthread(); t < B; t += gthreads()) {
    int* row = own + (i64)t * K;
    for (int k = 0; k < K; ++k) {
      i64 v = -1;
      if (t < p.rows) {
#if EP_IDX64
        v = ((const i64*)p.in0)[(i64)t * K + k];
#else
        v = ((const int*)p.in0)[(i64)t * K + k];
#endif
      }
      int out = -1;
      // Any negative id is "no expert" (NCCL EP's too); an id >= E is an error.
      if (v >= p.num_experts) {
        atomicMax(&hdr(p)->bad, B * K - (t * K + k));
      } else if (v >= 0) {
        out = (int)v;
        for (int j = 0; j < k; ++j)
          if (row[j] == out) {
            out = -2 - j;
            break;
          }
      }
      row[k] = out;
    }
  }
  int2* send = (int2*)(p.hmem + p.send_off);
  int* bwd = (int*)(p.hmem + p.bwd_off);
  for (int i = gthread(); i < B * K; i += gthreads()) {
    send[i] = make_int2(-1, -1);
    bwd[i] = -1;
  }
}

// The pointers ht_pull publishes (also ht_publish's, ht_common.cuh): this rank's first bad
// routing entry as (code, value), zeros when there is none.
__device__ void routing_ptrs(const HtParams& p, u64* mine) {
  for (int i = 0; i < HT_PTR_SLOTS; ++i) mine[i] = 0;
  const int code = hdr(p)->bad;
  if (code > 0) {
    const i64 idx = (i64)p.max_tokens * p.topk - code;
#if EP_IDX64
    const i64 v = ((const i64*)p.in0)[idx];
#else
    const i64 v = ((const int*)p.in0)[idx];
#endif
    mine[0] = (u64)code;
    mine[1] = (u64)v;
  }
}

// Publishes this rank's first bad routing entry (code, value) with its open flag; block 0 records
// the lowest rank that has one in the header (so that every rank's update fails alike).
extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_pull(const HtParams p) {
  __shared__ u64 sp[HT_MAX_RANKS][HT_PTR_SLOTS];
  const u32 tag = cur_epoch(p) + 1u;
  u64 mine[HT_PTR_SLOTS];
  routing_ptrs(p, mine);
  const u64 present = open_op(p, tag, mine, sp);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    for (int s = 0; s < p.nranks; ++s)
      if (((present >> s) & 1) && sp[s][0] != 0) {
        hdr(p)->bad_rank = s + 1;
        hdr(p)->bad_code = (int)sp[s][0];
        hdr(p)->bad_value = (i64)sp[s][1];
        break;
      }
  }
  const i64 bk = (i64)p.max_tokens * p.topk;
  int* all = (int*)(my_buf(p) + p.off_all);
  for (i64 i = gthread(); i < p.nranks * bk; i += gthreads()) {
    const int s = (int)(i / bk);
    const i64 j = i - s * bk;
    all[i] = (present >> s) & 1 ? ld_cg_int((const int*)(peer_buf(p, s) + p.off_own) + j) : -1;
  }
}

// One block per (source, piece): counts of every counter (E experts, then N ranks) in
// dynamic shared memory.
extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_count(const HtParams p) {
  extern __shared__ int hist[];
  const int E = p.num_experts, N = p.nranks, L = p.local_experts, K = p.topk, B = p.max_tokens;
  const int C = E + N;
  const int s = blockIdx.x / HT_PIECES, pc = blockIdx.x % HT_PIECES;
  for (int c = threadIdx.x; c < C; c += blockDim.x) hist[c] = 0;
  __syncthreads();
  const int t0 = min(B, pc * p.piece_len), t1 = min(B, t0 + p.piece_len);
  const int* rows = (const int*)(my_buf(p) + p.off_all) + (i64)s * B * K;
  for (int t = t0 + threadIdx.x; t < t1; t += blockDim.x) {
    const int* row = rows + (i64)t * K;
    u64 ranks = 0;
    for (int k = 0; k < K; ++k) {
      const int e = row[k];
      if (e >= 0) {
        atomicAdd(&hist[e], 1);
        ranks |= 1ull << (e / L);
      }
    }
    while (ranks) {
      const int d = __ffsll((i64)ranks) - 1;
      ranks &= ranks - 1;
      atomicAdd(&hist[E + d], 1);
    }
  }
  __syncthreads();
  int* cnt = (int*)(my_buf(p) + p.off_cnt) + ((i64)s * HT_PIECES + pc) * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) cnt[c] = hist[c];
}

__device__ __forceinline__ int pad_count(int c, int a) { return c == 0 ? 0 : (c + a - 1) / a * a; }

__device__ __forceinline__ void store_int(u64 base, int i, i64 v, int wide) {
  if (wide)
    ((i64*)base)[i] = v;
  else
    ((int*)base)[i] = (int)v;
}

// One block: totals per (source, counter), expert totals, zone offsets, slot bases, overflow,
// the header and the layout_info outputs, and EM padding rows of the receive table.
// Dynamic shared memory: etot[E] + ptot[E] (padded) + dtot[N].
extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_offsets(const HtParams p) {
  extern __shared__ int sm[];
  const int E = p.num_experts, N = p.nranks, L = p.local_experts, r = p.rank;
  const int C = E + N, S = p.recv_rows, A = p.align;
  char* buf = my_buf(p);
  const int* cnt = (const int*)(buf + p.off_cnt);
  int* tot = (int*)(buf + p.off_tot);
  int* zoff = (int*)(buf + p.off_zoff);
  int* rbase = (int*)(buf + p.off_rbase);
  int* sbase = (int*)(buf + p.off_sbase);
  int* etot = sm;          // [E] tokens per expert (all sources)
  int* dtot = sm + E;      // [N] receive total per rank (before drops)
  for (int i = threadIdx.x; i < N * C; i += blockDim.x) {
    const int s = i / C, c = i % C;
    const int* q = cnt + (i64)s * HT_PIECES * C + c;
    int acc = 0;
    for (int pc = 0; pc < HT_PIECES; ++pc) acc += q[pc * C];
    tot[i] = acc;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int acc = 0;
    for (int s = 0; s < N; ++s) acc += tot[s * C + e];
    etot[e] = acc;
  }
  __syncthreads();
  // Zone offsets per rank d: a warp scans its L padded expert totals.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int d = warp; d < N; d += nwarps) {
    int run = 0;
    for (int l0 = 0; l0 < L; l0 += 32) {
      const int l = l0 + lane;
      const int v = l < L ? pad_count(etot[d * L + l], A) : 0;
      int x = v;
      for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
      }
      if (l < L) zoff[d * L + l] = run + x - v;
      run += __shfl_sync(0xffffffffu, x, 31);
    }
#if EP_EM
    if (lane == 0) dtot[d] = run;
#else
    if (lane == 0) {
      int acc = 0;
      for (int s = 0; s < N; ++s) acc += tot[s * C + E + d];
      dtot[d] = acc;
    }
#endif
  }
  __syncthreads();
  // Receive bases of this rank per (source, counter); send bases per counter.
#if EP_EM
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    int acc = zoff[r * L + l];
    for (int s = 0; s < N; ++s) {
      rbase[s * L + l] = acc;
      acc += tot[s * C + r * L + l];
    }
  }
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int acc = zoff[e];
    for (int s = 0; s < r; ++s) acc += tot[s * C + e];
    sbase[e] = acc;
  }
#else
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int s = 0; s < N; ++s) {
      rbase[s] = acc;
      acc += tot[s * C + E + r];
    }
  }
  for (int d = threadIdx.x; d < N; d += blockDim.x) {
    int acc = 0;
    for (int s = 0; s < r; ++s) acc += tot[s * C + E + d];
    sbase[E + d] = acc;
  }
#endif
  HtHdr* h = hdr(p);
  if (threadIdx.x == 0) {
    const int total = dtot[r];
    h->total = total;
    h->count = min(total, S);
    h->rows = p.rows;
    for (int d = 0; d < N; ++d)
      if (dtot[d] > S) {
        if (!p.drop) {
          h->overflow_rank = d + 1;
          h->overflow_total = dtot[d];
          if (p.capturing && p.err) atomicExch((int*)p.err, 1);
        }
        break;
      }
    if (p.out3) store_int(p.out3, 0, total, p.tot64);
  }
  // layout_info outputs of this rank's local experts.
  for (int l = threadIdx.x; l < L; l += blockDim.x) {
    const int c = etot[r * L + l];
#if EP_EM
    const int off = zoff[r * L + l];
    const int room = max(0, S - off);
    if (p.out0) store_int(p.out0, l, min(pad_count(c, A), room), p.ec64);
    if (p.out1) store_int(p.out1, l, min(off, S), p.ec64);
#else
    // Rows held only: when some are dropped, ht_assign counts the kept ones.
    if (p.out0) store_int(p.out0, l, dtot[r] > S ? 0 : c, 0);
#endif
  }
#if EP_EM
  // Padding rows of this rank's zones: source -1 (dispatch writes zeros).
  int* recv = (int*)(p.hmem + p.recv_off);
  for (int l = 0; l < L; ++l) {
    const int c = etot[r * L + l];
    const int lo = zoff[r * L + l] + c, hi = min(S, zoff[r * L + l] + pad_count(c, A));
    for (int row = lo + threadIdx.x; row < hi; row += blockDim.x) {
      recv[(i64)row * 2] = -1;
      recv[(i64)row * 2 + 1] = -1;
    }
  }
#endif
}

// Position of the counter `cg` among the distinct counters of a routing row (combine order):
// FLAT counters are ranks (cg = E + d), EM counters experts.
__device__ __forceinline__ bool row_hits(const int* row, int K, int L, int E, int cg) {
  for (int k = 0; k < K; ++k) {
    const int e = row[k];
    if (e < 0) continue;
#if EP_EM
    if (e == cg) return true;
#else
    if (e / L == cg - E) return true;
#endif
  }
  return false;
}

// Receiver side: token (s, t) lands in this rank's slot `slot`.
__device__ void write_recv_row(const HtParams& p, const int* row, int s, int t, int cg, int slot) {
  const int K = p.topk, L = p.local_experts, r = p.rank;
#if EP_EM
  int* out = (int*)(p.hmem + p.recv_off) + (i64)slot * 2;
  int k = 0;
  while (row[k] != cg) ++k;
  out[0] = s * p.max_tokens + t;
  out[1] = ((cg - r * L) << 8) | k;
  // The inverse table: this row is entry j of (s, t), j = the local experts of the row below
  // cg (first occurrences only: a repeat is encoded -2 - j, never in range).
  int j = 0;
  for (int q = 0; q < K; ++q) j += row[q] >= r * L && row[q] < cg;
  ((int*)(p.hmem + p.inv_off))[((i64)s * p.max_tokens + t) * K + j] = slot;
#else
  (void)cg;
  int* out = (int*)(p.hmem + p.recv_off) + (i64)slot * (1 + K);
  out[0] = s * p.max_tokens + t;
  // Rows were dropped: FLAT expert_counters count the rows held (ht_offsets wrote zeros).
  const bool count_here = p.out0 && hdr(p)->total > p.recv_rows;
  // The local experts of the row, ascending, each with its (first) top-k position.
  int n = 0, prev = -1;
  while (true) {
    int best = -1, bk = 0;
    for (int k = 0; k < K; ++k) {
      const int e = row[k];
      if (e >= 0 && e / L == r && e > prev && (best < 0 || e < best)) {
        best = e;
        bk = k;
      }
    }
    if (best < 0) break;
    out[1 + n++] = ((best - r * L) << 8) | bk;
    if (count_here) atomicAdd((int*)p.out0 + (best - r * L), 1);
    prev = best;
  }
  for (; n < K; ++n) out[1 + n] = -1;
#endif
}

// Sender side: this rank's token t reaches counter cg (FLAT rank E + d, EM expert) at `slot`.
__device__ void write_send_entry(const HtParams& p, const int* row, int t, int cg, int slot) {
  const int K = p.topk, L = p.local_experts, E = p.num_experts;
  const bool dropped = slot >= p.recv_rows;
#if EP_EM
  (void)E;
  const int d = cg / L;
  int ci = 0;
  for (int k = 0; k < K; ++k) ci += row[k] >= 0 && row[k] < cg;
#else
  const int d = cg - E;
  u64 below = 0;
  for (int k = 0; k < K; ++k)
    if (row[k] >= 0 && row[k] / L < d) below |= 1ull << (row[k] / L);
  const int ci = __popcll(below);
#endif
  int2* send = (int2*)(p.hmem + p.send_off) + (i64)t * K;
  int* bwd = (int*)(p.hmem + p.bwd_off) + (i64)t * K;
  send[ci] = dropped ? make_int2(-1, -1) : make_int2(d, slot);
  for (int k = 0; k < K; ++k) {
    int e = row[k];
    if (e <= -2) e = row[-2 - e];
    if (e < 0) continue;
#if EP_EM
    if (e != cg) continue;
    const int j = 0;
#else
    if (e / L != d) continue;
    int j = 0;
    for (int q = 0; q < K; ++q) j += row[q] >= 0 && row[q] / L == d && row[q] < e;
#endif
    bwd[k] = dropped ? -1 : (ci << 16) | j;
  }
}

// Warp items: receiver (source s, piece, my counter), then sender (piece, counter). Each warp
// scans its piece's tokens 32 at a time in order; the slot of a hit is the counter's base plus
// the hits before it.
extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_assign(const HtParams p) {
  const int E = p.num_experts, N = p.nranks, L = p.local_experts, K = p.topk, B = p.max_tokens;
  const int C = E + N, r = p.rank;
  const char* buf = my_buf(p);
  const int* cnt = (const int*)(buf + p.off_cnt);
  const int* rbase = (const int*)(buf + p.off_rbase);
  const int* sbase = (const int*)(buf + p.off_sbase);
  const int* all = (const int*)(buf + p.off_all);
#if EP_EM
  const int cr = L, cs = E;
#else
  const int cr = 1, cs = N;
#endif
  const int recv_items = N * HT_PIECES * cr;
  const int items = recv_items + HT_PIECES * cs;
  const int lane = threadIdx.x & 31;
  const int gwarp = gthread() >> 5, gwarps = gthreads() >> 5;
  const unsigned lt = (1u << lane) - 1u;
  for (int it = gwarp; it < items; it += gwarps) {
    int s, pc, cg, base;
    const bool recv = it < recv_items;
    if (recv) {
      s = it / (HT_PIECES * cr);
      pc = (it / cr) % HT_PIECES;
      const int c = it % cr;
#if EP_EM
      cg = r * L + c;
#else
      cg = E + r;
#endif
      base = rbase[s * cr + c];
    } else {
      const int j = it - recv_items;
      s = r;
      pc = j / cs;
#if EP_EM
      cg = j % cs;
#else
      cg = E + j % cs;
#endif
      base = sbase[cg];
    }
    const int* q = cnt + (i64)s * HT_PIECES * C + cg;
    if (q[pc * C] == 0) continue;
    int before = lane < pc ? q[lane * C] : 0;
    for (int o = 16; o > 0; o >>= 1) before += __shfl_xor_sync(0xffffffffu, before, o);
    base += before;
    const int t0 = min(B, pc * p.piece_len), t1 = min(B, t0 + p.piece_len);
    const int* rows = all + (i64)s * B * K;
    for (int tb = t0; tb < t1; tb += 32) {
      const int t = tb + lane;
      const int* row = rows + (i64)t * K;
      const bool hit = t < t1 && row_hits(row, K, L, E, cg);
      const unsigned m = __ballot_sync(0xffffffffu, hit);
      if (hit) {
        const int slot = base + __popc(m & lt);
        if (recv) {
          if (slot < p.recv_rows) write_recv_row(p, row, s, t, cg, slot);
        } else {
          write_send_entry(p, row, t, cg, slot);
        }
      }
      base += __popc(m);
    }
  }
}
