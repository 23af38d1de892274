/* threads_shared: many threads on the SAME groups and handles, with destroys racing uses
 * (GPU-free, on the stand-in NCCL). Calls on one group are serialised by the group's lock; a
 * destroy on one thread never frees an object under a call on another: the call finishes first
 * or fails with ncclInvalidArgument. Three phases:
 *   A  one group, every thread with a long-lived handle on it plus short-lived ones, calls on
 *      its own and its neighbour's handle and on the group; the main thread keeps trying to
 *      destroy the group (ncclInvalidUsage, "live handle") until the handles are gone. Every
 *      return code is exact.
 *   B  destroy racing use, exact: threads call on one handle (then one group) while the main
 *      thread destroys it; before the destroy each call gives its live answer, after it every
 *      call gives ncclInvalidArgument, and never the other way round.
 *   C  chaos: shared slots of groups (both algorithms) and handles; threads create, use, take
 *      and destroy them at random, and pass pointers destroyed earlier (possibly reused by a new
 *      object) and pointers of the other kind. Codes from each call's allowed set; at the end
 *      every handle and group left destroys cleanly, so the handle counts stayed exact.
 * Usage: threads_shared [threads] [iterations] (defaults 8 and 1000; ctest also runs 4 x 100 under valgrind). */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fake_nccl.h"
#include "nccl_ep.h"
#include "nccl_ep_ext.h"
#include "test_util.h"
#include "thread_checks.h"

#define MAX_THREADS 64
#define GSLOTS 4
#define HSLOTS 8
#define STALE 4

static int nthreads = 8, iters = 1000;
static ncclComm_t comm1, comm2;

/* One bit per ncclResult_t code. */
#define OK (1u << ncclSuccess)
#define E1 (1u << ncclUnhandledCudaError)
#define E4 (1u << ncclInvalidArgument)
#define E5 (1u << ncclInvalidUsage)

