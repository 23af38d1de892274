/* Tiny test harness for the C tests: EXPECT_RC checks a call's exact ncclResult_t and, for a
 * failure, that ncclEpxGetLastError() was refreshed by that very call (it is first overwritten
 * by a marker failure of another function), names the function, is readable ASCII, and mentions
 * the expected detail. */
#ifndef NCCL_EP_TEST_UTIL_H_
#define NCCL_EP_TEST_UTIL_H_
#include <ctype.h>
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "nccl_ep.h"
#include "nccl_ep_ext.h"

static int t_checks, t_failures;

#define CHECK(c)                                                            \
  do {                                                                      \
    t_checks++;                                                             \
    if (!(c)) {                                                             \
      fprintf(stderr, "%s:%d: FAIL: %s\n", __FILE__, __LINE__, #c);         \
      t_failures++;                                                         \
    }                                                                       \
  } while (0)

/* Leaves a known message behind, from a function other than `fn`. */
static inline void t_marker(const char *fn) {
  if (strcmp(fn, "ncclEpGetVersion") != 0)
    (void)ncclEpGetVersion(NULL);
  else
    (void)ncclEpTensorAlloc(NULL, 1, ncclInt8, NULL, NULL);
}

static inline int t_readable(const char *s) {
  for (; *s; s++)
    if (!isprint((unsigned char)*s)) return 0;
  return 1;
}

static inline void t_expect_rc(const char *file, int line, const char *call, ncclResult_t got, ncclResult_t want,
                        const char *fn, const char *needle) {
  t_checks++;
  if (got != want) {
    fprintf(stderr, "%s:%d: FAIL: %s returned %d, expected %d (last error: %s)\n", file, line, call, (int)got,
            (int)want, ncclEpxGetLastError());
    t_failures++;
    return;
  }
  if (want == ncclSuccess) return;
  const char *msg = ncclEpxGetLastError();
  size_t n = strlen(fn);
  if (msg == NULL || msg[0] == '\0' || !t_readable(msg) || strlen(msg) > 4096 || strncmp(msg, fn, n) != 0 ||
      msg[n] != ':' || (needle != NULL && strstr(msg, needle) == NULL)) {
    fprintf(stderr, "%s:%d: FAIL: %s: last error %s%s%s does not name %s%s%s\n", file, line, call,
            msg ? "\"" : "", msg ? msg : "(NULL)", msg ? "\"" : "", fn, needle ? " and mention " : "",
            needle ? needle : "");
    t_failures++;
  }
}

/* EXPECT_RC(call, expected code, "ncclEpFunction", "substring of the message" or NULL) */
#define EXPECT_RC(call, want, fn, needle)                                           \
  do {                                                                              \
    t_marker(fn);                                                                   \
    ncclResult_t t_rc_ = (call);                                                    \
    t_expect_rc(__FILE__, __LINE__, #call, t_rc_, (ncclResult_t)(want), fn, needle); \
  } while (0)

static inline int t_finish(const char *name) {
  printf("%s: %d checks, %d failure(s)\n", name, t_checks, t_failures);
  return t_failures == 0 ? 0 : 1;
}

/* A pointer that is no object of the library: the address of something on the stack. */
#define NOT_A_GROUP(x) ((ncclEpGroup_t)(void *)&(x))
#define NOT_A_HANDLE(x) ((ncclEpHandle_t)(void *)&(x))
#define SENTINEL ((void *)(uintptr_t)0x5EB700) /* 16-byte aligned, like any device allocation */
/* True when a CUDA device is usable. The stand-in NCCL (fake_nccl.c) reports device 0, so on a
 * GPU machine its groups get real GPU state and operations would run kernels on the tests' fake
 * pointers: the tests that use it skip there (the GPU tests cover such machines). */
static inline int cuda_device_present(void) {
  void *cuda = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!cuda) return 0;
  int (*init)(unsigned) = (int (*)(unsigned))dlsym(cuda, "cuInit");
  int (*count)(int *) = (int (*)(int *))dlsym(cuda, "cuDeviceGetCount");
  int n = 0;
  return init && count && init(0) == 0 && count(&n) == 0 && n > 0;
}

#endif
