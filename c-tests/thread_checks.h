/* Checks for the multi-threaded ABI tests (threads_abi.c, threads_shared.c): counted with
 * atomics, each failure printed with the calling thread's `id` (a local of the caller). */
#ifndef NCCL_EP_THREAD_CHECKS_H_
#define NCCL_EP_THREAD_CHECKS_H_

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "nccl_ep_ext.h"

static atomic_int failures, checks;

/* Exactly `want`, and for a failure a message containing `needle` (NULL: any). */
#define T_EXPECT(call, want, needle)                                                           \
  do {                                                                                        \
    ncclResult_t r_ = (call);                                                                 \
    atomic_fetch_add(&checks, 1);                                                             \
    const char *m_ = r_ == ncclSuccess ? "" : ncclEpxGetLastError();                          \
    const char *n_ = (needle);                                                                \
    if (r_ != (want) || (n_ && !strstr(m_, n_))) {                                            \
      atomic_fetch_add(&failures, 1);                                                         \
      fprintf(stderr, "%s:%d: thread %d: %s returned %d (want %d): %s\n", __FILE__, __LINE__, \
              id, #call, (int)r_, (int)(want), m_);                                           \
    }                                                                                         \
  } while (0)

#endif