/* Checks that a call returned a code of `allowed` (a mask of the bits above); gives the code. */
static ncclResult_t allowed_rc(ncclResult_t r, unsigned allowed, int id, const char *call, int line) {
  atomic_fetch_add(&checks, 1);
  if ((unsigned)r >= 32 || !(allowed & (1u << r))) {
    atomic_fetch_add(&failures, 1);
    fprintf(stderr, "%s:%d: thread %d: %s returned %d (allowed mask %#x): %s\n", __FILE__, line, id, call, (int)r,
            allowed, r == ncclSuccess ? "" : ncclEpxGetLastError());
  }
  return r;
}
#define T_ALLOWED(call, allowed) allowed_rc((call), (allowed), id, #call, __LINE__)
#define T_CHECK(cond)                                                                   \
  do {                                                                                  \
    atomic_fetch_add(&checks, 1);                                                       \
    if (!(cond)) {                                                                      \
      atomic_fetch_add(&failures, 1);                                                   \
      fprintf(stderr, "%s:%d: thread %d: FAIL: %s\n", __FILE__, __LINE__, id, #cond);   \
    }                                                                                   \
  } while (0)

/* A dead pointer's message, whichever check caught it (the lookup, or the lock after a wait). */
static int says_dead(void) {
  const char *m = ncclEpxGetLastError();
  return strstr(m, "not a live") != NULL || strstr(m, "was destroyed") != NULL;
}

static uint64_t next_rand(uint64_t *s) {
  *s ^= *s << 13;
  *s ^= *s >> 7;
  *s ^= *s << 17;
  return *s;
}

static ncclEpGroupConfig_t config(int ht, int nranks) {
  ncclEpGroupConfig_t c = NCCL_EP_GROUP_CONFIG_INIT;
  c.algorithm = ht ? NCCL_EP_ALGO_HIGH_THROUGHPUT : NCCL_EP_ALGO_LOW_LATENCY;
  c.num_experts = 8 * nranks;
  c.max_dispatch_tokens_per_rank = 16;
  c.max_token_bytes = 256;
  c.enable_mask = ht ? 0 : 1;
  return c;
}

/* Per-thread argument blocks: descriptors that pass the ABI's reads, so dispatch and combine
 * get as far as the group's lock and the shape checks behind it. */
struct args {
  size_t sk[2], sx[2];
  ncclEpTensor_t topk, x, y;
  ncclEpDispatchInputs_t di;
  ncclEpDispatchOutputs_t dout;
  ncclEpCombineInputs_t ci;
  ncclEpCombineOutputs_t co;
};

static void args_init(struct args *a) {
  a->sk[0] = 4, a->sk[1] = 2;
  a->sx[0] = 4, a->sx[1] = 128;
  ncclEpTensor_t t = NCCL_EP_TENSOR_INIT;
  a->topk = a->x = a->y = t;
  a->topk.ndim = 2, a->topk.datatype = ncclInt64, a->topk.sizes = a->sk, a->topk.data = SENTINEL;
  a->x.ndim = 2, a->x.datatype = ncclBfloat16, a->x.sizes = a->sx, a->x.data = SENTINEL;
  a->y = a->x;
  ncclEpDispatchInputs_t di = NCCL_EP_DISPATCH_INPUTS_INIT;
  ncclEpDispatchOutputs_t dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
  ncclEpCombineInputs_t ci = NCCL_EP_COMBINE_INPUTS_INIT;
  ncclEpCombineOutputs_t co = NCCL_EP_COMBINE_OUTPUTS_INIT;
  a->di = di, a->dout = dout, a->ci = ci, a->co = co;
  a->di.tokens = &a->x, a->dout.tokens = &a->y;
  a->ci.tokens = &a->x, a->co.tokens = &a->y;
}

static pthread_barrier_t barrier;

/* ---- phase A ------------------------------------------------------------------------------ */

static ncclEpGroup_t a_group;
static ncclEpHandle_t a_handles[MAX_THREADS];
static atomic_int a_looping;

static void *phase_a(void *arg) {
  int id = (int)(intptr_t)arg;
  struct args a;
  args_init(&a);
  ncclEpHandle_t mine = NULL;
  T_EXPECT(ncclEpInitHandle(&mine, a_group, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, NULL), ncclSuccess, NULL);
  T_EXPECT(ncclEpUpdateHandle(mine, &a.topk, NULL, NULL), ncclSuccess, NULL);
  a_handles[id] = mine;
  pthread_barrier_wait(&barrier);
  ncclEpHandle_t other = a_handles[(id + 1) % nthreads];
  for (int i = 0; i < iters; ++i) {
    ncclEpHandle_t h = i % 2 ? mine : other;
    /* Through the group's lock to the shape checks (the 2-D outputs are no EXPERT_MAJOR shape). */
    T_EXPECT(ncclEpDispatch(h, &a.di, &a.dout, NULL, NULL, NULL), ncclInvalidArgument, "outputs->tokens");
    T_EXPECT(ncclEpCombine(h, &a.ci, &a.co, NULL, NULL), ncclInvalidArgument, "inputs->tokens");
    T_EXPECT(ncclEpComplete(h, NULL, NULL), ncclSuccess, NULL);
    size_t need = 0;
    T_EXPECT(ncclEpHandleMemSize(a_group, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, &need, 2), ncclSuccess, NULL);
    T_CHECK(need > 0);
    int err = -1;
    T_EXPECT(ncclEpGetAsyncError(a_group, &err), ncclSuccess, NULL);
    T_CHECK(err == 0);
    T_EXPECT(ncclEpErrorClear(a_group), ncclSuccess, NULL);
    /* The mask lives on the GPU: this group has none, which the call finds under the lock. */
    T_EXPECT(ncclEpMaskQuery(a_group, (int *)SENTINEL, NULL), ncclUnhandledCudaError, "no GPU state");
    ncclEpHandle_t t = NULL;
    T_EXPECT(ncclEpInitHandle(&t, a_group, i % 2 ? NCCL_EP_LAYOUT_RANK_MAJOR : NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, NULL),
             ncclSuccess, NULL);
    if (i % 3 == 0) T_EXPECT(ncclEpUpdateHandle(t, &a.topk, NULL, NULL), ncclSuccess, NULL);
    T_EXPECT(ncclEpHandleDestroy(t), ncclSuccess, NULL);
    /* A handle passed as a group and the reverse: the wrong kind, whatever lives there. */
    T_EXPECT(ncclEpGetAsyncError((ncclEpGroup_t)(void *)mine, &err), ncclInvalidArgument, "not a live group");
    T_EXPECT(ncclEpComplete((ncclEpHandle_t)(void *)a_group, NULL, NULL), ncclInvalidArgument, "not a live handle");
  }
  atomic_fetch_sub(&a_looping, 1);
  pthread_barrier_wait(&barrier); /* nobody uses a neighbour's handle any more */
  T_EXPECT(ncclEpHandleDestroy(mine), ncclSuccess, NULL);
  T_EXPECT(ncclEpHandleDestroy(mine), ncclInvalidArgument, "not a live handle");
  return NULL;
}

static void run_phase_a(void) {
  int id = -1;
  ncclEpGroupConfig_t c = config(0, 2);
  T_EXPECT(ncclEpCreateGroup(&a_group, comm2, &c), ncclSuccess, NULL);
  atomic_store(&a_looping, nthreads);
  pthread_t t[MAX_THREADS];
  for (int i = 0; i < nthreads; ++i) pthread_create(&t[i], NULL, phase_a, (void *)(intptr_t)i);
  /* Every thread holds its handle until the second barrier: the destroy is refused until then. */
  pthread_barrier_wait(&barrier);
  int refused = 0;
  do {
    T_EXPECT(ncclEpGroupDestroy(a_group), ncclInvalidUsage, "live handle");
    ++refused;
  } while (atomic_load(&a_looping) > 0);
  pthread_barrier_wait(&barrier);
  for (int i = 0; i < nthreads; ++i) pthread_join(t[i], NULL);
  T_EXPECT(ncclEpGroupDestroy(a_group), ncclSuccess, NULL);
  T_EXPECT(ncclEpGroupDestroy(a_group), ncclInvalidArgument, "not a live group");
  printf("phase A: %d threads x %d iterations on one group, %d refused destroys\n", nthreads, iters, refused);
}

/* ---- phase B ------------------------------------------------------------------------------ */

static ncclEpHandle_t b_handle;
static ncclEpGroup_t b_group;
static atomic_int b_calls, b_dead_seen;

static void *phase_b_handle(void *arg) {
  int id = (int)(intptr_t)arg;
  struct args a;
  args_init(&a);
  int dead = 0;
  pthread_barrier_wait(&barrier);
  for (int i = 0; !dead || i < 50; ++i) {
    ncclResult_t r = T_ALLOWED(i % 2 ? ncclEpComplete(b_handle, NULL, NULL)
                                     : ncclEpDispatch(b_handle, &a.di, &a.dout, NULL, NULL, NULL),
                               (i % 2 ? OK : 0) | E4);
    int now_dead = r == ncclInvalidArgument && says_dead();
    /* Once dead, dead for good: nothing creates a handle in this phase, so no new handle can
     * take the address. Before, dispatch fails only on the output shape. */
    if (dead) T_CHECK(now_dead);
    if (!now_dead && r == ncclInvalidArgument) T_CHECK(strstr(ncclEpxGetLastError(), "outputs->tokens") != NULL);
    if (now_dead && !dead) atomic_fetch_add(&b_dead_seen, 1);
    dead |= now_dead;
    atomic_fetch_add(&b_calls, 1);
  }
  return NULL;
}

static void *phase_b_group(void *arg) {
  int id = (int)(intptr_t)arg;
  int dead = 0;
  pthread_barrier_wait(&barrier);
  for (int i = 0; !dead || i < 50; ++i) {
    size_t need = 0;
    int err = -1;
    ncclResult_t r = i % 2 ? T_ALLOWED(ncclEpHandleMemSize(b_group, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, &need, 2), OK | E4)
                           : T_ALLOWED(ncclEpGetAsyncError(b_group, &err), OK | E4);
    int now_dead = r == ncclInvalidArgument;
    if (now_dead) T_CHECK(says_dead());
    if (dead) T_CHECK(now_dead);
    if (!now_dead) T_CHECK(i % 2 ? need > 0 : err == 0);
    if (now_dead && !dead) atomic_fetch_add(&b_dead_seen, 1);
    dead |= now_dead;
    atomic_fetch_add(&b_calls, 1);
  }
  return NULL;
}

static void run_phase_b(void) {
  int id = -1;
  pthread_t t[MAX_THREADS];
  for (int round = 0; round < 2; ++round) {
    int on_group = round == 1;
    ncclEpGroupConfig_t c = config(0, 1);
    ncclEpGroup_t g = NULL;
    T_EXPECT(ncclEpCreateGroup(&g, comm1, &c), ncclSuccess, NULL);
    struct args a;
    args_init(&a);
    b_group = g;
    b_handle = NULL;
    if (!on_group) {
      T_EXPECT(ncclEpCreateHandle(&b_handle, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &a.topk, NULL, NULL, NULL), ncclSuccess,
               NULL);
    }
    atomic_store(&b_calls, 0);
    atomic_store(&b_dead_seen, 0);
    for (int i = 0; i < nthreads; ++i)
      pthread_create(&t[i], NULL, on_group ? phase_b_group : phase_b_handle, (void *)(intptr_t)i);
    pthread_barrier_wait(&barrier);
    while (atomic_load(&b_calls) < 20 * nthreads) {
    }
    if (on_group) {
      T_EXPECT(ncclEpGroupDestroy(g), ncclSuccess, NULL);
    } else {
      T_EXPECT(ncclEpHandleDestroy(b_handle), ncclSuccess, NULL);
    }
    for (int i = 0; i < nthreads; ++i) pthread_join(t[i], NULL);
    T_CHECK(atomic_load(&b_dead_seen) == nthreads);
    if (!on_group) T_EXPECT(ncclEpGroupDestroy(g), ncclSuccess, NULL);
    printf("phase B: %s destroyed under %d threads after %d calls\n", on_group ? "a group" : "a handle", nthreads,
           20 * nthreads);
  }
}

/* ---- phase C ------------------------------------------------------------------------------ */

static _Atomic(ncclEpGroup_t) gslot[GSLOTS];
static _Atomic(ncclEpHandle_t) hslot[HSLOTS];
static pthread_mutex_t orphan_lock = PTHREAD_MUTEX_INITIALIZER;
static ncclEpGroup_t orphans[MAX_THREADS * 64];
static int norphans;

/* A group whose destroy was refused goes back to a slot, or (all full) to the orphans. */
static void put_back(ncclEpGroup_t g) {
  for (int s = 0; s < GSLOTS; ++s) {
    ncclEpGroup_t empty = NULL;
    if (atomic_compare_exchange_strong(&gslot[s], &empty, g)) return;
  }
  pthread_mutex_lock(&orphan_lock);
  if (norphans < (int)(sizeof orphans / sizeof orphans[0])) orphans[norphans++] = g;
  pthread_mutex_unlock(&orphan_lock);
}

static void *phase_c(void *arg) {
  int id = (int)(intptr_t)arg;
  uint64_t rng = 0x9E3779B97F4A7C15ull * (uint64_t)(id + 1);
  struct args a;
  args_init(&a);
  ncclEpGroup_t stale_g[STALE] = {0};
  ncclEpHandle_t stale_h[STALE] = {0};
  int ng = 0, nh = 0;
  pthread_barrier_wait(&barrier);
  for (int i = 0; i < iters; ++i) {
    int s = (int)(next_rand(&rng) % GSLOTS), hs = (int)(next_rand(&rng) % HSLOTS);
    size_t need = 0;
    int err = -1;
    switch (next_rand(&rng) % 10) {
      case 0: { /* create a group into an empty slot */
        ncclEpGroupConfig_t c = config(s % 2, 2);
        ncclEpGroup_t g = NULL;
        T_EXPECT(ncclEpCreateGroup(&g, comm2, &c), ncclSuccess, NULL);
        ncclEpGroup_t empty = NULL;
        if (g && !atomic_compare_exchange_strong(&gslot[s], &empty, g)) T_EXPECT(ncclEpGroupDestroy(g), ncclSuccess, NULL);
        break;
      }
      case 1: { /* take a group and destroy it: only its taker can, so never "not live" */
        ncclEpGroup_t g = atomic_exchange(&gslot[s], NULL);
        if (!g) break;
        T_EXPECT(ncclEpComplete((ncclEpHandle_t)(void *)g, NULL, NULL), ncclInvalidArgument, "not a live handle");
        ncclResult_t r = T_ALLOWED(ncclEpGroupDestroy(g), OK | E5);
        if (r == ncclInvalidUsage) {
          T_CHECK(strstr(ncclEpxGetLastError(), "live handle") != NULL);
          put_back(g);
        } else {
          stale_g[ng++ % STALE] = g;
        }
        break;
      }
      case 2: { /* a handle on a group that another thread may be destroying */
        ncclEpGroup_t g = atomic_load(&gslot[s]);
        if (!g) break;
        ncclEpHandle_t h = NULL;
        ncclResult_t r = T_ALLOWED(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, NULL), OK | E4);
        if (r != ncclSuccess) {
          T_CHECK(says_dead() && h == NULL);
          break;
        }
        ncclEpHandle_t empty = NULL;
        if (!atomic_compare_exchange_strong(&hslot[hs], &empty, h)) T_EXPECT(ncclEpHandleDestroy(h), ncclSuccess, NULL);
        break;
      }
      case 3: { /* take a handle and destroy it */
        ncclEpHandle_t h = atomic_exchange(&hslot[hs], NULL);
        if (!h) break;
        T_EXPECT(ncclEpGetAsyncError((ncclEpGroup_t)(void *)h, &err), ncclInvalidArgument, "not a live group");
        T_EXPECT(ncclEpHandleDestroy(h), ncclSuccess, NULL);
        stale_h[nh++ % STALE] = h;
        break;
      }
      case 4:
      case 5: { /* use a handle another thread may be destroying (LL: routing; HT: no GPU) */
        ncclEpHandle_t h = atomic_load(&hslot[hs]);
        if (!h) break;
        T_ALLOWED(ncclEpUpdateHandle(h, &a.topk, NULL, NULL), OK | E4 | E5);
        T_ALLOWED(ncclEpDispatch(h, &a.di, &a.dout, NULL, NULL, NULL), E4 | E5);
        T_ALLOWED(ncclEpCombine(h, &a.ci, &a.co, NULL, NULL), E4 | E5);
        T_ALLOWED(ncclEpComplete(h, NULL, NULL), OK | E4);
        break;
      }
      case 6:
      case 7: { /* use a group another thread may be destroying */
        ncclEpGroup_t g = atomic_load(&gslot[s]);
        if (!g) break;
        if (T_ALLOWED(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, &need, 2), OK | E4 | E5) == ncclSuccess)
          T_CHECK(need > 0);
        if (T_ALLOWED(ncclEpGetAsyncError(g, &err), OK | E4) == ncclSuccess) T_CHECK(err == 0);
        T_ALLOWED(ncclEpErrorClear(g), OK | E4);
        T_ALLOWED(ncclEpMaskQuery(g, (int *)SENTINEL, NULL), E1 | E4 | E5);
        break;
      }
      case 8: { /* pointers destroyed earlier: dead, or (address reused) someone's live object */
        ncclEpGroup_t g = stale_g[next_rand(&rng) % STALE];
        ncclEpHandle_t h = stale_h[next_rand(&rng) % STALE];
        if (g) {
          T_ALLOWED(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, &need, 2), OK | E4 | E5);
          T_ALLOWED(ncclEpGetAsyncError(g, &err), OK | E4);
          T_ALLOWED(ncclEpMaskQuery(g, (int *)SENTINEL, NULL), E1 | E4 | E5);
        }
        if (h) {
          T_ALLOWED(ncclEpDispatch(h, &a.di, &a.dout, NULL, NULL, NULL), E4 | E5);
          T_ALLOWED(ncclEpComplete(h, NULL, NULL), OK | E4);
        }
        break;
      }
      default: { /* never objects of the library */
        T_EXPECT(ncclEpComplete((ncclEpHandle_t)(uintptr_t)0x10, NULL, NULL), ncclInvalidArgument, "not a live handle");
        T_EXPECT(ncclEpGetAsyncError(NOT_A_GROUP(err), &err), ncclInvalidArgument, "not a live group");
        T_EXPECT(ncclEpHandleDestroy(NOT_A_HANDLE(need)), ncclInvalidArgument, "not a live handle");
        T_EXPECT(ncclEpGroupDestroy(NOT_A_GROUP(need)), ncclInvalidArgument, "not a live group");
        break;
      }
    }
  }
  return NULL;
}

