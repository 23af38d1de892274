/* GPU smoke test (label "gpu"). Finds a GPU through the driver API at run time
 * (dlopen("libcuda.so.1") + cuInit + cuDeviceGetCount; nothing CUDA is linked) and exits 77,
 * which ctest reports as skipped, when there is none. With a GPU it checks that the library
 * loads and reports its version. The end-to-end GPU tests under the same label are
 * gpu_ll_rust (tests/gpu_ll.rs against the CPU reference) and ep_bench_smoke. */
#include <dlfcn.h>
#include <stdio.h>
#include "nccl_ep.h"

#define SKIP 77

typedef int (*cuInit_t)(unsigned int);
typedef int (*cuDeviceGetCount_t)(int *);
typedef int (*cuDeviceGet_t)(int *, int);
typedef int (*cuDeviceGetName_t)(char *, int, int);

int main(void) {
  void *cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!cuda) {
    printf("SKIP: no NVIDIA driver (dlopen libcuda.so.1: %s)\n", dlerror());
    return SKIP;
  }
  cuInit_t init = (cuInit_t)dlsym(cuda, "cuInit");
  cuDeviceGetCount_t count = (cuDeviceGetCount_t)dlsym(cuda, "cuDeviceGetCount");
  cuDeviceGet_t get = (cuDeviceGet_t)dlsym(cuda, "cuDeviceGet");
  cuDeviceGetName_t name = (cuDeviceGetName_t)dlsym(cuda, "cuDeviceGetName");
  int n = 0, rc;
  if (!init || !count || !get || !name) {
    printf("SKIP: libcuda.so.1 lacks the driver entry points\n");
    return SKIP;
  }
  if ((rc = init(0)) != 0) {
    printf("SKIP: cuInit failed (CUresult %d): no usable GPU\n", rc);
    return SKIP;
  }
  if ((rc = count(&n)) != 0 || n == 0) {
    printf("SKIP: no CUDA device (cuDeviceGetCount: CUresult %d, %d devices)\n", rc, n);
    return SKIP;
  }
  for (int i = 0; i < n; i++) {
    int dev = 0;
    char buf[256] = "?";
    if (get(&dev, i) == 0) name(buf, (int)sizeof buf, dev);
    printf("GPU %d: %s\n", i, buf);
  }
  int v = 0;
  if (ncclEpGetVersion(&v) != ncclSuccess || v != NCCL_EP_VERSION_CODE) {
    printf("FAIL: ncclEpGetVersion gave %d\n", v);
    return 1;
  }
  printf("gpu_smoke: %d GPU(s); library version %d (GPU tests are not written yet)\n", n, v);
  return 0;
}
