// Shared pieces of the low-latency kernels: timeouts and masks, the epoch and block counters.
// kernels/ep_device.cuh and kernels/ep_params.cuh (LlParams, EpState, LL_MAX_RANKS, generated from
// the Rust definitions) come first. Header-free on purpose: NVRTC compiles this at run time with
// no CUDA include path (see docs/LL.md for the buffer layout and protocol).
#pragma once

// EP_MASK: 1 for groups with enable_mask (mask reads, decision words), 0 for the others, whose
// kernels carry no mask code at all (a timeout there prints and traps). Default: 1.
#ifndef EP_MASK
#define EP_MASK 1
#endif

// Phase timestamps for NCCL_EP_PROFILE (thread 0 of each block; off when p.prof is 0).
__device__ __forceinline__ void prof_mark(const LlParams& p, int i) {
  if (p.prof && threadIdx.x == 0) {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    ((u64*)p.prof)[blockIdx.x * 8 + i] = t;
  }
}

__device__ __forceinline__ bool timed_out(const LlParams& p, u64 start) {
  return p.timeout_ns > 0 && now_ns() - start > (u64)p.timeout_ns;
}

__device__ __forceinline__ double timeout_ms(const LlParams& p) { return (double)p.timeout_ns * 1e-6; }

// Raises the host-visible error flag (a plain system-scope store: hosts without native atomics
// on mapped memory are fine).
__device__ __forceinline__ void raise_error(const LlParams& p) {
  if (p.err) st_release_sys_int((int*)p.err, 1);
}

// Which wait ran out, for the device messages.
#define EP_WAIT_DISPATCH 0
#define EP_WAIT_COMBINE 1
#define EP_WAIT_CLEAN 2

__device__ __noinline__ const char* wait_name(int what) {
  return what == EP_WAIT_DISPATCH ? "dispatch receive" : what == EP_WAIT_COMBINE ? "combine receive" : "ncclEpMaskClean barrier";
}

// Device messages, out of line so that the hot kernels carry no printf frames of their own.
// what: EP_WAIT_*; 3: the kernel's own blocks (sends_done).
__device__ __noinline__ void say_timeout(int rank, int peer, double ms, int what, int masked) {
  if (what == 3)
    printf("NCCL EP: rank %d: the blocks of its own kernel did not all finish sending within %.1f ms (not all resident on the GPU?); the kernel traps\n",
           rank, ms);
  else if (what == EP_WAIT_CLEAN)
    printf("NCCL EP: rank %d: rank %d did not reach ncclEpMaskClean within %.1f ms; it stays masked\n", rank, peer, ms);
  else if (masked)
    printf("NCCL EP: rank %d: nothing from rank %d within %.1f ms (%s): rank %d is now masked on rank %d\n", rank, peer, ms,
           wait_name(what), peer, rank);
  else
    printf("NCCL EP: rank %d: nothing from rank %d within %.1f ms (%s); masking is off (enable_mask = 0), so the kernel traps and the CUDA context is lost\n",
           rank, peer, ms, wait_name(what));
}

// Prints a fatal timeout (once per kernel), raises the error flag and kills the kernel: the
// CUDA context is lost, as with upstream's trap. Out of line and of scalars only, so that the hot
// kernels carry nothing of it but the call.
__device__ __noinline__ void trap_timeout(u64 state, u64 err, int rank, int peer, i64 timeout_ns, int what) {
  if (atomicExch(&((EpState*)state)->trapping, 1u) == 0u) say_timeout(rank, peer, (double)timeout_ns * 1e-6, what, 0);
  if (err) st_release_sys_int((int*)err, 1);
  __threadfence_system();
  asm volatile("trap;");
}

__device__ __forceinline__ void fatal_timeout(const LlParams& p, int peer, int what) {
  trap_timeout(p.state, p.err, p.rank, peer, p.timeout_ns, what);
}

// Whether this kernel masks: compiled out of EP_MASK=0 variants.
__device__ __forceinline__ bool masking(const LlParams& p) {
#if EP_MASK
  return p.mask != 0;
#else
  (void)p;
  return false;
#endif
}

// An active rank has mask[r] != 0; without a mask every rank is active.
__device__ __forceinline__ bool rank_active(const LlParams& p, int r) {
  return !masking(p) || ld_relaxed_int((const int*)p.mask + r) != 0;
}

// The active ranks as a bit set (a snapshot: a timeout may mask more of them later), computed
// by warp 0 (all its lanes) and stored in `*out` for the block. Call from every thread
// (EP_MASK=1 kernels only; EP_MASK=0 kernels take every rank as active).
__device__ __forceinline__ void active_set(const LlParams& p, u64* out) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    const bool lo = lane < p.nranks && rank_active(p, lane);
    const bool hi = lane + 32 < p.nranks && rank_active(p, lane + 32);
    const u64 a = (u64)__ballot_sync(0xffffffffu, lo) | ((u64)__ballot_sync(0xffffffffu, hi) << 32);
    if (lane == 0) *out = a;
  }
  __syncthreads();
}