static void run_phase_c(void) {
  int id = -1;
  pthread_t t[MAX_THREADS];
  for (int i = 0; i < nthreads; ++i) pthread_create(&t[i], NULL, phase_c, (void *)(intptr_t)i);
  pthread_barrier_wait(&barrier);
  for (int i = 0; i < nthreads; ++i) pthread_join(t[i], NULL);
  /* Every handle first; then every group must go: a count off by one would refuse it. */
  int nh = 0, ng = 0;
  for (int s = 0; s < HSLOTS; ++s) {
    ncclEpHandle_t h = atomic_exchange(&hslot[s], NULL);
    if (h) {
      T_EXPECT(ncclEpHandleDestroy(h), ncclSuccess, NULL);
      ++nh;
    }
  }
  for (int s = 0; s < GSLOTS; ++s) {
    ncclEpGroup_t g = atomic_exchange(&gslot[s], NULL);
    if (g) {
      T_EXPECT(ncclEpGroupDestroy(g), ncclSuccess, NULL);
      ++ng;
    }
  }
  for (int i = 0; i < norphans; ++i) {
    T_EXPECT(ncclEpGroupDestroy(orphans[i]), ncclSuccess, NULL);
    ++ng;
  }
  printf("phase C: %d threads x %d random calls; %d handles and %d groups left, all destroyed\n", nthreads, iters, nh,
         ng);
}

int main(int argc, char **argv) {
  if (cuda_device_present()) {
    printf("SKIP: a GPU is present (the fake communicator is for GPU-free machines)\n");
    return 77;
  }
  if (argc > 1) nthreads = atoi(argv[1]);
  if (argc > 2) iters = atoi(argv[2]);
  if (nthreads < 2 || nthreads > MAX_THREADS || iters < 1) {
    fprintf(stderr, "usage: %s [threads 2..%d] [iterations >= 1]\n", argv[0], MAX_THREADS);
    return 2;
  }
  comm1 = fake_comm_create(1, 0, 0);
  comm2 = fake_comm_create(2, 1, 0);
  pthread_barrier_init(&barrier, NULL, (unsigned)nthreads + 1);
  run_phase_a();
  run_phase_b();
  run_phase_c();
  pthread_barrier_destroy(&barrier);
  fake_comm_destroy(comm1);
  fake_comm_destroy(comm2);
  int f = atomic_load(&failures);
  printf("threads_shared: %d checks, %d failures\n", atomic_load(&checks), f);
  return f != 0;
}
