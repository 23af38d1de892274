// Shared pieces of the low-latency kernels: the argument block, memory-ordering primitives,
// bf16 conversions and 16-byte row copies. Header-free on purpose: NVRTC compiles this at run
// time with no CUDA include path (see docs/LL.md for the buffer layout and protocol).
#pragma once

#ifndef EP_MAX_RANKS
#define EP_MAX_RANKS 64
#endif

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;

// Mirrors `LlParams` in src/runtime/ll_params.rs field for field (8-byte fields first).
struct LlParams {
  u64 peers[EP_MAX_RANKS];  // communication buffer of every rank (ours included)
  u64 bank_stride;          // bytes between bank 0 and bank 1
  u64 off_dflag;            // inside a bank: dispatch_flag[N] (u64)
  u64 off_ecount;           // expert_count[N][L] (i32)
  u64 off_cflag;            // combine_flag[N] (u64)
  u64 off_data;             // dispatch_recv / combine_recv union
  u64 x;                    // dispatch: tokens [T,H]; combine: expert outputs
  u64 topk_idx;             // [T,K] int64 or int32 (EP_IDX64)
  u64 weights;              // dispatch: [T,K] f32 or 0; combine EM: [T,K] f32
  u64 out;                  // dispatch: EM [L,N*B,H] / RM [N,B,H]; combine: [T,H]
  u64 out_counters;         // dispatch EM: expert_counters[L]; RM: src_rank_counters[N] (0 = none)
  u64 out_topk_idx;         // dispatch RM: [N,B,K] i32
  u64 out_weights;          // dispatch RM: [N,B,K] f32 (0 = none)
  u64 meta;                 // handle metadata: n[N], msgs[N], then [N][B][K+1] i32
  u64 state;                // group device state (EpState)
  u64 err;                  // host-mapped int: set to 1 when a wait timed out
  u64 prof;                 // NCCL_EP_PROFILE: u64[gridDim.x][8] phase timestamps, else 0
  i64 timeout_cycles;       // wait bound in clock cycles (0 = wait forever)
  int rank, nranks;
  int num_experts, local_experts;
  int max_tokens, num_tokens;
  int row_bytes;            // H * element size (multiple of 16)
  int dmsg, hdr;            // dispatch slot stride and header bytes
  int cmsg;                 // combine slot stride
  int phases;               // 1 send, 2 receive, 3 both
  int recv_global;          // RM: global expert ids in outputs->topk_idx
};
static_assert(sizeof(LlParams) == 8 * EP_MAX_RANKS + 17 * 8 + 12 * 4, "LlParams mirrors src/runtime/ll_params.rs");

// Group-owned device state, zeroed at creation. Operations of a group run in stream order.
struct EpState {
  u32 epoch;      // operations completed so far; bank = epoch & 1, tag = epoch + 1
  u32 done;       // blocks of the current kernel that finished (to advance the epoch)
  u32 sent_done;  // blocks of the current kernel that finished sending
  u32 pad[13];
};

#define EP_SEND 1
#define EP_RECV 2

// Phase timestamps for NCCL_EP_PROFILE (thread 0 of each block; off when p.prof is 0).
__device__ __forceinline__ void prof_mark(const LlParams& p, int i) {
  if (p.prof && threadIdx.x == 0) {
    u64 t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    ((u64*)p.prof)[blockIdx.x * 8 + i] = t;
  }
}

__device__ __forceinline__ u64 ld_acquire_sys(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ u32 ld_acquire_gpu(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// Loads that bypass L1: received rows were written by other GPUs or other kernels.
__device__ __forceinline__ int4 ld_cg(const int4* p) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ int ld_cg_int(const int* p) {
  int v;
  asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ float bf16_to_f32(unsigned short b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even, NaN kept quiet: the same rule as the CPU reference.
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

// Waits until the flag carries `tag` in its high half; returns its low half, or 0 after a
// timeout (then the host-visible error flag is raised and the source counts as absent).
__device__ __forceinline__ u32 wait_flag(const u64* flag, u32 tag, const LlParams& p) {
  i64 start = clock64();
  while (true) {
    u64 v = ld_acquire_sys(flag);
    if ((u32)(v >> 32) == tag) return (u32)v;
    if (p.timeout_cycles > 0 && clock64() - start > p.timeout_cycles) {
      if (p.err) atomicExch((int*)p.err, 1);
      return 0;
    }
  }
}

// Rows are split into segments of this many bytes so that many warps share one long row.
#define EP_SEG_BYTES 2048

__device__ __forceinline__ int num_segments(int row_bytes) { return (row_bytes + EP_SEG_BYTES - 1) / EP_SEG_BYTES; }

// Bytes of segment `seg` of a row.
__device__ __forceinline__ int segment_bytes(int row_bytes, int seg) {
  return min(EP_SEG_BYTES, row_bytes - seg * EP_SEG_BYTES);
}

// Copies `bytes` (a multiple of 16) from src to dst with the lanes of one warp. Four 16-byte
// loads per lane are in flight before the stores: one outstanding load per lane leaves HBM
// latency-bound at a fraction of its bandwidth. CG: bypass L1 (data other GPUs/kernels wrote).
template <bool CG>
__device__ __forceinline__ int4 ld16(const int4* p) {
  if (CG) return ld_cg(p);
  return *p;
}

template <bool CG = false>
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int bytes, int lane) {
  int4* d = (int4*)dst;
  const int4* s = (const int4*)src;
  const int n = bytes >> 4;
  int i = lane;
  for (; i + 96 < n; i += 128) {
    int4 a = ld16<CG>(s + i), b = ld16<CG>(s + i + 32), c = ld16<CG>(s + i + 64), e = ld16<CG>(s + i + 96);
    d[i] = a;
    d[i + 32] = b;
    d[i + 64] = c;
    d[i + 96] = e;
  }
  for (; i < n; i += 32) d[i] = ld16<CG>(s + i);
}

__device__ __forceinline__ int topk_at(const LlParams& p, int t, int k) {
#if EP_IDX64
  i64 e = ((const i64*)p.topk_idx)[(i64)t * EP_TOPK + k];
#else
  i64 e = ((const int*)p.topk_idx)[(i64)t * EP_TOPK + k];
#endif
  return (e < 0 || e >= p.num_experts) ? -1 : (int)e;
}

__device__ __forceinline__ char* bank_base(const LlParams& p, int r, u32 epoch) {
  return (char*)p.peers[r] + (u64)(epoch & 1u) * p.bank_stride;
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

// Each block makes its writes visible system-wide; the last block (which owns the end of the
// token range) waits for all others, so that it may then publish flags.
__device__ __forceinline__ void sends_done(const LlParams& p) {
  // The barrier orders the block's writes before thread 0's system fence, which orders them
  // before the counter (and so before the flags the last block publishes).
  __syncthreads();
  EpState* st = (EpState*)p.state;
  if (threadIdx.x == 0) {
    __threadfence_system();
    if (blockIdx.x != gridDim.x - 1) {
      atomicAdd(&st->sent_done, 1u);
    } else {
      while (ld_acquire_gpu(&st->sent_done) != gridDim.x - 1) {
      }
      st->sent_done = 0;
      __threadfence_system();
    }
  }
  __syncthreads();
}