// Decision words (masking on): decide[s] = (tag << 32) | EP_PRESENT | count once some block of
// the operation tagged `tag` saw source s's flag, (tag << 32) once one timed out on it. The first
// block to decide wins, so every block of a kernel counts the same sources even when the flag
// lands at the moment of the timeout.
#define EP_PRESENT 0x80000000u

__device__ __forceinline__ int decoded(u64 d) {
  return ((u32)d & EP_PRESENT) ? (int)((u32)d & ~EP_PRESENT) : -1;
}

// Proposes `val` for source s; returns the decision that holds (ours if we were first).
__device__ __forceinline__ u64 decide(const LlParams& p, int s, u32 tag, u32 val) {
  u64* w = (u64*)p.decide + s;
  const u64 mine = ((u64)tag << 32) | val;
  u64 cur = ld_acquire_gpu_u64(w);
  if ((u32)(cur >> 32) == tag) return cur;
  // Orders what this thread acquired from the source (its flag, hence its data) before the
  // decision, for the blocks that will act on the decision alone.
  __threadfence();
  while ((u32)(cur >> 32) != tag) {
    const u64 prev = atomicCAS((unsigned long long*)w, (unsigned long long)cur, (unsigned long long)mine);
    cur = prev == cur ? mine : prev;
  }
  return cur;
}

// Waits until source s's flag carries `tag` in its high half and returns its low half (the
// count), or -1 when s is absent from this operation: masked before it, or silent past the
// timeout. Masking on: the first timeout on s masks it here (atomicExch on mask[s]), raises the
// async error flag, and the operation goes on without s. Masking off: a timeout prints which
// rank and phase and traps (see fatal_timeout). The hot loop only polls the flag: the clock and
// the other blocks' decisions are looked at every EP_POLLS_PER_CHECK polls (the first timer
// read starts the clock, so the bound is the timeout plus at most that many polls;
// EP_POLLS_PER_CHECK and now_ns are in kernels/ep_device.cuh, HT waits the same way).

// The slow end of a wait with masking on: source s timed out here. Out of line (scalars only).
__device__ __noinline__ u64 mask_timeout(u64 decide_words, u64 mask, u64 err, int rank, int s, u32 tag,
                                         i64 timeout_ns, int what) {
  u64* w = (u64*)decide_words + s;
  const u64 mine = (u64)tag << 32;
  u64 cur = ld_acquire_gpu_u64(w);
  if ((u32)(cur >> 32) != tag) {
    __threadfence();
    while ((u32)(cur >> 32) != tag) {
      const u64 prev = atomicCAS((unsigned long long*)w, (unsigned long long)cur, (unsigned long long)mine);
      cur = prev == cur ? mine : prev;
    }
  }
  // Absent by our decision or an earlier block's: only the first to time out finds mask[s]
  // still 1, so one message per source.
  if (cur == mine && atomicExch((int*)mask + s, 0) != 0) {
    if (err) st_release_sys_int((int*)err, 1);
    say_timeout(rank, s, (double)timeout_ns * 1e-6, what, 1);
  }
  return cur;
}

__device__ __forceinline__ int wait_source(const LlParams& p, const u64* flag, int s, u32 tag, int what) {
  if (masking(p) && !rank_active(p, s)) return -1;
  u64 start = 0;
  for (u32 polls = 0;; ++polls) {
    const u64 v = ld_acquire_sys(flag);
    if ((u32)(v >> 32) == tag) {
      if (!masking(p)) return (int)((u32)v & ~EP_PRESENT);
      return decoded(decide(p, s, tag, EP_PRESENT | ((u32)v & ~EP_PRESENT)));
    }
    if (polls % EP_POLLS_PER_CHECK != 0) continue;
    if (masking(p)) {
      const u64 d = ld_acquire_gpu_u64((const u64*)p.decide + s);
      if ((u32)(d >> 32) == tag) return decoded(d);
    }
    const u64 now = now_ns();
    if (start == 0) start = now;
    if (p.timeout_ns <= 0 || now - start <= (u64)p.timeout_ns) continue;
    if (!masking(p)) {
      fatal_timeout(p, s, what);  // does not return
      return -1;
    }
    return decoded(mask_timeout(p.decide, p.mask, p.err, p.rank, s, tag, p.timeout_ns, what));
  }
}

// Rows are split into segments of this many bytes so that many warps share one long row.
#define EP_SEG_BYTES 2048

__device__ __forceinline__ int num_segments(int row_bytes, int seg_bytes = EP_SEG_BYTES) {
  return (row_bytes + seg_bytes - 1) / seg_bytes;
}

// Bytes of segment `seg` of a row.
__device__ __forceinline__ int segment_bytes(int row_bytes, int seg, int seg_bytes = EP_SEG_BYTES) {
  return min(seg_bytes, row_bytes - seg * seg_bytes);
}

