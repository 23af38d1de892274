// Device pieces both modes use: integer types, memory-ordering loads and stores, L1-bypassing
// loads, the wait clock, bf16 and fp16 by bits and the warp row copy. Header-free on purpose: NVRTC compiles the
// kernels at run time with no CUDA include path; the runtime prepends this file to every kernel
// source.
#pragma once

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;

__device__ __forceinline__ u64 ld_acquire_sys(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void st_release_gpu(u64* p, u64 v) {
  asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ u32 ld_acquire_gpu(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ u64 ld_acquire_gpu_u64(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ int ld_relaxed_int(const int* p) {
  int v;
  asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void st_release_sys_int(int* p, int v) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// 16-byte loads with a cache operator: `name` loads with `ld.global.<op>.v4.s32`.
#define EP_LD_V4(name, op)                                                         \
  __device__ __forceinline__ int4 name(const int4* p) {                           \
    int4 v;                                                                        \
    asm volatile("ld.global." op ".v4.s32 {%0,%1,%2,%3}, [%4];"                    \
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)                      \
                 : "l"(p));                                                        \
    return v;                                                                      \
  }

// Loads that bypass L1: data other GPUs or other kernels wrote.
EP_LD_V4(ld_cg, "cg")

__device__ __forceinline__ int ld_cg_int(const int* p) {
  int v;
  asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ u64 ld_cg_u64(const u64* p) {
  u64 v;
  asm volatile("ld.global.cg.u64 %0, [%1];" : "=l"(v) : "l"(p));
  return v;
}

// Wall-clock nanoseconds (%globaltimer): every wait of both modes is bounded in time, not in SM
// cycles (clocks vary with the load and between GPUs); the bound is the group's timeout_ns.
__device__ __forceinline__ u64 now_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// A wait polls its flag and reads the clock only every this many polls, so that the hot loop is
// a bare poll; the first clock read starts the clock (bound: the timeout plus that many polls).
#define EP_POLLS_PER_CHECK 64

__device__ __forceinline__ float bf16_to_f32(unsigned short b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even, NaN kept quiet: the same rule as the CPU reference.
__device__ __forceinline__ unsigned short f32_to_bf16(float f) {
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}

// IEEE binary16 by bits: exact widening, and narrowing rounded to nearest even (cvt.rn), the
// rule of the CPU reference's f32_to_f16_rne.
__device__ __forceinline__ float half_to_f32(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short f32_to_half(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// The grid's warps numbered across blocks first: warp w of block b is b + w * gridDim.x. A loop
// over fewer work items than there are warps then spreads them over every SM (each SM's load
// ports and memory-level parallelism) instead of filling the first blocks and leaving the rest
// idle; with more items than warps nothing changes.
__device__ __forceinline__ int spread_warp() { return (int)(blockIdx.x + (threadIdx.x >> 5) * gridDim.x); }
__device__ __forceinline__ int grid_warps() { return (int)((gridDim.x * blockDim.x) >> 5); }

// Load modes of ld16 / warp_copy: plain, .cg (bypass L1: data other GPUs or kernels wrote) or
// .cs (streaming: read once, evicted first, so that it does not push out of L2 what this
// kernel reads again).
#define EP_LD_PLAIN 0
#define EP_LD_CG 1
#define EP_LD_CS 2

EP_LD_V4(ld_cs, "cs")

template <int LD>
__device__ __forceinline__ int4 ld16(const int4* p) {
  if (LD == EP_LD_CG) return ld_cg(p);
  if (LD == EP_LD_CS) return ld_cs(p);
  return *p;
}

// Streaming store (st.global.cs: evict first): for output written once and not read again by
// this kernel, so that it does not push out of L2 the source rows that are read again.
__device__ __forceinline__ void st_cs(int4* p, int4 v) {
  asm volatile("st.global.cs.v4.s32 [%0], {%1,%2,%3,%4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

template <bool CS>
__device__ __forceinline__ void st16(int4* p, int4 v) {
  if (CS)
    st_cs(p, v);
  else
    *p = v;
}

// Copies `bytes` (a multiple of 16) from src to dst with the lanes of one warp. Four 16-byte
// loads per lane are in flight before the stores: one outstanding load per lane leaves HBM
// latency-bound at a fraction of its bandwidth. LD: the load mode (EP_LD_*); CS: streaming
// stores.
template <int LD = EP_LD_PLAIN, bool CS = false>
__device__ __forceinline__ void warp_copy(void* dst, const void* src, int bytes, int lane) {
  int4* d = (int4*)dst;
  const int4* s = (const int4*)src;
  const int n = bytes >> 4;
  int i = lane;
  for (; i + 96 < n; i += 128) {
    int4 a = ld16<LD>(s + i), b = ld16<LD>(s + i + 32), c = ld16<LD>(s + i + 64), e = ld16<LD>(s + i + 96);
    st16<CS>(d + i, a);
    st16<CS>(d + i + 32, b);
    st16<CS>(d + i + 64, c);
    st16<CS>(d + i + 96, e);
  }
  for (; i < n; i += 32) st16<CS>(d + i, ld16<LD>(s + i));
}
