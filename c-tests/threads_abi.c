/* threads_abi: concurrent calls on different groups from different threads (GPU-free, on the
 * stand-in NCCL). Each thread creates its own groups, handles and tensor descriptors, makes
 * valid and invalid calls on them, checks every return code and that ncclEpxGetLastError() is
 * per thread, and destroys everything. Run it under valgrind too (ctest threads_abi_valgrind). */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

#include "fake_nccl.h"
#include "nccl_ep.h"
#include "nccl_ep_ext.h"
#include "test_util.h"
#include "thread_checks.h"

#define THREADS 8
#define ROUNDS 300



static void *worker(void *arg) {
  int id = (int)(long)arg;
  char mine[64];
  snprintf(mine, sizeof mine, "thread %d", id);
  for (int round = 0; round < ROUNDS; ++round) {
    int nranks = 1 + (id + round) % 4;
    ncclComm_t comm = fake_comm_create(nranks, (id + round) % nranks, 0);
    ncclEpGroupConfig_t c = NCCL_EP_GROUP_CONFIG_INIT;
    c.algorithm = NCCL_EP_ALGO_LOW_LATENCY;
    c.num_experts = 8 * nranks;
    c.max_dispatch_tokens_per_rank = 16;
    c.max_token_bytes = 256;
    ncclEpGroup_t g = NULL;
    T_EXPECT(ncclEpCreateGroup(&g, comm, &c), ncclSuccess, NULL);
    size_t need = 0;
    T_EXPECT(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, &need, 2), ncclSuccess, NULL);
    ncclEpHandle_t h = NULL;
    T_EXPECT(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, NULL), ncclSuccess, NULL);
    size_t sizes[2] = {4, 2};
    ncclEpTensor_t *topk = NULL;
    T_EXPECT(ncclEpTensorAlloc(&topk, 2, ncclInt64, sizes, NULL), ncclSuccess, NULL);
    if (topk) topk->data = (void *)(uintptr_t)0x7000;
    T_EXPECT(ncclEpUpdateHandle(h, topk, NULL, NULL), ncclSuccess, NULL);
    /* An error on this thread leaves this thread's message, whatever the others do. */
    ncclEpGroupConfig_t bad = c;
    bad.magic = 0;
    ncclEpGroup_t g2 = (ncclEpGroup_t)0x1;
    T_EXPECT(ncclEpCreateGroup(&g2, comm, &bad), ncclInvalidArgument, "magic");
    if (g2 != NULL) {
      atomic_fetch_add(&failures, 1);
      fprintf(stderr, "%s: a failed ncclEpCreateGroup left its out-pointer set\n", mine);
    }
    T_EXPECT(ncclEpHandleMemSize(g, (ncclEpLayout_t)(100 + id), NULL, &need, 2), ncclInvalidArgument, "layout");
    char want[32];
    snprintf(want, sizeof want, "is %d", 100 + id);
    if (!strstr(ncclEpxGetLastError(), want)) {
      atomic_fetch_add(&failures, 1);
      fprintf(stderr, "%s: last error \"%s\" is not this thread's\n", mine, ncclEpxGetLastError());
    }
    T_EXPECT(ncclEpGroupDestroy(g), ncclInvalidUsage, "live handle");
    T_EXPECT(ncclEpHandleDestroy(h), ncclSuccess, NULL);
    T_EXPECT(ncclEpTensorDestroy(topk), ncclSuccess, NULL);
    T_EXPECT(ncclEpGroupDestroy(g), ncclSuccess, NULL);
    T_EXPECT(ncclEpGroupDestroy(g), ncclInvalidArgument, "not a live group");
    fake_comm_destroy(comm);
  }
  return NULL;
}

int main(void) {
  if (cuda_device_present()) {
    printf("SKIP: a GPU is present (the fake communicator is for GPU-free machines)\n");
    return 77;
  }
  pthread_t t[THREADS];
  for (long i = 0; i < THREADS; ++i) pthread_create(&t[i], NULL, worker, (void *)i);
  for (int i = 0; i < THREADS; ++i) pthread_join(t[i], NULL);
  int f = atomic_load(&failures);
  printf("threads_abi: %d threads x %d rounds, %d checks, %d failures\n", THREADS, ROUNDS, atomic_load(&checks), f);
  return f != 0;
}