__device__ __forceinline__ int topk_at(const LlParams& p, int t, int k) {
#if EP_IDX64
  i64 e = ((const i64*)p.topk_idx)[(i64)t * EP_TOPK + k];
#else
  i64 e = ((const int*)p.topk_idx)[(i64)t * EP_TOPK + k];
#endif
  return (e < 0 || e >= p.num_experts) ? -1 : (int)e;
}

// The handle's metadata in int32 units (ep_core::ll_layout::LlHandleMeta): counts[N], msgs[N],
// then K+1 ints per (source, slot), then own[B][K], this rank's own tokens' rows by token.
__device__ __forceinline__ i64 meta_entry(const LlParams& p, int s, int slot) {
  return 2 * p.nranks + ((i64)s * p.max_tokens + slot) * (EP_TOPK + 1);
}
__device__ __forceinline__ i64 meta_own(const LlParams& p) { return meta_entry(p, p.nranks, 0); }

__device__ __forceinline__ char* bank_base(const LlParams& p, int r, u32 epoch) {
  return (char*)p.peers[r] + (u64)(epoch & 1u) * p.bank_stride;
}

// Remote ranks (docs/MULTINODE.md), bit r of p.remote: peers[r] is then this rank's send staging
// region for r (no banks: stream order) and r's messages arrive in r's receive region, moved there
// by NCCL between the send and the receive launch. A region has a bank's signal offsets and holds
// one source's dispatch rows from slot 0. p.remote == 0: the bank paths only.
__device__ __forceinline__ bool is_remote(const LlParams& p, int r) { return (p.remote >> r) & 1ull; }

// Where this rank writes what it sends rank d.
__device__ __forceinline__ char* send_base(const LlParams& p, int d, u32 epoch) {
  return is_remote(p, d) ? (char*)p.peers[d] : bank_base(p, d, epoch);
}

// Where this rank reads what rank s sent it.
__device__ __forceinline__ char* recv_base(const LlParams& p, int s, u32 epoch) {
  if (!is_remote(p, s)) return bank_base(p, p.rank, epoch);
  const int i = __popcll(p.remote & ((1ull << s) - 1ull));
  return (char*)p.rstage + (u64)i * p.stage_stride;
}

// First dispatch row of source `src` in the region shared with `peer` (the destination when
// sending, the source when receiving): src * B in a bank, 0 in a staging region.
__device__ __forceinline__ u64 src_row0(const LlParams& p, int peer, int src) {
  return is_remote(p, peer) ? 0ull : (u64)src * p.max_tokens;
}

// The last block to finish advances the epoch (all blocks read it at their start).
__device__ __forceinline__ void finish_op(const LlParams& p, bool advance) {
  __syncthreads();
  if (advance && threadIdx.x == 0) {
    EpState* st = (EpState*)p.state;
    __threadfence();
    if (atomicAdd(&st->done, 1u) == gridDim.x - 1) {
      st->done = 0;
      st->epoch = st->epoch + 1;
      __threadfence();
    }
  }
}

// Fences and flag releases towards the peers: system scope in general (peers on other GPUs read
// over NVLink or PCIe), GPU scope when every peer's buffer is on this GPU (p.gpu_scope: the .gpu
// scope is every thread of this device, whatever its process), which is cheaper. Receivers
// acquire at system scope, which includes both.
__device__ __forceinline__ void fence_peers(const LlParams& p) {
  if (p.gpu_scope)
    __threadfence();
  else
    __threadfence_system();
}

__device__ __forceinline__ void release_to_peer(const LlParams& p, u64* flag, u64 v) {
  if (p.gpu_scope)
    st_release_gpu(flag, v);
  else
    st_release_sys(flag, v);
}

// Each block makes its writes visible to the peers; the last block (which owns the end of the
// token range) waits for all others, so that it may then publish flags. This wait is local: the
// other blocks' send phases contain no wait of any kind, so it ends once they have run. It is
// bounded all the same (blocks that are not co-resident would never run): past the timeout it
// reports and traps, masking or not, since this is no peer's fault.
__device__ __forceinline__ void sends_done(const LlParams& p) {
  // The barrier orders the block's writes before thread 0's fence, which orders them before
  // the counter (and so before the flags the last block publishes).
  __syncthreads();
  EpState* st = (EpState*)p.state;
  if (threadIdx.x == 0) {
    fence_peers(p);
    if (blockIdx.x != gridDim.x - 1) {
      atomicAdd(&st->sent_done, 1u);
    } else {
      u64 start = 0;
      for (u32 polls = 0; ld_acquire_gpu(&st->sent_done) != gridDim.x - 1; ++polls) {
        if (polls % EP_POLLS_PER_CHECK != 0) continue;
        const u64 now = now_ns();
        if (start == 0) start = now;
        if (p.timeout_ns > 0 && now - start > (u64)p.timeout_ns) fatal_timeout(p, p.rank, 3);
      }
      st->sent_done = 0;
      fence_peers(p);
    }
  }
  __syncthreads();
}
