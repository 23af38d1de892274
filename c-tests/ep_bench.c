/*
 * ep_bench: latency, bandwidth and memory of NCCL EP dispatch/combine.
 *
 * Uses only the public API (nccl_ep.h), so it also links against NVIDIA's libnccl_ep.so. Our
 * extensions (local groups, the buffer-size query) are looked up with dlsym at run time.
 *
 * Launch modes:
 *   ep_bench --local-ranks N ...   N ranks in this process (ncclEpxCreateLocalGroups)
 *   mpirun -np N ep_bench ...      one process per GPU (built with MPI; NCCL communicator)
 *
 * Bandwidth follows upstream ep_bench: bytes = valid (token, expert) selections x row bytes,
 * divided by the phase time; reported per rank and summed over this process's ranks (HT: see
 * run_config_ht). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nccl_ep.h"

#ifdef EP_BENCH_MPI
#include <mpi.h>
#endif

#define CK(x)                                                                                    \
  do {                                                                                           \
    cudaError_t e_ = (x);                                                                        \
    if (e_ != cudaSuccess) {                                                                     \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));       \
      exit(2);                                                                                   \
    }                                                                                            \
  } while (0)

static const char* (*ext_last_error)(void);

#define EP(x)                                                                                    \
  do {                                                                                           \
    ncclResult_t r_ = (x);                                                                       \
    if (r_ != ncclSuccess) {                                                                     \
      fprintf(stderr, "%s:%d: %s returned %d: %s\n", __FILE__, __LINE__, #x, (int)r_,            \
              ext_last_error ? ext_last_error() : "");                                           \
      exit(3);                                                                                   \
    }                                                                                            \
  } while (0)

/* The start gate: every rank's stream waits on a host-mapped word (cuStreamWaitValue32), the host
 * queues all ranks' work, then opens the gate, so that host launch time stays out of the GPU
 * timings and all ranks start together. Without stream memory operations the gate is off. */
typedef int (*wait_value_fn)(void* stream, unsigned long long addr, unsigned value, unsigned flags);
static wait_value_fn gate_wait;
static volatile unsigned* gate_host;
static unsigned long long gate_dev;
static unsigned gate_value;

static void gate_init(void) {
  void* cu = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
  if (cu) gate_wait = (wait_value_fn)dlsym(cu, "cuStreamWaitValue32_v2");
  if (cu && !gate_wait) gate_wait = (wait_value_fn)dlsym(cu, "cuStreamWaitValue32");
  if (!gate_wait) return;
  void* h;
  CK(cudaHostAlloc(&h, 64, cudaHostAllocMapped));
  void* d;
  CK(cudaHostGetDevicePointer(&d, h, 0));
  gate_host = (volatile unsigned*)h;
  *gate_host = 0;
  gate_dev = (unsigned long long)(uintptr_t)d;
}

/* Makes `s` wait until the gate reaches the next value (CU_STREAM_WAIT_VALUE_GEQ = 0). */
static void gate_close(cudaStream_t s) {
  if (gate_wait && gate_wait((void*)s, gate_dev, gate_value + 1, 0) != 0) {
    fprintf(stderr, "ep_bench: cuStreamWaitValue32 failed; timing without the start gate\n");
    gate_wait = NULL;
  }
}

static void gate_open(void) {
  if (!gate_wait) return;
  __atomic_store_n(gate_host, ++gate_value, __ATOMIC_RELEASE);
}

typedef ncclResult_t (*local_groups_fn)(ncclEpGroup_t*, int, const int*, const ncclEpGroupConfig_t*);
typedef ncclResult_t (*buffer_size_fn)(const ncclEpGroupConfig_t*, int, ncclEpLayout_t, int, size_t*);

typedef struct {
  int algorithm;  /* NCCL_EP_ALGO_* */
  int layout;     /* NCCL_EP_LAYOUT_* */
  int tokens, hidden, topk, experts;
  int local_ranks;
  int warmup, iters;
  int send_only, graph;
  int mask; /* enable_mask: the masked code paths, no rank masked */
  int routing; /* 0 uniform, 1 zipf */
  int dtype;   /* token type: ncclBfloat16, ncclFloat16 or ncclFloat32 (--dtype) */
  double zipf_s;
  unsigned long long seed;
  const char* csv;
  const char* plot;
  const char* sweep_tokens; /* comma list */
  const char* sweep_hidden;
  const char* label;
} Opts;

typedef struct {
  double p50, p10, p90;
} Stat;

