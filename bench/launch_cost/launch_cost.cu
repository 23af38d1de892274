// Host cost of one cuLaunchKernel on this machine, by parameter block size (issue 15 host time; bench/launch_cost/run.sh).
#include <cuda.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <time.h>
#include <algorithm>
#include <vector>
#define CK(x) do { auto e_ = (x); if (e_ != 0) { printf("error %d at %s:%d\n", (int)e_, __FILE__, __LINE__); return 1; } } while (0)
template <int N> struct P { unsigned long long v[N]; };
template <int N> __global__ void k(P<N> p) { if (p.v[0] == 12345) p.v[1]++; }
static double now() { timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e6 + t.tv_nsec * 1e-3; }
template <int N> int run(const char* label, cudaStream_t s, int grid, int sync_each) {
  cudaFunction_t rf; CK(cudaGetFuncBySymbol(&rf, (const void*)k<N>)); CUfunction f = (CUfunction)rf;
  P<N> p{}; void* args[] = {&p};
  std::vector<double> t;
  cudaEvent_t e; CK(cudaEventCreate(&e));
  for (int i = 0; i < 3000; ++i) {
    CK(cudaEventRecord(e, s));
    double t0 = now();
    CK(cuLaunchKernel(f, grid, 1, 1, 512, 1, 1, 0, (CUstream)s, args, nullptr));
    double t1 = now();
    if (sync_each || i % 64 == 63) CK(cudaStreamSynchronize(s));
    if (i >= 100) t.push_back(t1 - t0);
  }
  std::sort(t.begin(), t.end());
  printf("%-28s params %5zu B grid %3d sync_each %d: p10 %.2f p50 %.2f p90 %.2f us\n", label, sizeof(P<N>), grid, sync_each,
         t[t.size() / 10], t[t.size() / 2], t[t.size() * 9 / 10]);
  return 0;
}
int main() {
  CK(cudaSetDevice(0)); cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  for (int sync = 1; sync >= 0; --sync) {
    run<1>("empty kernel", s, 132, sync);
    run<32>("empty kernel", s, 132, sync);
    run<168>("empty kernel (LlParams-size)", s, 132, sync);
    run<512>("empty kernel", s, 132, sync);
  }
  // driver calls our path makes besides the launch
  CUcontext c; std::vector<double> t;
  for (int i = 0; i < 3000; ++i) { double t0 = now(); cuCtxGetCurrent(&c); t.push_back(now() - t0); }
  std::sort(t.begin(), t.end()); printf("cuCtxGetCurrent p50 %.3f us\n", t[t.size()/2]); t.clear();
  for (int i = 0; i < 3000; ++i) { double t0 = now(); cuCtxSetCurrent(c); t.push_back(now() - t0); }
  std::sort(t.begin(), t.end()); printf("cuCtxSetCurrent(same) p50 %.3f us\n", t[t.size()/2]); t.clear();
  CUfunction f; { cudaFunction_t rf; CK(cudaGetFuncBySymbol(&rf, (const void*)k<1>)); f = (CUfunction)rf; }
  for (int i = 0; i < 3000; ++i) { double t0 = now(); cuFuncSetAttribute(f, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, 65536); t.push_back(now() - t0); }
  std::sort(t.begin(), t.end()); printf("cuFuncSetAttribute p50 %.3f us\n", t[t.size()/2]); t.clear();
  return 0;
}
