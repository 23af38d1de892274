// Where cuLaunchKernel's host time goes for our kernels (issue 15): the same launch of
//  (a) a trivial kernel built into this program (runtime-registered), 8-byte and LlParams-size params,
//  (b) a trivial kernel taking LlParams, in a cubin loaded with cuModuleLoadData (our loading path),
//  (c) our real ll_dispatch / ll_combine cubins (nvcc -cubin of the concatenated NVRTC source), phases = 0
//      (the kernel reads its state and returns), smem 0 and 6 KiB, grid 132 and 16.
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <algorithm>
#include <vector>
#include "../../kernels/ep_device.cuh"
#include "../../kernels/ep_params.cuh"
#define CK(x) do { auto e_ = (x); if (e_ != 0) { printf("error %d at %s:%d\n", (int)e_, __FILE__, __LINE__); exit(1); } } while (0)
__global__ void k8(u64 a) { if (a == 12345) printf("x"); }
__global__ void kll(LlParams p) { if (p.x == 12345) printf("x"); }
static double now() { timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec * 1e-3; }
static void bench(const char* label, CUfunction f, void** args, int grid, int threads, int smem, cudaStream_t s) {
  if (smem > 48 * 1024) CK(cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem));
  std::vector<double> t;
  cudaEvent_t e; CK(cudaEventCreate(&e));
  for (int i = 0; i < 3000; ++i) {
    CK(cudaEventRecord(e, s));
    double t0 = now();
    CK(cuLaunchKernel(f, grid, 1, 1, threads, 1, 1, smem, (CUstream)s, args, nullptr));
    double t1 = now();
    CK(cudaStreamSynchronize(s));
    if (i >= 100) t.push_back(t1 - t0);
  }
  std::sort(t.begin(), t.end());
  printf("%-44s grid %3d threads %4d smem %5d: p10 %.2f p50 %.2f p90 %.2f us\n", label, grid, threads, smem,
         t[t.size() / 10], t[t.size() / 2], t[t.size() * 9 / 10]);
}
static CUfunction load(const char* path, const char* name) {
  FILE* f = fopen(path, "rb"); if (!f) { printf("no %s\n", path); exit(1); }
  fseek(f, 0, SEEK_END); long n = ftell(f); fseek(f, 0, SEEK_SET);
  std::vector<char> b(n); if (fread(b.data(), 1, n, f) != (size_t)n) exit(1); fclose(f);
  CUmodule m; CK(cuModuleLoadData(&m, b.data())); CUfunction fn; CK(cuModuleGetFunction(&fn, m, name));
  return fn;
}
int main(int argc, char** argv) {
  CK(cudaSetDevice(0)); cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  void* state; CK(cudaMalloc(&state, 4096)); CK(cudaMemset(state, 0, 4096));
  LlParams p; memset(&p, 0, sizeof p); p.state = (u64)state; p.err = (u64)state + 1024; p.nranks = 1; p.phases = 0;
  u64 a8 = 0; void* args8[] = {&a8}; void* argsP[] = {&p};
  printf("sizeof(LlParams) = %zu\n", sizeof(LlParams));
  cudaFunction_t rf;
  CK(cudaGetFuncBySymbol(&rf, (const void*)k8)); bench("runtime trivial, 8 B", (CUfunction)rf, args8, 132, 512, 0, s);
  CK(cudaGetFuncBySymbol(&rf, (const void*)kll)); bench("runtime trivial, LlParams", (CUfunction)rf, argsP, 132, 512, 0, s);
  CUfunction triv = load(argv[1], "trivial_ll");
  bench("cubin trivial, LlParams", triv, argsP, 132, 512, 0, s);
  bench("cubin trivial, LlParams, smem 6K", triv, argsP, 132, 512, 6144, s);
  for (int i = 2; i + 1 < argc; i += 2) {
    CUfunction f = load(argv[i], argv[i + 1]);
    int nreg = 0; cuFuncGetAttribute(&nreg, CU_FUNC_ATTRIBUTE_NUM_REGS, f);
    printf("%s: %d registers\n", argv[i], nreg);
    bench(argv[i + 1], f, argsP, 132, 512, 0, s);
    bench(argv[i + 1], f, argsP, 132, 512, 6144, s);
    bench(argv[i + 1], f, argsP, 16, 512, 0, s);
  }
  return 0;
}