static double now_us(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

static int cmp_d(const void* a, const void* b) {
  double x = *(const double*)a, y = *(const double*)b;
  return x < y ? -1 : x > y;
}

static Stat stats(double* v, int n) {
  Stat s = {0, 0, 0};
  if (n <= 0) return s;
  qsort(v, n, sizeof(double), cmp_d);
  s.p50 = v[n / 2];
  s.p10 = v[n / 10];
  s.p90 = v[(n * 9) / 10 < n ? (n * 9) / 10 : n - 1];
  return s;
}

/* splitmix64: the same generator family as the library's tests */
static uint64_t rng_next(uint64_t* s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static double rng_unit(uint64_t* s) { return (rng_next(s) >> 11) * (1.0 / 9007199254740992.0); }

static uint16_t f2bf(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* f32 to fp16, nearest even; values below fp16's normal range become zero (the benchmark's
 * values are in [-4, 4), and a few flushed tiny values change no timing). */
static uint16_t f2h(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  int e = (int)((u >> 23) & 0xff) - 127;
  if (e < -14) return sign;
  if (e > 15) return sign | 0x7c00u;
  uint32_t h = ((uint32_t)(e + 15) << 10) | ((u >> 13) & 0x3ffu), rem = u & 0x1fffu;
  h += rem > 0x1000u || (rem == 0x1000u && (h & 1u));
  return (uint16_t)(sign | h);
}

static size_t elem_bytes(int dt) { return dt == ncclFloat32 ? 4 : 2; }

static const char* dtype_name(int dt) { return dt == ncclFloat32 ? "fp32" : dt == ncclFloat16 ? "fp16" : "bf16"; }

/* n random values lo + span * u (u uniform in [0, 1)) of type dt at p. */
static void fill_tokens(void* p, size_t n, int dt, double lo, double span, uint64_t* rng) {
  for (size_t i = 0; i < n; ++i) {
    float v = (float)(lo + span * rng_unit(rng));
    if (dt == ncclFloat32) ((float*)p)[i] = v;
    else ((uint16_t*)p)[i] = dt == ncclFloat16 ? f2h(v) : f2bf(v);
  }
}

/* K distinct experts per token: uniform, or Zipf-skewed over the expert ids. */
static void make_routing(int64_t* idx, int t, int k, int e, int routing, double zs, uint64_t* rng) {
  double* cdf = NULL;
  if (routing == 1) {
    cdf = (double*)malloc(sizeof(double) * e);
    double acc = 0;
    for (int i = 0; i < e; ++i) cdf[i] = (acc += 1.0 / pow(i + 1, zs));
    for (int i = 0; i < e; ++i) cdf[i] /= acc;
  }
  for (int i = 0; i < t; ++i) {
    for (int j = 0; j < k; ++j) {
      int64_t x;
      int dup;
      do {
        if (cdf) {
          double u = rng_unit(rng);
          int lo = 0, hi = e - 1;
          while (lo < hi) {
            int mid = (lo + hi) / 2;
            if (cdf[mid] < u) lo = mid + 1; else hi = mid;
          }
          x = lo;
        } else {
          x = (int64_t)(rng_next(rng) % (uint64_t)e);
        }
        dup = 0;
        for (int q = 0; q < j; ++q) dup |= idx[(size_t)i * k + q] == x;
      } while (dup && k <= e);
      idx[(size_t)i * k + j] = x;
    }
  }
  free(cdf);
}

static ncclEpTensor_t tensor(void* data, ncclDataType_t dt, unsigned nd, size_t* sizes) {
  ncclEpTensor_t t = NCCL_EP_TENSOR_INIT;
  t.data = data;
  t.datatype = dt;
  t.ndim = nd;
  t.sizes = sizes;
  return t;
}

/* Everything one rank needs for one configuration. */
typedef struct {
  int dev;
  cudaStream_t s;
  ncclEpGroup_t g;
  ncclEpHandle_t h;
  void *x, *topk, *w, *out, *cnt, *oidx, *ow, *ein, *cw, *cout;
  size_t sx[2], st[2], sw[2], so[3], sc[1], sidx[3], sow[3], sein[3], scw[2], scout[2];
  ncclEpTensor_t tx, ttopk, tw, tout, tcnt, toidx, tow, tein, tcw, tcout;
  long long selections;
  cudaEvent_t ev[3];
  cudaGraphExec_t exec_d, exec_c; /* --graph: dispatch and combine captured separately */
} Rank;

static void rank_setup(Rank* r, const Opts* o, int nranks, uint64_t* rng) {
  int L = o->experts / nranks, T = o->tokens, H = o->hidden, K = o->topk, B = o->tokens, N = nranks;
  int em = o->layout == NCCL_EP_LAYOUT_EXPERT_MAJOR;
  CK(cudaSetDevice(r->dev));
  size_t eb = elem_bytes(o->dtype);
  size_t xb = (size_t)T * H * eb, tb = (size_t)T * K * 8, wb = (size_t)T * K * 4;
  size_t rows = em ? (size_t)L * N * B : (size_t)N * B;
  size_t ob = rows * H * eb;
  CK(cudaMalloc(&r->x, xb ? xb : 16));
  CK(cudaMalloc(&r->topk, tb ? tb : 16));
  CK(cudaMalloc(&r->w, wb ? wb : 16));
  CK(cudaMalloc(&r->out, ob));
  CK(cudaMalloc(&r->cnt, 4 * (size_t)(L > N ? L : N)));
  CK(cudaMalloc(&r->oidx, (size_t)N * B * K * 4));
  CK(cudaMalloc(&r->ow, (size_t)N * B * K * 4));
  CK(cudaMalloc(&r->ein, ob));
  CK(cudaMalloc(&r->cw, wb ? wb : 16));
  CK(cudaMalloc(&r->cout, xb ? xb : 16));
  void* hx = malloc(xb + 4);
  fill_tokens(hx, xb / eb, o->dtype, -4, 8, rng);
  int64_t* ht = (int64_t*)malloc(tb + 8);
  make_routing(ht, T, K, o->experts, o->routing, o->zipf_s, rng);
  float* hw = (float*)malloc(wb + 4);
  for (size_t i = 0; i < wb / 4; ++i) hw[i] = (float)rng_unit(rng);
  r->selections = 0;
  for (size_t i = 0; i < (size_t)T * K; ++i) r->selections += ht[i] >= 0;
  CK(cudaMemcpy(r->x, hx, xb, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(r->topk, ht, tb, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(r->w, hw, wb, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(r->cw, hw, wb, cudaMemcpyHostToDevice));
  /* Expert outputs: random too (never zeros). */
  void* he = malloc(ob);
  fill_tokens(he, ob / eb, o->dtype, -1, 2, rng);
  CK(cudaMemcpy(r->ein, he, ob, cudaMemcpyHostToDevice));
  free(hx);
  free(ht);
  free(hw);
  free(he);
  r->sx[0] = T; r->sx[1] = H;
  r->st[0] = T; r->st[1] = K;
  r->sw[0] = T; r->sw[1] = K;
  if (em) { r->so[0] = L; r->so[1] = (size_t)N * B; r->so[2] = H; }
  else { r->so[0] = N; r->so[1] = B; r->so[2] = H; }
  memcpy(r->sein, r->so, sizeof r->so);
  r->sc[0] = em ? L : N;
  r->sidx[0] = N; r->sidx[1] = B; r->sidx[2] = K;
  memcpy(r->sow, r->sidx, sizeof r->sidx);
  r->scw[0] = T; r->scw[1] = K;
  r->scout[0] = T; r->scout[1] = H;
  r->tx = tensor(r->x, (ncclDataType_t)o->dtype, 2, r->sx);
  r->ttopk = tensor(r->topk, ncclInt64, 2, r->st);
  r->tw = tensor(r->w, ncclFloat32, 2, r->sw);
  r->tout = tensor(r->out, (ncclDataType_t)o->dtype, 3, r->so);
  r->tcnt = tensor(r->cnt, ncclInt32, 1, r->sc);
  r->toidx = tensor(r->oidx, ncclInt32, 3, r->sidx);
  r->tow = tensor(r->ow, ncclFloat32, 3, r->sow);
  r->tein = tensor(r->ein, (ncclDataType_t)o->dtype, 3, r->sein);
  r->tcw = tensor(r->cw, ncclFloat32, 2, r->scw);
  r->tcout = tensor(r->cout, (ncclDataType_t)o->dtype, 2, r->scout);
  for (int i = 0; i < 3; ++i) CK(cudaEventCreate(&r->ev[i]));
  r->exec_d = r->exec_c = NULL;
}

static void rank_free(Rank* r) {
  CK(cudaSetDevice(r->dev));
  void* p[] = {r->x, r->topk, r->w, r->out, r->cnt, r->oidx, r->ow, r->ein, r->cw, r->cout};
  for (unsigned i = 0; i < sizeof p / sizeof p[0]; ++i) CK(cudaFree(p[i]));
  for (int i = 0; i < 3; ++i) CK(cudaEventDestroy(r->ev[i]));
  if (r->exec_d) CK(cudaGraphExecDestroy(r->exec_d));
  if (r->exec_c) CK(cudaGraphExecDestroy(r->exec_c));
}

static double host_dispatch_us_acc;
static int host_dispatch_n;

static void do_dispatch(Rank* r, const Opts* o) {
  int em = o->layout == NCCL_EP_LAYOUT_EXPERT_MAJOR;
  ncclEpDispatchInputs_t in = NCCL_EP_DISPATCH_INPUTS_INIT;
  ncclEpDispatchOutputs_t out = NCCL_EP_DISPATCH_OUTPUTS_INIT;
  ncclEpLayoutInfo_t li = NCCL_EP_LAYOUT_INFO_INIT;
  ncclEpDispatchConfig_t cfg = NCCL_EP_DISPATCH_CONFIG_INIT;
  cfg.send_only = o->send_only;
  in.tokens = &r->tx;
  out.tokens = &r->tout;
  if (o->algorithm == NCCL_EP_ALGO_HIGH_THROUGHPUT) {
    /* HT forward: weights in; FLAT gets local ids + weights per row, EM one weight per row. */
    in.topk_weights = &r->tw;
    out.topk_weights = &r->tow;
    if (!em) out.topk_idx = &r->toidx;
  } else if (em) {
    li.expert_counters = &r->tcnt;
  } else {
    in.topk_weights = &r->tw;
    out.topk_idx = &r->toidx;
    out.topk_weights = &r->tow;
    li.src_rank_counters = &r->tcnt;
  }
  double t0 = now_us();
  EP(ncclEpDispatch(r->h, &in, &out, o->algorithm == NCCL_EP_ALGO_HIGH_THROUGHPUT ? NULL : &li, &cfg, r->s));
  host_dispatch_us_acc += now_us() - t0;
  host_dispatch_n++;
}

static void do_combine(Rank* r, const Opts* o) {
  ncclEpCombineInputs_t in = NCCL_EP_COMBINE_INPUTS_INIT;
  ncclEpCombineOutputs_t out = NCCL_EP_COMBINE_OUTPUTS_INIT;
  ncclEpCombineConfig_t cfg = NCCL_EP_COMBINE_CONFIG_INIT;
  cfg.send_only = o->send_only;
  in.tokens = &r->tein;
  out.tokens = &r->tcout;
  if (o->layout == NCCL_EP_LAYOUT_EXPERT_MAJOR && o->algorithm == NCCL_EP_ALGO_LOW_LATENCY)
    out.topk_weights = &r->tcw;
  EP(ncclEpCombine(r->h, &in, &out, &cfg, r->s));
}

static void do_complete(Rank* r) { EP(ncclEpComplete(r->h, NULL, r->s)); }

typedef struct {
  Stat disp, comb, total;
  double host_us, disp_gbs, comb_gbs, buf_mib, mem_mib;
  long long bytes;     /* selection bytes of this process's ranks */
  long long in_bytes;  /* token bytes of this process's ranks */
  /* HT: HBM bytes dispatch and combine must move (read + write), when they differ (else 0). */
  long long floor_d_bytes, floor_c_bytes;
} Result;

/* Floor: the bytes that must cross HBM (each input token read once, each selection row written
 * once; the reverse for combine) at the copy bandwidth measured in this run (read + write). */
static double floor_us(const Result* r, double copy_gbs) {
  return (double)(r->bytes + r->in_bytes) / (copy_gbs * 1e9) * 1e6;
}

static double floor_d_us(const Result* r, double copy_gbs) {
  return r->floor_d_bytes ? (double)r->floor_d_bytes / (copy_gbs * 1e9) * 1e6 : floor_us(r, copy_gbs);
}

static double floor_c_us(const Result* r, double copy_gbs) {
  return r->floor_c_bytes ? (double)r->floor_c_bytes / (copy_gbs * 1e9) * 1e6 : floor_us(r, copy_gbs);
}

/* Device-to-device copy bandwidth (read + write counted), median of 10 copies of 1 GiB. */
static double copy_bandwidth_gbs(int dev) {
  size_t n = (size_t)1 << 30;
  void *a, *b;
  CK(cudaSetDevice(dev));
  CK(cudaMalloc(&a, n));
  CK(cudaMalloc(&b, n));
  CK(cudaMemset(a, 1, n));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  double v[10];
  CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
  for (int i = 0; i < 10; ++i) {
    CK(cudaEventRecord(e0, 0));
    CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice, 0));
    CK(cudaEventRecord(e1, 0));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    v[i] = 2.0 * n / (ms * 1e-3) / 1e9;
  }
  CK(cudaFree(a));
  CK(cudaFree(b));
  CK(cudaEventDestroy(e0));
  CK(cudaEventDestroy(e1));
  return stats(v, 10).p50;
}

static double max_elapsed(Rank* rk, int n, int a, int b) {
  double m = 0;
  for (int i = 0; i < n; ++i) {
    float ms;
    CK(cudaEventElapsedTime(&ms, rk[i].ev[a], rk[i].ev[b]));
    if (ms * 1e3 > m) m = ms * 1e3;
  }
  return m;
}

/* Warm-up and timed rounds of dispatch then combine on every rank of this process; per round the
 * slowest rank's dispatch, combine and total GPU time; their statistics and the mean host time of
 * one dispatch call go into res. */
static void timed_rounds(Rank* rk, int nlocal, const Opts* o, Result* res) {
  int iters = o->iters;
  double* d = (double*)malloc(sizeof(double) * iters);
  double* c = (double*)malloc(sizeof(double) * iters);
  double* tt = (double*)malloc(sizeof(double) * iters);
  if (o->graph) {
    /* Warm once so kernels are compiled outside the capture. */
    for (int i = 0; i < nlocal; ++i) do_dispatch(&rk[i], o);
    for (int i = 0; i < nlocal; ++i) if (o->send_only) do_complete(&rk[i]);
    for (int i = 0; i < nlocal; ++i) do_combine(&rk[i], o);
    for (int i = 0; i < nlocal; ++i) if (o->send_only) do_complete(&rk[i]);
    CK(cudaDeviceSynchronize());
    for (int i = 0; i < nlocal; ++i) {
      cudaGraph_t g;
      CK(cudaStreamBeginCapture(rk[i].s, cudaStreamCaptureModeRelaxed));
      do_dispatch(&rk[i], o);
      if (o->send_only) do_complete(&rk[i]);
      CK(cudaStreamEndCapture(rk[i].s, &g));
      CK(cudaGraphInstantiate(&rk[i].exec_d, g, 0));
      CK(cudaGraphDestroy(g));
      CK(cudaStreamBeginCapture(rk[i].s, cudaStreamCaptureModeRelaxed));
      do_combine(&rk[i], o);
      if (o->send_only) do_complete(&rk[i]);
      CK(cudaStreamEndCapture(rk[i].s, &g));
      CK(cudaGraphInstantiate(&rk[i].exec_c, g, 0));
      CK(cudaGraphDestroy(g));
    }
  }
  host_dispatch_us_acc = 0;
  host_dispatch_n = 0;
  for (int it = -o->warmup; it < iters; ++it) {
    if (it == 0) {
      host_dispatch_us_acc = 0;
      host_dispatch_n = 0;
    }
    /* The first warm-up runs ungated: loading a kernel module may wait for the device, which
     * would never become idle behind a closed gate. */
    const int gated = it > -o->warmup || o->graph;
    if (gated)
      for (int i = 0; i < nlocal; ++i) gate_close(rk[i].s);
    for (int i = 0; i < nlocal; ++i) CK(cudaEventRecord(rk[i].ev[0], rk[i].s));
    if (o->graph) {
      for (int i = 0; i < nlocal; ++i) CK(cudaGraphLaunch(rk[i].exec_d, rk[i].s));
      for (int i = 0; i < nlocal; ++i) CK(cudaEventRecord(rk[i].ev[1], rk[i].s));
      for (int i = 0; i < nlocal; ++i) CK(cudaGraphLaunch(rk[i].exec_c, rk[i].s));
    } else {
      for (int i = 0; i < nlocal; ++i) do_dispatch(&rk[i], o);
      if (o->send_only)
        for (int i = 0; i < nlocal; ++i) do_complete(&rk[i]);
      for (int i = 0; i < nlocal; ++i) CK(cudaEventRecord(rk[i].ev[1], rk[i].s));
      for (int i = 0; i < nlocal; ++i) do_combine(&rk[i], o);
      if (o->send_only)
        for (int i = 0; i < nlocal; ++i) do_complete(&rk[i]);
    }
    for (int i = 0; i < nlocal; ++i) CK(cudaEventRecord(rk[i].ev[2], rk[i].s));
    if (gated) gate_open();
    for (int i = 0; i < nlocal; ++i) CK(cudaStreamSynchronize(rk[i].s));
    CK(cudaGetLastError());
    if (it >= 0) {
      d[it] = max_elapsed(rk, nlocal, 0, 1);
      c[it] = max_elapsed(rk, nlocal, 1, 2);
      tt[it] = max_elapsed(rk, nlocal, 0, 2);
    }
  }
  res->disp = stats(d, iters);
  res->comb = stats(c, iters);
  res->total = stats(tt, iters);
  res->host_us = host_dispatch_n ? host_dispatch_us_acc / host_dispatch_n : 0;
  free(d);
  free(c);
  free(tt);
}

/* One configuration: create groups and handles, warm up, time, tear down. */
static Result run_config(const Opts* o, int nranks, int first_rank, int nlocal, ncclComm_t comm,
                         local_groups_fn mk_local, buffer_size_fn bufsz) {
  Result res;
  memset(&res, 0, sizeof res);
  ncclEpGroupConfig_t cfg = NCCL_EP_GROUP_CONFIG_INIT;
  cfg.algorithm = (ncclEpAlgorithm_t)o->algorithm;
  cfg.num_experts = o->experts;
  cfg.max_dispatch_tokens_per_rank = o->tokens;
  cfg.max_token_bytes = o->hidden * (unsigned)elem_bytes(o->dtype);
  cfg.enable_mask = o->mask;
  Rank* rk = (Rank*)calloc(nlocal, sizeof(Rank));
  ncclEpGroup_t* groups = (ncclEpGroup_t*)calloc(nlocal, sizeof(ncclEpGroup_t));
  int dev0;
  CK(cudaGetDevice(&dev0));
  size_t free0, free1, total;
  CK(cudaDeviceSynchronize());
  CK(cudaMemGetInfo(&free0, &total));
  if (comm) {
    EP(ncclEpCreateGroup(&groups[0], comm, &cfg));
  } else {
    EP(mk_local(groups, nlocal, NULL, &cfg));
  }
  uint64_t rng = o->seed;
  for (int i = 0; i < nlocal; ++i) {
    rk[i].dev = dev0;
    rk[i].g = groups[i];
    CK(cudaStreamCreateWithFlags(&rk[i].s, cudaStreamNonBlocking));
    for (int j = 0; j < first_rank + i; ++j) rng_next(&rng);
    rank_setup(&rk[i], o, nranks, &rng);
  }
  for (int i = 0; i < nlocal; ++i)
    EP(ncclEpCreateHandle(&rk[i].h, rk[i].g, (ncclEpLayout_t)o->layout, &rk[i].ttopk, NULL, NULL, rk[i].s));
  CK(cudaDeviceSynchronize());
  CK(cudaMemGetInfo(&free1, &total));
  /* Library memory only: our own tensors were allocated between the two readings too. */
  size_t ours = 0;
  {
    int L = o->experts / nranks, N = nranks, T = o->tokens, H = o->hidden, K = o->topk;
    size_t rows = o->layout == NCCL_EP_LAYOUT_EXPERT_MAJOR ? (size_t)L * N * T : (size_t)N * T;
    size_t eb = elem_bytes(o->dtype);
    ours = (size_t)nlocal * (2 * rows * H * eb + 2 * (size_t)T * H * eb + (size_t)T * K * 16 + 2 * (size_t)N * T * K * 4);
  }
  res.mem_mib = ((double)(free0 - free1) - (double)ours) / nlocal / 1048576.0;
  if (bufsz) {
    size_t b = 0;
    if (bufsz(&cfg, nranks, (ncclEpLayout_t)o->layout, o->topk, &b) == ncclSuccess) res.buf_mib = b / 1048576.0;
  }
  timed_rounds(rk, nlocal, o, &res);
  long long sel = 0;
  for (int i = 0; i < nlocal; ++i) sel += rk[i].selections;
  res.bytes = sel * (long long)o->hidden * (long long)elem_bytes(o->dtype);
  res.in_bytes = (long long)nlocal * o->tokens * o->hidden * (long long)elem_bytes(o->dtype);
  /* Per-rank bandwidth by upstream's definition (mean selections per rank). */
  double per_rank = (double)res.bytes / nlocal;
  res.disp_gbs = res.disp.p50 > 0 ? per_rank / (res.disp.p50 * 1e-6) / 1e9 : 0;
  res.comb_gbs = res.comb.p50 > 0 ? per_rank / (res.comb.p50 * 1e-6) / 1e9 : 0;
  for (int i = 0; i < nlocal; ++i) {
    EP(ncclEpHandleDestroy(rk[i].h));
    rank_free(&rk[i]);
  }
  for (int i = 0; i < nlocal; ++i) {
    EP(ncclEpGroupDestroy(rk[i].g));
    CK(cudaStreamDestroy(rk[i].s));
  }
  free(rk);
  free(groups);
  return res;
}

/* ---- High-throughput mode ------------------------------------------------------------------ */

/* Rank r's routing for HT: K distinct experts per token from its own seed, so that every process
 * can regenerate every rank's routing (the receive counts need all of them). */
static void ht_routing(int64_t* idx, const Opts* o, int rank) {
  uint64_t rng = o->seed * 1000003ull + (uint64_t)rank;
  make_routing(idx, o->tokens, o->topk, o->experts, o->routing, o->zipf_s, &rng);
}

/* HT: FLAT or EXPERT_MAJOR, forward. Bandwidth as upstream ep_bench defines it for HT on one
 * node: received tokens (distinct (source rank, token) pairs with an expert here) x row bytes,
 * per rank, divided by the phase time. The floor counts each received row read once and written
 * once (dispatch), and each contribution read once plus each output row written once (combine). */
static Result run_config_ht(const Opts* o, int nranks, int first_rank, int nlocal, ncclComm_t comm,
                            local_groups_fn mk_local, buffer_size_fn bufsz) {
  Result res;
  memset(&res, 0, sizeof res);
  int T = o->tokens, H = o->hidden, K = o->topk, E = o->experts, N = nranks, L = E / N;
  int em = o->layout == NCCL_EP_LAYOUT_EXPERT_MAJOR;
  /* Every rank's receive rows (FLAT tokens, EM (token, expert) pairs) from all routings. */
  int64_t* idx = (int64_t*)malloc(sizeof(int64_t) * (size_t)T * K + 8);
  long long* recv_tok = (long long*)calloc(N, sizeof(long long));
  long long* recv_rows = (long long*)calloc(N, sizeof(long long));
  for (int s = 0; s < N; ++s) {
    ht_routing(idx, o, s);
    for (int t = 0; t < T; ++t) {
      unsigned char hit[1024];
      memset(hit, 0, N < 1024 ? N : 1024);
      for (int k = 0; k < K; ++k) {
        int64_t e = idx[(size_t)t * K + k];
        if (e < 0) continue;
        int dup = 0;
        for (int q = 0; q < k; ++q) dup |= idx[(size_t)t * K + q] == e;
        if (dup) continue;
        recv_rows[e / L]++;
        hit[e / L] = 1;
      }
      for (int d = 0; d < N; ++d) recv_tok[d] += hit[d];
    }
  }
  long long S = 0;
  for (int d = 0; d < N; ++d) {
    long long v = em ? recv_rows[d] : recv_tok[d];
    if (v > S) S = v;
  }
  if (S < T) S = T;
  ncclEpGroupConfig_t cfg = NCCL_EP_GROUP_CONFIG_INIT;
  cfg.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT;
  cfg.num_experts = E;
  cfg.max_dispatch_tokens_per_rank = T;
  cfg.max_recv_tokens_per_rank = (unsigned)S;
  size_t eb = elem_bytes(o->dtype);
  cfg.max_token_bytes = H * (unsigned)eb;
  Rank* rk = (Rank*)calloc(nlocal, sizeof(Rank));
  ncclEpGroup_t* groups = (ncclEpGroup_t*)calloc(nlocal, sizeof(ncclEpGroup_t));
  int dev0;
  CK(cudaGetDevice(&dev0));
  /* Library memory: measured around group creation and around handle creation only, so the
   * benchmark's own tensors (allocated in between) are not counted. */
  size_t f0, f1, f2, f3, total;
  CK(cudaDeviceSynchronize());
  CK(cudaMemGetInfo(&f0, &total));
  if (comm) {
    EP(ncclEpCreateGroup(&groups[0], comm, &cfg));
  } else {
    EP(mk_local(groups, nlocal, NULL, &cfg));
  }
  CK(cudaDeviceSynchronize());
  CK(cudaMemGetInfo(&f1, &total));
  uint64_t rng = o->seed + 17;
  size_t xb = (size_t)T * H * eb, ob = (size_t)S * H * eb;
  void* hx = malloc(xb + 4);
  void* he = malloc(ob);
  float* hw = (float*)malloc((size_t)T * K * 4 + 4);
  for (size_t i = 0; i < (size_t)T * K; ++i) hw[i] = (float)rng_unit(&rng);
  fill_tokens(hx, xb / eb, o->dtype, -4, 8, &rng);
  fill_tokens(he, ob / eb, o->dtype, -1, 2, &rng);
  for (int i = 0; i < nlocal; ++i) {
    Rank* r = &rk[i];
    r->dev = dev0;
    r->g = groups[i];
    CK(cudaStreamCreateWithFlags(&r->s, cudaStreamNonBlocking));
    CK(cudaMalloc(&r->x, xb ? xb : 16));
    CK(cudaMalloc(&r->topk, (size_t)T * K * 8 + 16));
    CK(cudaMalloc(&r->w, (size_t)T * K * 4 + 16));
    CK(cudaMalloc(&r->out, ob));
    CK(cudaMalloc(&r->oidx, (size_t)S * K * 8));
    CK(cudaMalloc(&r->ow, (size_t)S * K * 4));
    CK(cudaMalloc(&r->ein, ob));
    CK(cudaMalloc(&r->cout, xb ? xb : 16));
    ht_routing(idx, o, first_rank + i);
    CK(cudaMemcpy(r->topk, idx, (size_t)T * K * 8, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(r->x, hx, xb, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(r->w, hw, (size_t)T * K * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(r->ein, he, ob, cudaMemcpyHostToDevice));
    r->sx[0] = T; r->sx[1] = H;
    r->st[0] = T; r->st[1] = K;
    r->so[0] = S; r->so[1] = H;
    r->sidx[0] = S; r->sidx[1] = K;
    r->sow[0] = S; r->sow[1] = K;
    memcpy(r->sein, r->so, sizeof r->so);
    r->tx = tensor(r->x, (ncclDataType_t)o->dtype, 2, r->sx);
    r->ttopk = tensor(r->topk, ncclInt64, 2, r->st);
    r->tw = tensor(r->w, ncclFloat32, 2, r->st);
    r->tout = tensor(r->out, (ncclDataType_t)o->dtype, 2, r->so);
    r->toidx = tensor(r->oidx, ncclInt64, 2, r->sidx);
    r->tow = tensor(r->ow, ncclFloat32, em ? 1 : 2, r->sow);
    r->tein = tensor(r->ein, (ncclDataType_t)o->dtype, 2, r->sein);
    r->tcout = tensor(r->cout, (ncclDataType_t)o->dtype, 2, r->sx);
    for (int j = 0; j < 3; ++j) CK(cudaEventCreate(&r->ev[j]));
  }
  free(hx);
  free(he);
  free(hw);
  CK(cudaDeviceSynchronize());
  CK(cudaMemGetInfo(&f2, &total));
  for (int i = 0; i < nlocal; ++i)
    EP(ncclEpCreateHandle(&rk[i].h, rk[i].g, (ncclEpLayout_t)o->layout, &rk[i].ttopk, NULL, NULL, rk[i].s));
  CK(cudaDeviceSynchronize());
  CK(cudaMemGetInfo(&f3, &total));
  res.mem_mib = ((double)f0 - (double)f1 + (double)f2 - (double)f3) / nlocal / 1048576.0;
  if (bufsz) {
    size_t b = 0;
    if (bufsz(&cfg, nranks, (ncclEpLayout_t)o->layout, K, &b) == ncclSuccess) res.buf_mib = b / 1048576.0;
  }
  timed_rounds(rk, nlocal, o, &res);
  long long tok = 0, rows = 0;
  for (int i = 0; i < nlocal; ++i) {
    tok += recv_tok[first_rank + i];
    rows += recv_rows[first_rank + i];
  }
  long long rb = (long long)H * (long long)eb;
  res.bytes = tok * rb;
  res.in_bytes = (long long)nlocal * T * rb;
  res.floor_d_bytes = 2 * (em ? rows : tok) * rb;
  res.floor_c_bytes = (em ? rows : tok) * rb + res.in_bytes;
  double per_rank = (double)res.bytes / nlocal;
  res.disp_gbs = res.disp.p50 > 0 ? per_rank / (res.disp.p50 * 1e-6) / 1e9 : 0;
  res.comb_gbs = res.comb.p50 > 0 ? per_rank / (res.comb.p50 * 1e-6) / 1e9 : 0;
  for (int i = 0; i < nlocal; ++i) {
    Rank* r = &rk[i];
    EP(ncclEpHandleDestroy(r->h));
    void* p[] = {r->x, r->topk, r->w, r->out, r->oidx, r->ow, r->ein, r->cout};
    for (unsigned j = 0; j < sizeof p / sizeof p[0]; ++j) CK(cudaFree(p[j]));
    for (int j = 0; j < 3; ++j) CK(cudaEventDestroy(r->ev[j]));
    if (r->exec_d) CK(cudaGraphExecDestroy(r->exec_d));
    if (r->exec_c) CK(cudaGraphExecDestroy(r->exec_c));
    EP(ncclEpGroupDestroy(r->g));
    CK(cudaStreamDestroy(r->s));
  }
  free(idx);
  free(recv_tok);
  free(recv_rows);
  free(rk);
  free(groups);
  return res;
}

static void usage(void) {
  fprintf(stderr,
          "usage: ep_bench [--local-ranks N] [--mode ll|ht] [--layout em|rm|flat] [--tokens T]\n"
          "                [--hidden H] [--top-k K] [--experts E] [--routing uniform|zipf] [--zipf-s S]\n"
          "                [--dtype bf16|fp16|fp32] [--seed S] [--warmup W] [--iters I] [--send-only]\n"
          "                [--graph] [--mask]\n"
          "                [--sweep-tokens 1,2,4,...] [--sweep-hidden 2048,4096,...] [--csv FILE]\n"
          "                [--plot FILE.png] [--label TEXT]\n");
}

static int parse_list(const char* s, int* out, int max) {
  int n = 0;
  while (s && *s && n < max) {
    out[n++] = atoi(s);
    s = strchr(s, ',');
    if (s) ++s;
  }
  return n;
}

int main(int argc, char** argv) {
  Opts o = {NCCL_EP_ALGO_LOW_LATENCY, NCCL_EP_LAYOUT_EXPERT_MAJOR, 128, 7168, 8, 256, 0, 10, 50, 0, 0, 0, 0,
            ncclBfloat16, 1.1, 1, NULL, NULL, NULL, NULL, ""};
  for (int i = 1; i < argc; ++i) {
    const char* a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : NULL;
#define ARG(name) (!strcmp(a, name) && v && (++i, 1))
    if (ARG("--local-ranks")) o.local_ranks = atoi(v);
    else if (ARG("--algorithm") || ARG("--mode"))
      o.algorithm = !strcmp(v, "ht") ? NCCL_EP_ALGO_HIGH_THROUGHPUT : NCCL_EP_ALGO_LOW_LATENCY;
    else if (ARG("--layout"))
      o.layout = !strcmp(v, "rm") ? NCCL_EP_LAYOUT_RANK_MAJOR : !strcmp(v, "flat") || !strcmp(v, "fl") ? NCCL_EP_LAYOUT_FLAT : NCCL_EP_LAYOUT_EXPERT_MAJOR;
    else if (ARG("--tokens")) o.tokens = atoi(v);
    else if (ARG("--hidden")) o.hidden = atoi(v);
    else if (ARG("--top-k")) o.topk = atoi(v);
    else if (ARG("--experts")) o.experts = atoi(v);
    else if (ARG("--routing")) o.routing = !strcmp(v, "zipf") || !strcmp(v, "skewed");
    else if (ARG("--zipf-s")) o.zipf_s = atof(v);
    else if (ARG("--dtype") || ARG("--datatype")) {
      if (!strcmp(v, "bf16")) o.dtype = ncclBfloat16;
      else if (!strcmp(v, "fp16")) o.dtype = ncclFloat16;
      else if (!strcmp(v, "fp32")) o.dtype = ncclFloat32;
      else {
        usage();
        return 2;
      }
    }
    else if (ARG("--seed")) o.seed = strtoull(v, NULL, 10);
    else if (ARG("--warmup")) o.warmup = atoi(v);
    else if (ARG("--iters")) o.iters = atoi(v);
    else if (ARG("--csv")) o.csv = v;
    else if (ARG("--plot")) o.plot = v;
    else if (ARG("--sweep-tokens")) o.sweep_tokens = v;
    else if (ARG("--sweep-hidden")) o.sweep_hidden = v;
    else if (ARG("--label")) o.label = v;
    else if (!strcmp(a, "--send-only")) o.send_only = 1;
    else if (!strcmp(a, "--graph")) o.graph = 1;
    else if (!strcmp(a, "--mask")) o.mask = 1;
    else {
      usage();
      return 2;
    }
#undef ARG
  }
  if (o.iters < 1 || o.tokens < 1 || o.hidden < 8 || o.topk < 1 || o.experts < 1) {
    usage();
    return 2;
  }
  int ndev = 0;
  if (cudaGetDeviceCount(&ndev) != cudaSuccess || ndev == 0) {
    fprintf(stderr, "ep_bench: no CUDA device found; the benchmark needs a GPU\n");
    return 1;
  }
  ext_last_error = (const char* (*)(void))dlsym(RTLD_DEFAULT, "ncclEpxGetLastError");
  gate_init();
  local_groups_fn mk_local = (local_groups_fn)dlsym(RTLD_DEFAULT, "ncclEpxCreateLocalGroups");
  buffer_size_fn bufsz = (buffer_size_fn)dlsym(RTLD_DEFAULT, "ncclEpxBufferSize");

  int world = 1, me = 0, nlocal = 1;
  ncclComm_t comm = NULL;
#ifdef EP_BENCH_MPI
  if (o.local_ranks == 0) {
    MPI_Init(&argc, &argv);
    MPI_Comm_size(MPI_COMM_WORLD, &world);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    CK(cudaSetDevice(me % ndev));
    ncclUniqueId id;
    if (me == 0) ncclGetUniqueId(&id);
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
    if (ncclCommInitRank(&comm, world, id, me) != ncclSuccess) {
      fprintf(stderr, "ncclCommInitRank failed\n");
      return 3;
    }
  }
#endif
  if (!comm) {
    if (o.local_ranks < 1) o.local_ranks = 1;
    if (!mk_local) {
      fprintf(stderr, "ep_bench: this libnccl_ep has no ncclEpxCreateLocalGroups; run under MPI instead\n");
      return 1;
    }
    world = nlocal = o.local_ranks;
  }
  int dev;
  CK(cudaGetDevice(&dev));
  struct cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, dev));
  double copy_gbs = copy_bandwidth_gbs(dev);

  int toks[64], hids[64];
  int nt = o.sweep_tokens ? parse_list(o.sweep_tokens, toks, 64) : 0;
  int nh = o.sweep_hidden ? parse_list(o.sweep_hidden, hids, 64) : 0;
  if (!nt) toks[nt++] = o.tokens;
  if (!nh) hids[nh++] = o.hidden;
  FILE* csv = NULL;
  if (o.csv && me == 0) {
    csv = fopen(o.csv, "w");
    if (!csv) {
      perror(o.csv);
      return 2;
    }
    fprintf(csv,
            "gpu,label,ranks,algorithm,layout,tokens,hidden,topk,experts,routing,send_only,graph,"
            "dispatch_us_p50,dispatch_us_p10,dispatch_us_p90,combine_us_p50,combine_us_p10,combine_us_p90,"
            "total_us_p50,dispatch_gbs,combine_gbs,aggregate_dispatch_gbs,aggregate_combine_gbs,host_dispatch_us,"
            "buffer_mib,measured_mib_per_rank,copy_gbs,floor_us,dispatch_ratio,combine_ratio,dtype\n");
  }
  const char* lay = o.layout == NCCL_EP_LAYOUT_RANK_MAJOR ? "rm" : o.layout == NCCL_EP_LAYOUT_FLAT ? "flat" : "em";
  if (me == 0)
    printf("# %s, %d rank(s) (%s), copy bandwidth %.0f GB/s (read+write), %s %s %s, K=%d, E=%d, %s routing%s%s%s%s\n",
           prop.name, world, comm ? "MPI/NCCL" : "local group", copy_gbs,
           o.algorithm == NCCL_EP_ALGO_LOW_LATENCY ? "LL" : "HT", lay, dtype_name(o.dtype), o.topk, o.experts,
           o.routing ? "zipf" : "uniform", o.send_only ? ", send_only" : "", o.graph ? ", graph" : "",
           o.mask ? ", enable_mask" : "", gate_wait ? ", gated start" : ", no start gate (times include host launch)");
  int total = nt * nh, done = 0;
  Result* rows = (Result*)calloc(total, sizeof(Result));
  for (int ih = 0; ih < nh; ++ih) {
    for (int itk = 0; itk < nt; ++itk) {
      Opts c = o;
      c.tokens = toks[itk];
      c.hidden = hids[ih];
      if (me == 0 && total > 1) {
        fprintf(stderr, "\r[%d/%d] tokens=%d hidden=%d        ", done + 1, total, c.tokens, c.hidden);
        fflush(stderr);
      }
      Result r = c.algorithm == NCCL_EP_ALGO_HIGH_THROUGHPUT
                     ? run_config_ht(&c, world, comm ? me : 0, nlocal, comm, mk_local, bufsz)
                     : run_config(&c, world, comm ? me : 0, nlocal, comm, mk_local, bufsz);
      rows[done++] = r;
      /* Aggregate: all ranks of this process move their bytes in the same time. */
      double agg_d = r.disp_gbs * nlocal, agg_c = r.comb_gbs * nlocal, fl = floor_d_us(&r, copy_gbs);
      if (csv)
        fprintf(csv, "%s,%s,%d,%s,%s,%d,%d,%d,%d,%s,%d,%d,%.2f,%.2f,%.2f,%.2f,%.2f,%.2f,%.2f,%.1f,%.1f,%.1f,%.1f,%.2f,%.2f,%.2f,%.0f,%.2f,%.3f,%.3f,%s\n",
                prop.name, o.label, world, o.algorithm == NCCL_EP_ALGO_LOW_LATENCY ? "ll" : "ht", lay, c.tokens,
                c.hidden, c.topk, c.experts, o.routing ? "zipf" : "uniform", o.send_only, o.graph, r.disp.p50,
                r.disp.p10, r.disp.p90, r.comb.p50, r.comb.p10, r.comb.p90, r.total.p50, r.disp_gbs, r.comb_gbs,
                agg_d, agg_c, r.host_us, r.buf_mib, r.mem_mib, copy_gbs, fl, floor_d_us(&r, copy_gbs) / r.disp.p50,
                floor_c_us(&r, copy_gbs) / r.comb.p50, dtype_name(o.dtype));
    }
  }
  if (me == 0 && total > 1) fprintf(stderr, "\r%*s\r", 40, "");
  if (me == 0) {
    printf("%5s %6s %6s | %8s %8s %8s | %8s %8s %8s | %8s %8s | %9s %9s | %6s | %7s %7s | %7s %6s %6s\n", "ranks",
           "tokens", "hidden", "disp p50", "p10", "p90", "comb p50", "p10", "p90", "disp", "comb", "agg disp",
           "agg comb", "host", "buf", "meas", "floor", "d/flr", "c/flr");
    printf("%5s %6s %6s | %8s %8s %8s | %8s %8s %8s | %8s %8s | %9s %9s | %6s | %7s %7s | %7s %6s %6s\n", "", "", "",
           "us", "us", "us", "us", "us", "us", "GB/s", "GB/s", "GB/s", "GB/s", "us", "MiB", "MiB", "us", "", "");
    int i = 0;
    for (int ih = 0; ih < nh; ++ih)
      for (int itk = 0; itk < nt; ++itk, ++i) {
        Result r = rows[i];
        double agg_d = r.disp_gbs * nlocal, agg_c = r.comb_gbs * nlocal, fl = floor_d_us(&r, copy_gbs);
        printf("%5d %6d %6d | %8.2f %8.2f %8.2f | %8.2f %8.2f %8.2f | %8.1f %8.1f | %9.1f %9.1f | %6.2f | %7.1f %7.1f | %7.2f %6.3f %6.3f\n",
               world, toks[itk], hids[ih], r.disp.p50, r.disp.p10, r.disp.p90, r.comb.p50, r.comb.p10, r.comb.p90,
               r.disp_gbs, r.comb_gbs, agg_d, agg_c, r.host_us, r.buf_mib, r.mem_mib, fl,
               floor_d_us(&r, copy_gbs) / r.disp.p50, floor_c_us(&r, copy_gbs) / r.comb.p50);
      }
  }
  if (csv) fclose(csv);
  if (o.plot && o.csv && me == 0) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "python3 \"%s/plot_bench.py\" \"%s\" \"%s\"", getenv("EP_BENCH_SCRIPTS") ? getenv("EP_BENCH_SCRIPTS") : "scripts", o.csv, o.plot);
    if (system(cmd) != 0) fprintf(stderr, "ep_bench: plotting failed (needs python3 with matplotlib): %s\n", cmd);
  }
  free(rows);
#ifdef EP_BENCH_MPI
  if (comm) {
    ncclCommDestroy(comm);
    MPI_Finalize();
  }
#endif
  return 0;
}
