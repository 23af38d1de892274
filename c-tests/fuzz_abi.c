/* ABI fuzzer: drives every ncclEp* entry point (and the ncclEpx* extensions) with random and
 * adversarial arguments, without a GPU: groups are made on fake communicators of a stand-in
 * libnccl.so.2 (fake_nccl.c), as in errors_fake_nccl.c.
 *
 *   fuzz_abi [--seed S] [--calls N] [--seconds T] [--verbose] [--cross-type 0|1]
 *   env: FUZZ_SEED, FUZZ_CALLS, FUZZ_SECONDS, FUZZ_VERBOSE=1, FUZZ_CROSS_TYPE (argv wins)
 *
 * Deterministic: the whole run is a function of the seed (printed first), so a crash at
 * iteration I is reproduced by the command the crash report prints (`fuzz_abi --seed S --calls C`;
 * add --verbose to see each call).
 *
 * What is mutated: struct headers (size below V1, exactly V1, V2, sizeof, larger with random tail
 * bytes; magic right or wrong), enum values (in and out of range, negative), tensors (ndim
 * 0..10, extents, datatypes incl. 12 and out of range, magic 0xCAFECAFE / forged 0xBEEFBEEF /
 * random, data NULL / fake device pointers, win_hdl), NULL vs valid pointers for every pointer
 * argument, destroyed group/handle pointers, descriptors from ncclEpTensorAlloc (live, destroyed,
 * stale copies), fake communicators of several rank counts (and bad ones).
 *
 * What is NOT passed (caller UB, not a fuzz target): a non-NULL struct pointer to fewer readable
 * bytes than its size field claims (every struct buffer is malloc'd with exactly
 * max(size, 8) bytes, so valgrind catches any read past the claimed size), `sizes` with fewer
 * than `ndim` values when ndim <= 8, freed descriptors to functions that read them (a destroyed
 * ncclEpTensorAlloc descriptor goes only to ncclEpTensorDestroy; the others get a stale copy),
 * foreign function pointers in config->alloc. (A live group passed as a handle, and the reverse,
 * IS passed: see CROSS_TYPE below.)
 * Device pointers (tensor->data, mask_status) and streams are fake values: without a GPU the
 * library never dereferences them.
 *
 * Checked after every call: the return code is an ncclResult_t (0..8); a failure leaves a
 * non-empty ncclEpxGetLastError() that names the function; failing creation functions set their
 * out-pointer to NULL (it is pre-filled with a sentinel), succeeding ones to a new object, which
 * is destroyed later (at the latest at the end, where every destroy must succeed and the custom
 * allocator must have no block outstanding); ncclInternalError (a caught panic) is a finding.
 * A signal (SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE) prints the seed, iteration and function and
 * exits 2. Exit 0 when no crash and no invariant violation, 1 otherwise. */
#define _POSIX_C_SOURCE 200809L
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "fake_nccl.h"
#include "nccl_ep.h"
#include "nccl_ep_ext.h"

/* ------------------------------------------------------------------------------------------ */
/* CROSS_TYPE (FUZZ_CROSS_TYPE=0 / --cross-type 0 turns it off): pick_group()/pick_handle() offer
 * a live object of the other kind as one of their adversarial choices (2% of adversarial picks),
 * which a stale pointer becomes once malloc reuses its address. This found a crash: groups and
 * handles shared one live-address set, so ncclEpHandleDestroy(<live group>) freed the group as a
 * handle (later free(): invalid pointer, seed 7). Fixed with one live set per kind
 * (src/abi/objects.rs); kept on as a regression check. */
/* ------------------------------------------------------------------------------------------ */

#define LL_MAX_RANKS 64 /* src/runtime/ll_params.rs */
#define MAX_GROUPS 8
#define MAX_HANDLES 16
#define MAX_TENSORS 16
#define MAX_DEAD 32
#define NCOMMS 12

/* ---- deterministic RNG (splitmix64) ---- */
static uint64_t rng_state;
static uint64_t rnd(void) {
  uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static uint32_t below(uint32_t n) { return n ? (uint32_t)(rnd() % n) : 0; }
static int chance(int percent) { return (int)below(100) < percent; }
/* How adversarial this call is: each call draws a rate, and bad() decides each argument. Low
 * rates let calls get past the first checks into the deeper ones. */
static int g_bad = 30;
static int bad(void) { return chance(g_bad); }

/* ---- run state, for the crash report ---- */
static uint64_t g_seed;
static volatile uint64_t g_iter;
static uint64_t calls; /* calls completed: --calls calls+1 stops right after the crashing one */
static const char *volatile g_func = "(setup)";
static int g_verbose;
static int g_cross_type;

static void on_signal(int sig) {
  char buf[512];
  int n = snprintf(buf, sizeof buf,
                   "\nfuzz: CRASH: signal %d in %s at iteration %llu (seed %llu)\n"
                   "fuzz: reproduce: fuzz_abi --seed %llu --calls %llu --verbose\n",
                   sig, g_func, (unsigned long long)g_iter, (unsigned long long)g_seed,
                   (unsigned long long)g_seed, (unsigned long long)calls + 1);
  if (n > 0) {
    ssize_t w = write(2, buf, (size_t)n);
    (void)w;
  }
  _exit(2);
}

/* ---- per-iteration arena: every buffer made for one call, freed after it ---- */
#define ARENA_MAX 256
static void *arena[ARENA_MAX];
static int arena_n;
static void *amalloc(size_t n) {
  if (arena_n >= ARENA_MAX) return NULL;
  void *p = malloc(n ? n : 1);
  if (!p) {
    fprintf(stderr, "fuzz: out of memory\n");
    exit(1);
  }
  arena[arena_n++] = p;
  return p;
}
static void arena_free(void) {
  while (arena_n > 0) free(arena[--arena_n]);
}
static void fill_random(void *p, size_t n) {
  unsigned char *b = (unsigned char *)p;
  for (size_t i = 0; i < n; i++) b[i] = (unsigned char)rnd();
}

/* ---- fake values ---- */
#define SENTINEL ((void *)(uintptr_t)0x5EB700)
static void *fake_dev_ptr(void) {
  switch (below(6)) {
    case 0: return NULL;
    case 1: return (void *)(uintptr_t)(0x7f0000000000ull + (rnd() & 0xffffff0ull)); /* aligned */
    case 2: return (void *)(uintptr_t)(rnd() | 1);                                 /* odd garbage */
    case 3: return (void *)(uintptr_t)0x10;
    default: return SENTINEL;
  }
}
static cudaStream_t fake_stream(void) {
  return chance(50) ? NULL : (cudaStream_t)(uintptr_t)(0x51000 + below(16) * 16);
}
static int rand_int_enum(int nvalid) {
  if (!bad()) return (int)below((uint32_t)nvalid);
  switch (below(8)) {
    case 0: return -1;
    case 1: return nvalid;
    case 2: return (int)(int32_t)rnd();
    case 3: return INT32_MIN;
    case 4: return INT32_MAX;
    default: return (int)below((uint32_t)nvalid);
  }
}
static int rand_topk(void) {
  if (!bad()) return 1 + (int)below(8);
  switch (below(8)) {
    case 0: return 0;
    case 1: return -1;
    case 2: return (int)(int32_t)rnd();
    case 3: return 9 + (int)below(1000);
    default: return 1 + (int)below(8);
  }
}
static size_t rand_extent(size_t plausible) {
  if (!bad()) return plausible;
  switch (below(10)) {
    case 0: return 0;
    case 1: return 1;
    case 2: return SIZE_MAX;
    case 3: return (size_t)1 << (32 + below(31));
    case 4: return below(1u << 20);
    case 5: return plausible + 1;
    default: return plausible;
  }
}

/* ---- custom allocator (host memory standing in for device memory; counts what is live) ---- */
static long alloc_outstanding;
static cudaError_t my_alloc(void **p, size_t n, void *ctx) {
  (void)ctx;
  if (!p) return cudaErrorInvalidValue;
  *p = malloc(n ? n : 1);
  if (!*p) return cudaErrorMemoryAllocation;
  alloc_outstanding++;
  return cudaSuccess;
}
static cudaError_t my_free(void *p, void *ctx) {
  (void)ctx;
  if (p) alloc_outstanding--;
  free(p);
  return cudaSuccess;
}

/* ---- object bookkeeping ---- */
typedef struct {
  ncclEpGroup_t g;
  int nranks, algo, num_experts, max_tokens, token_bytes, topk;
} Group;
typedef struct {
  ncclEpHandle_t h;
  int gi; /* index into groups at creation (for plausible shapes only) */
  int topk;
  size_t tokens; /* rows of the routing it was given (0: none yet) */
} Handle;
static Group groups[MAX_GROUPS];
static int ngroups;
static Handle handles[MAX_HANDLES];
static int nhandles;
static ncclEpTensor_t *tensors[MAX_TENSORS];
static int ntensors;
static void *dead_groups[MAX_DEAD], *dead_handles[MAX_DEAD], *dead_tensors[MAX_DEAD];
static int ndead_groups, ndead_handles, ndead_tensors;
static ncclEpTensor_t dead_tensor_copies[MAX_DEAD]; /* what a destroyed descriptor looked like */
static size_t dead_tensor_sizes[MAX_DEAD][8];

static ncclComm_t comms[NCOMMS];
static int comm_nranks[NCOMMS];
static uint64_t not_a_comm[8]; /* readable, zero: the fake NCCL refuses it */

static void remember_dead(void **list, int *n, void *p) {
  if (*n < MAX_DEAD) {
    list[(*n)++] = p;
  } else {
    list[below(MAX_DEAD)] = p;
  }
}
/* A new object at address p: it must not be offered as a destroyed one any more (an address
 * reused by malloc is a live object again). */
/* a destroyed object's address given to a new object of the same kind / of the other kind
 * (kind: 0 group, 1 handle, 2 descriptor) */
static uint64_t reused_same, reused_cross;
static void forget_dead(void *p, int kind) {
  for (int i = 0; i < ndead_groups; i++)
    if (dead_groups[i] == p) *(kind == 0 ? &reused_same : &reused_cross) += 1;
  for (int i = 0; i < ndead_handles; i++)
    if (dead_handles[i] == p) *(kind == 1 ? &reused_same : &reused_cross) += 1;
  for (int i = 0; i < ndead_groups; i++)
    if (dead_groups[i] == p) dead_groups[i--] = dead_groups[--ndead_groups];
  for (int i = 0; i < ndead_handles; i++)
    if (dead_handles[i] == p) dead_handles[i--] = dead_handles[--ndead_handles];
  for (int i = 0; i < ndead_tensors; i++)
    if (dead_tensors[i] == p) {
      dead_tensors[i] = dead_tensors[--ndead_tensors];
      dead_tensor_copies[i] = dead_tensor_copies[ndead_tensors];
      memcpy(dead_tensor_sizes[i], dead_tensor_sizes[ndead_tensors], sizeof dead_tensor_sizes[i]);
      i--;
    }
}

/* ---- statistics and invariants ---- */
enum {
  F_GetVersion, F_CreateGroup, F_GroupDestroy, F_HandleMemSize, F_InitHandle, F_UpdateHandle,
  F_CreateHandle, F_HandleDestroy, F_MaskQuery, F_MaskUpdate, F_MaskClean, F_GetAsyncError,
  F_ErrorClear, F_Dispatch, F_Combine, F_Complete, F_TensorAlloc, F_TensorDestroy, F_xBufferSize,
  F_xGetLastError, F_xCreateLocalGroups, F_COUNT
};
static const char *fname[F_COUNT] = {
  "ncclEpGetVersion", "ncclEpCreateGroup", "ncclEpGroupDestroy", "ncclEpHandleMemSize",
  "ncclEpInitHandle", "ncclEpUpdateHandle", "ncclEpCreateHandle", "ncclEpHandleDestroy",
  "ncclEpMaskQuery", "ncclEpMaskUpdate", "ncclEpMaskClean", "ncclEpGetAsyncError",
  "ncclEpErrorClear", "ncclEpDispatch", "ncclEpCombine", "ncclEpComplete", "ncclEpTensorAlloc",
  "ncclEpTensorDestroy", "ncclEpxBufferSize", "ncclEpxGetLastError", "ncclEpxCreateLocalGroups"};
static uint64_t per_func[F_COUNT], per_func_ok[F_COUNT], rc_hist[10], rc_other;
static uint64_t violations, panics, created[3];

static void violation(int f, const char *fmt, ...) {
  violations++;
  if (violations <= 20) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "fuzz: VIOLATION in %s at iteration %llu (seed %llu): ", fname[f],
            (unsigned long long)g_iter, (unsigned long long)g_seed);
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
  }
}

static void check_rc(int f, ncclResult_t rc) {
  calls++;
  per_func[f]++;
  int r = (int)rc;
  if (r >= 0 && r <= 8)
    rc_hist[r]++;
  else
    rc_other++;
  if (r < 0 || r > 8 || r == 7) violation(f, "return code %d is not an ncclResult_t the library returns", r);
  if (r == 0) {
    per_func_ok[f]++;
  } else {
    const char *m = ncclEpxGetLastError();
    size_t n = strlen(fname[f]);
    if (!m || !m[0])
      violation(f, "failed with %d but ncclEpxGetLastError() is empty", r);
    else if (strncmp(m, fname[f], n) != 0 || m[n] != ':')
      violation(f, "failed with %d but the last error does not name it: \"%s\"", r, m);
    if (r == (int)ncclInternalError) {
      panics++;
      if (panics <= 20)
        fprintf(stderr, "fuzz: FINDING: %s returned ncclInternalError at iteration %llu (seed %llu): %s\n",
                fname[f], (unsigned long long)g_iter, (unsigned long long)g_seed, m ? m : "(null)");
    }
  }
  if (g_verbose)
    fprintf(stderr, "[%llu] %s -> %d%s%s\n", (unsigned long long)g_iter, fname[f], r, r ? "  " : "",
            r ? ncclEpxGetLastError() : "");
}

/* ---- struct generators ---- */
/* A caller struct of type T with a random header: NULL, or a buffer of exactly max(size, 8)
 * bytes holding `tmpl` (the first min(size, sizeof) bytes) and random tail bytes past sizeof. */
static void *mk_struct(const void *tmpl, unsigned sz_struct, unsigned v1, unsigned v2, int null_pct) {
  if (chance(null_pct)) return NULL;
  unsigned size;
  static const unsigned sane[] = {3, 4, 5, 11, 11}; /* V1, V2, larger with a tail, sizeof */
  switch (bad() ? below(12) : sane[below(5)]) {
    case 0: size = 0; break;
    case 1: size = below(v1); break;
    case 2: size = v1 - 1; break;
    case 3: size = v1; break;
    case 4: size = v2; break;
    case 5: size = sz_struct + 1 + below(64); break;
    case 6: size = sz_struct + 4096; break;
    default: size = sz_struct; break;
  }
  unsigned magic = NCCL_EP_MAGIC;
  if (bad() && chance(30)) {
    switch (below(4)) {
      case 0: magic = 0; break;
      case 1: magic = NCCL_EP_TENSOR_MAGIC; break;
      case 2: magic = 0xBEEFBEEFu; break;
      default: magic = (unsigned)rnd(); break;
    }
  }
  size_t bytes = size < 8 ? 8 : size;
  unsigned char *b = (unsigned char *)amalloc(bytes);
  if (!b) return NULL;
  size_t n = size < sz_struct ? size : sz_struct;
  if (n < 8) n = 8 < sz_struct ? 8 : sz_struct;
  memcpy(b, tmpl, n);
  if (bytes > sz_struct) fill_random(b + sz_struct, bytes - sz_struct);
  memcpy(b, &size, 4);
  memcpy(b + 4, &magic, 4);
  return b;
}
#define MK(type, tmplp, v1, v2, null_pct) \
  ((type *)mk_struct((tmplp), (unsigned)sizeof(type), (v1), (v2), (null_pct)))

static Group *pick_live_group(void) { return ngroups ? &groups[below((uint32_t)ngroups)] : NULL; }

/* Shape hints from a group, so that some calls get past the argument checks. */
typedef struct {
  size_t tokens, topk, hidden, experts, local_experts, nranks, max_tokens;
} Hints;
static Hints hints_of(const Group *g, int topk, size_t tokens) {
  Hints h = {4, 2, 128, 8, 2, 4, 16};
  if (g) {
    h.max_tokens = (size_t)g->max_tokens;
    h.tokens = g->max_tokens ? below((uint32_t)g->max_tokens + 1) : 1;
    h.topk = (size_t)(topk > 0 ? topk : g->topk > 0 ? g->topk : 2);
    h.hidden = (size_t)(g->token_bytes / 2);
    h.experts = (size_t)g->num_experts;
    h.nranks = (size_t)(g->nranks > 0 ? g->nranks : 1);
    h.local_experts = h.experts / h.nranks;
  }
  if (tokens && chance(80)) h.tokens = tokens;
  return h;
}

/* Plausible shapes: kind 0 topk_idx [T,k] i64, 1 tokens [T,H] bf16, 2 weights [T,k] f32,
 * 3 LL recv tokens [E_local, R*T_max, H] bf16, 4 counters [E_local] i32, 5 handle_mem [n] u8,
 * 6 scales [T, H/128] f32 */
static void plausible(int kind, const Hints *h, unsigned *ndim, ncclDataType_t *dt, size_t *s) {
  switch (kind) {
    case 0: *ndim = 2; *dt = ncclInt64; s[0] = h->tokens; s[1] = h->topk; break;
    case 1: *ndim = 2; *dt = ncclBfloat16; s[0] = h->tokens; s[1] = h->hidden; break;
    case 2: *ndim = 2; *dt = ncclFloat32; s[0] = h->tokens; s[1] = h->topk; break;
    case 3: *ndim = 3; *dt = ncclBfloat16; s[0] = h->local_experts; s[1] = h->nranks * h->max_tokens; s[2] = h->hidden; break;
    case 4: *ndim = 1; *dt = ncclInt32; s[0] = h->local_experts; break;
    case 5: *ndim = 1; *dt = ncclUint8; s[0] = 1u << 20; break;
    default: *ndim = 2; *dt = ncclFloat32; s[0] = h->tokens; s[1] = h->hidden / 128 + 1; break;
  }
}

/* Owned descriptors mutated for one call, restored after it (so they can still be destroyed). */
typedef struct {
  ncclEpTensor_t *t;
  ncclEpTensor_t saved;
} Restore;
static Restore restores[32];
static int nrestores;
static void restore_owned(void) {
  while (nrestores > 0) {
    nrestores--;
    *restores[nrestores].t = restores[nrestores].saved;
  }
}

/* A tensor argument: NULL, a fresh (possibly adversarial) descriptor, a live one from
 * ncclEpTensorAlloc (data set, maybe other fields mutated), or a stale copy of a destroyed one. */
static ncclEpTensor_t *mk_tensor(int kind, const Hints *h, int null_pct) {
  /* optional tensors (null_pct >= 40) are NULL by chance; required ones only on a bad call */
  if (chance(null_pct) && (null_pct >= 40 || bad())) return NULL;
  int src = (int)below(100);
  if (src < 12 && ntensors > 0 && nrestores < 32) {
    ncclEpTensor_t *t = tensors[below((uint32_t)ntensors)];
    for (int i = 0; i < nrestores; i++)
      if (restores[i].t == t) return t;
    restores[nrestores].t = t;
    restores[nrestores++].saved = *t;
    t->data = fake_dev_ptr();
    if (chance(20)) t->datatype = (ncclDataType_t)rand_int_enum(14);
    if (chance(10)) t->win_hdl = (ncclWindow_t)SENTINEL;
    if (chance(10)) { /* a caller-swapped sizes array (same rank): refused as tampered */
      size_t *s = (size_t *)amalloc(8 * sizeof(size_t));
      if (s) {
        for (int i = 0; i < 8; i++) s[i] = rand_extent(4);
        t->sizes = s;
      }
    }
    if (chance(10)) t->ndim = 9 + below(100); /* rejected before sizes is read */
    return t;
  }
  if (src < 16 && ndead_tensors > 0) {
    int i = (int)below((uint32_t)ndead_tensors);
    ncclEpTensor_t *t = (ncclEpTensor_t *)amalloc(sizeof *t);
    size_t *s = (size_t *)amalloc(8 * sizeof(size_t));
    if (!t || !s) return NULL;
    *t = dead_tensor_copies[i];
    memcpy(s, dead_tensor_sizes[i], 8 * sizeof(size_t));
    t->sizes = s;
    t->data = fake_dev_ptr();
    return t;
  }
  /* a fresh descriptor */
  unsigned size = (unsigned)sizeof(ncclEpTensor_t);
  switch (bad() ? below(10) : 9) {
    case 0: size = 0; break;
    case 1: size = below(48); break;
    case 2: size = 48 + 1 + below(64); break;
    default: break;
  }
  size_t bytes = size < sizeof(ncclEpTensor_t) ? sizeof(ncclEpTensor_t) : size;
  ncclEpTensor_t *t = (ncclEpTensor_t *)amalloc(bytes);
  if (!t) return NULL;
  fill_random(t, bytes);
  t->size = size;
  switch (bad() ? below(10) : 9) {
    case 0: t->magic = 0xBEEFBEEFu; break; /* forged ncclEpTensorAlloc marker */
    case 1: t->magic = (unsigned)rnd(); break;
    case 2: t->magic = NCCL_EP_MAGIC; break;
    default: t->magic = NCCL_EP_TENSOR_MAGIC; break;
  }
  size_t s[8] = {0};
  unsigned ndim;
  ncclDataType_t dt;
  plausible(kind, h, &ndim, &dt, s);
  if (bad() && chance(40)) { /* shape mutation */
    ndim = below(11);
    for (unsigned i = 0; i < 8; i++) s[i] = rand_extent(s[i] ? s[i] : 4);
  } else if (bad() && chance(30)) {
    s[below(ndim ? ndim : 1)] = rand_extent(s[0]);
  } else if (ndim >= 2 && bad() && chance(20)) {
    /* Extents whose product wraps a 64-bit size_t (e.g. 2^40 x 2^40 = 2^80 -> 0, or a product
     * that fits but whose byte count does not): the library must refuse them, not compute a
     * wrapped element count. */
    s[0] = (size_t)1 << (32 + below(31));
    s[1] = chance(50) ? s[0] : ((size_t)1 << (62 - below(3)));
  }
  if (bad() && chance(30)) {
    switch (below(5)) {
      case 0: dt = (ncclDataType_t)12; break;
      case 1: dt = (ncclDataType_t)13; break;
      case 2: dt = (ncclDataType_t)-1; break;
      case 3: dt = (ncclDataType_t)(int32_t)rnd(); break;
      default: dt = (ncclDataType_t)below(12); break;
    }
  }
  t->ndim = ndim;
  t->datatype = dt;
  t->data = !bad() ? SENTINEL : fake_dev_ptr();
  t->win_hdl = !bad() || chance(80) ? NULL : (ncclWindow_t)SENTINEL;
  t->win_offset = !bad() || chance(80) ? 0 : (size_t)rnd();
  if (ndim <= 8) {
    if (bad() && chance(10)) {
      t->sizes = NULL;
    } else {
      size_t *sz = (size_t *)amalloc((ndim ? ndim : 1) * sizeof(size_t));
      if (!sz) return NULL;
      memcpy(sz, s, (ndim ? ndim : 1) * sizeof(size_t));
      t->sizes = sz;
    }
  } else {
    /* ndim > 8 is rejected before sizes is read: a garbage pointer is allowed there */
    t->sizes = chance(50) ? NULL : (size_t *)(uintptr_t)(rnd() | 1);
  }
  return t;
}

/* ---- group config ---- */
static ncclEpGroupConfig_t rand_group_config(int nranks, int *topk_out) {
  ncclEpGroupConfig_t c = NCCL_EP_GROUP_CONFIG_INIT;
  c.algorithm = chance(70) ? NCCL_EP_ALGO_LOW_LATENCY : NCCL_EP_ALGO_HIGH_THROUGHPUT;
  int nr = nranks > 0 ? nranks : 1;
  c.num_experts = (unsigned)(nr * (1 + (int)below(4)));
  c.max_dispatch_tokens_per_rank = 1 + below(64);
  c.max_token_bytes = 16 * (1 + below(64));
  c.num_topk = chance(50) ? 0 : 1 + below(8);
  c.enable_mask = chance(50);
  c.version = chance(80) ? NCCL_EP_API_VERSION : below(5);
  if (bad()) { /* mutations */
    switch (below(14)) {
      case 0: c.algorithm = (ncclEpAlgorithm_t)rand_int_enum(2); break;
      case 1: c.num_experts = chance(50) ? 0 : (unsigned)rnd(); break;
      case 2: c.max_token_bytes = chance(50) ? 0 : (unsigned)rnd(); break;
      case 3: c.max_dispatch_tokens_per_rank = chance(50) ? 0 : (unsigned)rnd(); break;
      case 4: c.max_recv_tokens_per_rank = (unsigned)rnd() % 100000; break;
      case 5: c.rdma_buffer_size = chance(50) ? (unsigned long)rnd() : (unsigned long)below(1u << 30); break;
      case 6: c.num_qp_per_rank = (unsigned)rnd(); c.num_channels = (unsigned)rnd(); break;
      case 7: c.max_num_sms = (unsigned)rnd(); break;
      case 8: /* valid callbacks only (foreign function pointers would be caller UB) */
        c.alloc.alloc_fn = chance(70) ? my_alloc : NULL;
        c.alloc.free_fn = chance(70) ? my_free : NULL;
        c.alloc.context = (void *)(uintptr_t)rnd(); /* opaque, only handed back */
        break;
      case 9: c.enable_mask = (int)(int32_t)rnd(); break;
      case 10: c.timeout_ns = rnd(); break;
      case 11: c.zero_copy = (ncclEpZeroCopyMode_t)rand_int_enum(3); break;
      case 12: c.overflow_policy = (ncclEpOverflowPolicy_t)rand_int_enum(3); break;
      default: c.num_topk = (unsigned)rand_topk(); break;
    }
  }
  *topk_out = (int)c.num_topk;
  return c;
}

static ncclEpGroup_t pick_group(Group **info) {
  *info = NULL;
  uint32_t r = bad() ? below(100) : 99;
  if (r < 8) return NULL;
  if (r < 18 && ndead_groups) return (ncclEpGroup_t)dead_groups[below((uint32_t)ndead_groups)];
  if (r < 22) return (ncclEpGroup_t)(void *)&not_a_comm[below(8)]; /* never a group */
  if (r < 24 && g_cross_type && nhandles) return (ncclEpGroup_t)(void *)handles[below((uint32_t)nhandles)].h;
  Group *g = pick_live_group();
  *info = g;
  return g ? g->g : NULL;
}
static ncclEpHandle_t pick_handle(Handle **info) {
  *info = NULL;
  uint32_t r = bad() ? below(100) : 99;
  if (r < 8) return NULL;
  if (r < 18 && ndead_handles) return (ncclEpHandle_t)dead_handles[below((uint32_t)ndead_handles)];
  if (r < 22) return (ncclEpHandle_t)(void *)&not_a_comm[below(8)];
  if (r < 24 && g_cross_type && ngroups) return (ncclEpHandle_t)(void *)groups[below((uint32_t)ngroups)].g;
  if (!nhandles) return NULL;
  *info = &handles[below((uint32_t)nhandles)];
  return (*info)->h;
}
static Group *group_of(const Handle *h) { return (h && h->gi >= 0 && h->gi < ngroups) ? &groups[h->gi] : NULL; }

static ncclEpLayout_t rand_layout(void) {
  return bad() ? (ncclEpLayout_t)rand_int_enum(4) : (ncclEpLayout_t)(1 + below(3));
}

static ncclEpHandleConfig_t hc_tmpl(void) {
  ncclEpHandleConfig_t c = NCCL_EP_HANDLE_CONFIG_INIT;
  if (chance(30)) c.dispatch_output_per_expert_alignment = chance(50) ? below(130) : (size_t)rnd();
  return c;
}
static ncclEpLayoutInfo_t li_tmpl(const Hints *h) {
  ncclEpLayoutInfo_t l = NCCL_EP_LAYOUT_INFO_INIT;
  l.expert_counters = mk_tensor(4, h, 60);
  l.src_rank_counters = mk_tensor(4, h, 70);
  l.expert_offsets = mk_tensor(4, h, 70);
  l.recv_total_counter = mk_tensor(4, h, 70);
  l.recv_topk_idx_kind = (ncclEpExpertIdKind_t)rand_int_enum(3);
  return l;
}

/* ---- bookkeeping of created/destroyed objects ---- */
static void destroy_handle_now(ncclEpHandle_t h);
static void destroy_group_now(ncclEpGroup_t g);
static void destroy_tensor_now(ncclEpTensor_t *t);

static void adopt_group(ncclEpGroup_t g, const ncclEpGroupConfig_t *c, int nranks) {
  forget_dead((void *)g, 0);
  created[0]++;
  if (ngroups >= MAX_GROUPS) { /* full: destroyed at once (still a create/destroy pair) */
    destroy_group_now(g);
    return;
  }
  Group *x = &groups[ngroups++];
  x->g = g;
  x->nranks = nranks;
  x->algo = (int)c->algorithm;
  x->num_experts = (int)c->num_experts;
  x->max_tokens = (int)c->max_dispatch_tokens_per_rank;
  x->token_bytes = (int)c->max_token_bytes;
  x->topk = (int)c->num_topk;
}
static void adopt_handle(ncclEpHandle_t h, ncclEpGroup_t g, int topk, size_t tokens) {
  forget_dead((void *)h, 1);
  created[1]++;
  if (nhandles >= MAX_HANDLES) {
    destroy_handle_now(h);
    return;
  }
  int gi = -1;
  for (int i = 0; i < ngroups; i++)
    if (groups[i].g == g) gi = i;
  handles[nhandles].h = h;
  handles[nhandles].gi = gi;
  handles[nhandles].topk = topk;
  handles[nhandles].tokens = tokens;
  nhandles++;
}
static void adopt_tensor(ncclEpTensor_t *t) {
  forget_dead((void *)t, 2);
  created[2]++;
  if (ntensors >= MAX_TENSORS) {
    destroy_tensor_now(t);
    return;
  }
  tensors[ntensors++] = t;
}
/* After a successful destroy through pointer p: move it from live to dead. */
static void group_destroyed(void *p) {
  for (int i = 0; i < ngroups; i++)
    if ((void *)groups[i].g == p) {
      for (int j = 0; j < nhandles; j++) /* handles keep indices: fix those past i */
        if (handles[j].gi == i) handles[j].gi = -1;
        else if (handles[j].gi > i) handles[j].gi--;
      memmove(&groups[i], &groups[i + 1], (size_t)(ngroups - i - 1) * sizeof groups[0]);
      ngroups--;
      break;
    }
  remember_dead(dead_groups, &ndead_groups, p);
}
static void handle_destroyed(void *p) {
  for (int i = 0; i < nhandles; i++)
    if ((void *)handles[i].h == p) {
      handles[i] = handles[--nhandles];
      break;
    }
  remember_dead(dead_handles, &ndead_handles, p);
}
/* copy: the descriptor as it was before the destroy call (its sizes array is library memory,
 * freed by a successful destroy: copy_sizes is a snapshot taken before the call). */
static void tensor_destroyed(ncclEpTensor_t *p, const ncclEpTensor_t *copy, const size_t *copy_sizes) {
  for (int i = 0; i < ntensors; i++)
    if (tensors[i] == p) {
      tensors[i] = tensors[--ntensors];
      break;
    }
  if (ndead_tensors < MAX_DEAD) {
    int i = ndead_tensors++;
    dead_tensors[i] = p;
    dead_tensor_copies[i] = *copy;
    memcpy(dead_tensor_sizes[i], copy_sizes, sizeof dead_tensor_sizes[i]);
  }
}
static void destroy_handle_now(ncclEpHandle_t h) {
  g_func = fname[F_HandleDestroy];
  ncclResult_t rc = ncclEpHandleDestroy(h);
  check_rc(F_HandleDestroy, rc);
  if (rc != ncclSuccess) violation(F_HandleDestroy, "destroying a live handle failed with %d", (int)rc);
  handle_destroyed((void *)h);
}
static void destroy_group_now(ncclEpGroup_t g) {
  g_func = fname[F_GroupDestroy];
  ncclResult_t rc = ncclEpGroupDestroy(g);
  check_rc(F_GroupDestroy, rc);
  if (rc != ncclSuccess) violation(F_GroupDestroy, "destroying a live group failed with %d", (int)rc);
  group_destroyed((void *)g);
}
static void snapshot_sizes(const ncclEpTensor_t *t, size_t out[8]) {
  memset(out, 0, 8 * sizeof(size_t));
  if (t->ndim >= 1 && t->ndim <= 8 && t->sizes) memcpy(out, t->sizes, t->ndim * sizeof(size_t));
}
static void destroy_tensor_now(ncclEpTensor_t *t) {
  ncclEpTensor_t copy = *t;
  size_t snap[8];
  snapshot_sizes(t, snap);
  g_func = fname[F_TensorDestroy];
  ncclResult_t rc = ncclEpTensorDestroy(t);
  check_rc(F_TensorDestroy, rc);
  if (rc != ncclSuccess) violation(F_TensorDestroy, "destroying a live descriptor failed with %d", (int)rc);
  tensor_destroyed(t, &copy, snap);
}

/* ---- one call ---- */
static void one_call(void) {
  int f = (int)below(F_COUNT);
  /* creation and destruction a little more often, so the object pools keep changing */
  if (chance(15)) {
    static const int churn[] = {F_CreateGroup, F_InitHandle, F_CreateHandle, F_TensorAlloc,
                                F_GroupDestroy, F_HandleDestroy, F_TensorDestroy};
    f = churn[below(sizeof churn / sizeof churn[0])];
  }
  static const int rates[] = {0, 3, 10, 30, 60, 100};
  g_bad = rates[below(sizeof rates / sizeof rates[0])];
  g_func = fname[f];
  void *const SENT = (void *)(uintptr_t)0x5EB7005EB700ull;
  ncclResult_t rc;
  switch (f) {
    case F_GetVersion: {
      int v = -1;
      int *p = chance(20) ? NULL : &v;
      rc = ncclEpGetVersion(p);
      check_rc(f, rc);
      if (p && rc == ncclSuccess && v != NCCL_EP_VERSION_CODE) violation(f, "version %d", v);
      if (!p && rc == ncclSuccess) violation(f, "NULL version accepted");
      break;
    }
    case F_CreateGroup: {
      int ci = (int)below(NCOMMS + 2);
      ncclComm_t comm = ci < NCOMMS ? comms[ci] : ci == NCOMMS ? NULL : (ncclComm_t)(void *)not_a_comm;
      int nranks = ci < NCOMMS ? comm_nranks[ci] : 1;
      int topk;
      ncclEpGroupConfig_t c = rand_group_config(nranks, &topk);
      ncclEpGroupConfig_t *cp =
          MK(ncclEpGroupConfig_t, &c, NCCL_EP_GROUP_CONFIG_V1_SIZE, NCCL_EP_GROUP_CONFIG_V2_SIZE, 5);
      ncclEpGroup_t g = (ncclEpGroup_t)SENT;
      ncclEpGroup_t *out = bad() && chance(10) ? NULL : &g;
      rc = ncclEpCreateGroup(out, comm, cp);
      check_rc(f, rc);
      if (out && rc != ncclSuccess && g != NULL) violation(f, "failed with %d but *ep_group = %p", (int)rc, (void *)g);
      if (rc == ncclSuccess) {
        if (!out || !g || (void *)g == SENT)
          violation(f, "succeeded without a group");
        else {
          /* a V1-sized config reads num_topk as 0 */
          if (cp && cp->size < NCCL_EP_GROUP_CONFIG_V2_SIZE) c.num_topk = 0;
          adopt_group(g, &c, nranks);
        }
      }
      break;
    }
    case F_GroupDestroy: {
      Group *gi;
      ncclEpGroup_t g = pick_group(&gi);
      rc = ncclEpGroupDestroy(g);
      check_rc(f, rc);
      if (rc == ncclSuccess && g) {
        int live = 0;
        for (int i = 0; i < ngroups; i++) live |= groups[i].g == g;
        if (!live) violation(f, "destroyed %p, which is no live group", (void *)g);
        group_destroyed((void *)g);
      }
      break;
    }
    case F_HandleMemSize: {
      Group *gi;
      ncclEpGroup_t g = pick_group(&gi);
      ncclEpHandleConfig_t hc = hc_tmpl();
      size_t sz = 0;
      rc = ncclEpHandleMemSize(g, rand_layout(),
                               MK(ncclEpHandleConfig_t, &hc, NCCL_EP_HANDLE_CONFIG_V1_SIZE, NCCL_EP_HANDLE_CONFIG_V1_SIZE, 40),
                               chance(10) ? NULL : &sz, rand_topk());
      check_rc(f, rc);
      break;
    }
    case F_InitHandle: {
      Group *gi;
      ncclEpGroup_t g = pick_group(&gi);
      int topk = rand_topk();
      Hints h = hints_of(gi, topk, 0);
      ncclEpHandleConfig_t hc = hc_tmpl();
      ncclEpTensor_t *mem = mk_tensor(5, &h, 60);
      ncclEpHandle_t hd = (ncclEpHandle_t)SENT;
      ncclEpHandle_t *out = bad() && chance(10) ? NULL : &hd;
      rc = ncclEpInitHandle(out, g, rand_layout(),
                            MK(ncclEpHandleConfig_t, &hc, NCCL_EP_HANDLE_CONFIG_V1_SIZE, NCCL_EP_HANDLE_CONFIG_V1_SIZE, 50),
                            topk, mem);
      check_rc(f, rc);
      if (out && rc != ncclSuccess && hd != NULL) violation(f, "failed with %d but *handle = %p", (int)rc, (void *)hd);
      if (rc == ncclSuccess) {
        if (!out || !hd || (void *)hd == SENT)
          violation(f, "succeeded without a handle");
        else
          adopt_handle(hd, g, topk, 0);
      }
      break;
    }
    case F_UpdateHandle: {
      Handle *hi;
      ncclEpHandle_t hd = pick_handle(&hi);
      Hints h = hints_of(group_of(hi), hi ? hi->topk : 0, hi ? hi->tokens : 0);
      ncclEpLayoutInfo_t li = li_tmpl(&h);
      ncclEpTensor_t *topk_idx = mk_tensor(0, &h, 10);
      rc = ncclEpUpdateHandle(hd, topk_idx,
                              MK(ncclEpLayoutInfo_t, &li, NCCL_EP_LAYOUT_INFO_V1_SIZE, NCCL_EP_LAYOUT_INFO_V2_SIZE, 60),
                              fake_stream());
      check_rc(f, rc);
      if (rc == ncclSuccess && hi && topk_idx && topk_idx->ndim == 2) hi->tokens = topk_idx->sizes[0];
      break;
    }
    case F_CreateHandle: {
      Group *gi;
      ncclEpGroup_t g = pick_group(&gi);
      Hints h = hints_of(gi, 0, 0);
      ncclEpLayoutInfo_t li = li_tmpl(&h);
      ncclEpHandleConfig_t hc = hc_tmpl();
      ncclEpTensor_t *topk_idx = mk_tensor(0, &h, 10);
      ncclEpHandle_t hd = (ncclEpHandle_t)SENT;
      ncclEpHandle_t *out = bad() && chance(10) ? NULL : &hd;
      rc = ncclEpCreateHandle(out, g, rand_layout(), topk_idx,
                              MK(ncclEpLayoutInfo_t, &li, NCCL_EP_LAYOUT_INFO_V1_SIZE, NCCL_EP_LAYOUT_INFO_V2_SIZE, 60),
                              MK(ncclEpHandleConfig_t, &hc, NCCL_EP_HANDLE_CONFIG_V1_SIZE, NCCL_EP_HANDLE_CONFIG_V1_SIZE, 50),
                              fake_stream());
      check_rc(f, rc);
      if (out && rc != ncclSuccess && hd != NULL) violation(f, "failed with %d but *handle = %p", (int)rc, (void *)hd);
      if (rc == ncclSuccess) {
        if (!out || !hd || (void *)hd == SENT)
          violation(f, "succeeded without a handle");
        else
          adopt_handle(hd, g, topk_idx && topk_idx->ndim == 2 ? (int)topk_idx->sizes[1] : 0,
                       topk_idx && topk_idx->ndim == 2 ? topk_idx->sizes[0] : 0);
      }
      break;
    }
    case F_HandleDestroy: {
      Handle *hi;
      ncclEpHandle_t hd = pick_handle(&hi);
      rc = ncclEpHandleDestroy(hd);
      check_rc(f, rc);
      if (rc == ncclSuccess && hd) {
        int live = 0;
        for (int i = 0; i < nhandles; i++) live |= handles[i].h == hd;
        if (!live) violation(f, "destroyed %p, which is no live handle", (void *)hd);
        handle_destroyed((void *)hd);
      }
      break;
    }
    case F_MaskQuery: {
      Group *gi;
      ncclEpGroup_t g = pick_group(&gi);
      rc = ncclEpMaskQuery(g, (int *)fake_dev_ptr(), fake_stream()); /* a device array */
      check_rc(f, rc);
      break;
    }
    case F_MaskUpdate: {
      Group *gi;
      ncclEpGroup_t g = pick_group(&gi);
      int *mask = NULL;
      if (chance(80)) { /* host array of nranks (LL_MAX_RANKS covers every group) */
        mask = (int *)amalloc(LL_MAX_RANKS * sizeof(int));
        if (mask)
          for (int i = 0; i < LL_MAX_RANKS; i++) mask[i] = chance(80) ? 1 : (int)(int32_t)rnd();
      }
      rc = ncclEpMaskUpdate(g, mask, fake_stream());
      check_rc(f, rc);
      break;
    }
    case F_MaskClean: {
      Group *gi;
      rc = ncclEpMaskClean(pick_group(&gi), fake_stream());
      check_rc(f, rc);
      break;
    }
    case F_GetAsyncError: {
      Group *gi;
      int e = -7;
      int *p = chance(15) ? NULL : &e;
      rc = ncclEpGetAsyncError(pick_group(&gi), p);
      check_rc(f, rc);
      if (rc == ncclSuccess && p && e != 0 && e != 1) violation(f, "error_out = %d", e);
      break;
    }
    case F_ErrorClear: {
      Group *gi;
      rc = ncclEpErrorClear(pick_group(&gi));
      check_rc(f, rc);
      break;
    }
    case F_Dispatch: {
      Handle *hi;
      ncclEpHandle_t hd = pick_handle(&hi);
      Hints h = hints_of(group_of(hi), hi ? hi->topk : 0, hi ? hi->tokens : 0);
      ncclEpDispatchInputs_t in = NCCL_EP_DISPATCH_INPUTS_INIT;
      in.tokens = mk_tensor(1, &h, 10);
      in.topk_weights = mk_tensor(2, &h, 50);
      in.scales = mk_tensor(6, &h, 80);
      ncclEpDispatchOutputs_t out = NCCL_EP_DISPATCH_OUTPUTS_INIT;
      out.tokens = mk_tensor(3, &h, 10);
      out.topk_weights = mk_tensor(2, &h, 50);
      out.scales = mk_tensor(6, &h, 80);
      out.topk_idx = mk_tensor(0, &h, 50);
      ncclEpLayoutInfo_t li = li_tmpl(&h);
      ncclEpDispatchConfig_t c = NCCL_EP_DISPATCH_CONFIG_INIT;
      c.send_only = chance(70) ? 0 : (chance(50) ? 1 : (unsigned)rnd());
      c.round_scales = chance(70) ? 0 : (unsigned)rnd();
      c.pass_direction = (ncclEpPassDir_t)rand_int_enum(2);
      c.quant_recipe = (ncclEpDispQuant_t)rand_int_enum(3);
      rc = ncclEpDispatch(
          hd, MK(ncclEpDispatchInputs_t, &in, NCCL_EP_DISPATCH_INPUTS_V1_SIZE, NCCL_EP_DISPATCH_INPUTS_V1_SIZE, 5),
          MK(ncclEpDispatchOutputs_t, &out, NCCL_EP_DISPATCH_OUTPUTS_V1_SIZE, NCCL_EP_DISPATCH_OUTPUTS_V1_SIZE, 5),
          MK(ncclEpLayoutInfo_t, &li, NCCL_EP_LAYOUT_INFO_V1_SIZE, NCCL_EP_LAYOUT_INFO_V2_SIZE, 60),
          MK(ncclEpDispatchConfig_t, &c, NCCL_EP_DISPATCH_CONFIG_V1_SIZE, NCCL_EP_DISPATCH_CONFIG_V2_SIZE, 30),
          fake_stream());
      check_rc(f, rc);
      break;
    }
    case F_Combine: {
      Handle *hi;
      ncclEpHandle_t hd = pick_handle(&hi);
      Hints h = hints_of(group_of(hi), hi ? hi->topk : 0, hi ? hi->tokens : 0);
      ncclEpCombineInputs_t in = NCCL_EP_COMBINE_INPUTS_INIT;
      in.tokens = mk_tensor(3, &h, 10);
      in.topk_weights = mk_tensor(2, &h, 60);
      in.scales = mk_tensor(6, &h, 80);
      ncclEpCombineOutputs_t out = NCCL_EP_COMBINE_OUTPUTS_INIT;
      out.tokens = mk_tensor(1, &h, 10);
      out.topk_weights = mk_tensor(2, &h, 60);
      ncclEpCombineConfig_t c = NCCL_EP_COMBINE_CONFIG_INIT;
      c.send_only = chance(70) ? 0 : (unsigned)rnd();
      c.pass_direction = (ncclEpPassDir_t)rand_int_enum(2);
      c.quant_recipe = (ncclEpCombQuant_t)rand_int_enum(2);
      rc = ncclEpCombine(
          hd, MK(ncclEpCombineInputs_t, &in, NCCL_EP_COMBINE_INPUTS_V1_SIZE, NCCL_EP_COMBINE_INPUTS_V2_SIZE, 5),
          MK(ncclEpCombineOutputs_t, &out, NCCL_EP_COMBINE_OUTPUTS_V1_SIZE, NCCL_EP_COMBINE_OUTPUTS_V1_SIZE, 5),
          MK(ncclEpCombineConfig_t, &c, NCCL_EP_COMBINE_CONFIG_V1_SIZE, NCCL_EP_COMBINE_CONFIG_V2_SIZE, 30),
          fake_stream());
      check_rc(f, rc);
      break;
    }
    case F_Complete: {
      Handle *hi;
      ncclEpHandle_t hd = pick_handle(&hi);
      ncclEpCompleteConfig_t c = NCCL_EP_COMPLETE_CONFIG_INIT;
      rc = ncclEpComplete(hd, MK(ncclEpCompleteConfig_t, &c, NCCL_EP_COMPLETE_CONFIG_V1_SIZE, NCCL_EP_COMPLETE_CONFIG_V1_SIZE, 50),
                          fake_stream());
      check_rc(f, rc);
      break;
    }
    case F_TensorAlloc: {
      unsigned ndim = chance(70) ? 1 + below(8) : below(11) + (chance(10) ? (unsigned)rnd() : 0);
      size_t *sizes = NULL;
      if (chance(95)) {
        unsigned n = ndim >= 1 && ndim <= 8 ? ndim : 8; /* ndim > 8 is rejected before sizes is read */
        sizes = (size_t *)amalloc(n * sizeof(size_t));
        if (sizes)
          for (unsigned i = 0; i < n; i++) sizes[i] = rand_extent(1 + below(64));
      }
      ncclDataType_t dt = chance(80) ? (ncclDataType_t)below(13) : (ncclDataType_t)rand_int_enum(13);
      ncclEpTensorAllocConfig_t tc = NCCL_EP_TENSOR_ALLOC_CONFIG_INIT;
      ncclEpTensor_t *t = (ncclEpTensor_t *)SENT;
      ncclEpTensor_t **out = bad() && chance(10) ? NULL : &t;
      rc = ncclEpTensorAlloc(out, ndim, dt, sizes,
                             MK(ncclEpTensorAllocConfig_t, &tc, NCCL_EP_TENSOR_ALLOC_CONFIG_V1_SIZE,
                                NCCL_EP_TENSOR_ALLOC_CONFIG_V1_SIZE, 50));
      check_rc(f, rc);
      if (out && rc != ncclSuccess && t != NULL) violation(f, "failed with %d but *tensor = %p", (int)rc, (void *)t);
      if (rc == ncclSuccess) {
        if (!out || !t || (void *)t == SENT) {
          violation(f, "succeeded without a descriptor");
        } else {
          if (t->size != NCCL_EP_TENSOR_SIZE || t->ndim != ndim || t->datatype != dt || t->data != NULL ||
              !t->sizes || memcmp(t->sizes, sizes, ndim * sizeof(size_t)) != 0)
            violation(f, "the descriptor does not describe what was asked");
          adopt_tensor(t);
        }
      }
      break;
    }
    case F_TensorDestroy: {
      uint32_t r = below(100);
      ncclEpTensor_t *t = NULL;
      ncclEpTensor_t stack = NCCL_EP_TENSOR_INIT;
      int live = -1;
      if (r < 50 && ntensors) {
        live = (int)below((uint32_t)ntensors);
        t = tensors[live];
      } else if (r < 70 && ndead_tensors) {
        t = (ncclEpTensor_t *)dead_tensors[below((uint32_t)ndead_tensors)]; /* address only: not read */
      } else if (r < 85) {
        t = &stack; /* a caller's own descriptor: refused, never freed */
      }
      /* a live descriptor whose sizes pointer the caller changed: refused, must stay live */
      size_t other[8] = {0};
      size_t *own = NULL;
      if (live >= 0 && chance(15)) {
        own = t->sizes;
        t->sizes = other;
      }
      ncclEpTensor_t copy = t && live >= 0 ? *t : stack;
      size_t snap[8] = {0};
      if (live >= 0) {
        copy.sizes = own ? own : copy.sizes;
        snapshot_sizes(&copy, snap);
      }
      rc = ncclEpTensorDestroy(t);
      check_rc(f, rc);
      if (own) {
        if (rc == ncclSuccess) violation(f, "freed a descriptor whose sizes pointer was changed");
        else t->sizes = own;
      }
      if (t == &stack && rc == ncclSuccess) violation(f, "accepted a stack descriptor");
      if (live >= 0 && !own) {
        if (rc != ncclSuccess) violation(f, "refused a live descriptor (%d)", (int)rc);
        else tensor_destroyed(t, &copy, snap);
      } else if (live < 0 && t && t != &stack && rc == ncclSuccess) {
        violation(f, "destroyed a dead descriptor twice");
      }
      break;
    }
    case F_xBufferSize: {
      Group *gi = pick_live_group();
      int nranks = gi ? gi->nranks : 1 + (int)below(16);
      if (chance(20)) nranks = rand_int_enum(LL_MAX_RANKS + 1);
      int topk;
      ncclEpGroupConfig_t c = rand_group_config(nranks, &topk);
      size_t bytes = 0;
      rc = ncclEpxBufferSize(MK(ncclEpGroupConfig_t, &c, NCCL_EP_GROUP_CONFIG_V1_SIZE, NCCL_EP_GROUP_CONFIG_V2_SIZE, 5),
                             nranks, rand_layout(), chance(20) ? rand_topk() : (topk ? topk : 2),
                             chance(5) ? NULL : &bytes);
      check_rc(f, rc);
      break;
    }
    case F_xGetLastError: {
      calls++;
      per_func[f]++;
      per_func_ok[f]++;
      const char *m = ncclEpxGetLastError();
      if (!m) violation(f, "returned NULL");
      break;
    }
    case F_xCreateLocalGroups: {
      int n = chance(80) ? 1 + (int)below(8) : rand_int_enum(LL_MAX_RANKS + 1);
      ncclEpGroup_t gs[LL_MAX_RANKS];
      for (int i = 0; i < LL_MAX_RANKS; i++) gs[i] = (ncclEpGroup_t)SENT;
      int devs[LL_MAX_RANKS];
      for (int i = 0; i < LL_MAX_RANKS; i++) devs[i] = chance(80) ? 0 : (int)(int32_t)rnd();
      int topk;
      ncclEpGroupConfig_t c = rand_group_config(n, &topk);
      int null_groups = chance(5);
      rc = ncclEpxCreateLocalGroups(null_groups ? NULL : gs, n, chance(50) ? NULL : devs,
                                    MK(ncclEpGroupConfig_t, &c, NCCL_EP_GROUP_CONFIG_V1_SIZE, NCCL_EP_GROUP_CONFIG_V2_SIZE, 5));
      check_rc(f, rc);
      if (rc != ncclSuccess && !null_groups && n >= 1 && n <= LL_MAX_RANKS)
        for (int i = 0; i < n; i++)
          if (gs[i] != NULL) {
            violation(f, "failed with %d but groups[%d] = %p", (int)rc, i, (void *)gs[i]);
            break;
          }
      if (rc == ncclSuccess && !null_groups)
        for (int i = 0; i < n; i++) adopt_group(gs[i], &c, n);
      break;
    }
    default: break;
  }
  restore_owned();
  arena_free();
}

static void teardown(void) {
  g_func = "(teardown)";
  while (nhandles) destroy_handle_now(handles[nhandles - 1].h);
  while (ngroups) destroy_group_now(groups[ngroups - 1].g);
  while (ntensors) destroy_tensor_now(tensors[ntensors - 1]);
  for (int i = 0; i < NCOMMS; i++) fake_comm_destroy(comms[i]);
  if (alloc_outstanding != 0)
    violation(F_GroupDestroy, "the custom allocator has %ld block(s) outstanding after teardown", alloc_outstanding);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t env_u64(const char *name, uint64_t dflt) {
  const char *v = getenv(name);
  return v && *v ? strtoull(v, NULL, 0) : dflt;
}

int main(int argc, char **argv) {
  g_seed = env_u64("FUZZ_SEED", 0);
  uint64_t max_calls = env_u64("FUZZ_CALLS", 0);
  double seconds = (double)env_u64("FUZZ_SECONDS", 0);
  g_verbose = (int)env_u64("FUZZ_VERBOSE", 0);
  g_cross_type = (int)env_u64("FUZZ_CROSS_TYPE", 1); /* CROSS_TYPE: on */
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--seed") && i + 1 < argc) g_seed = strtoull(argv[++i], NULL, 0);
    else if (!strcmp(argv[i], "--calls") && i + 1 < argc) max_calls = strtoull(argv[++i], NULL, 0);
    else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) seconds = strtod(argv[++i], NULL);
    else if (!strcmp(argv[i], "--verbose")) g_verbose = 1;
    else if (!strcmp(argv[i], "--cross-type") && i + 1 < argc) g_cross_type = atoi(argv[++i]);
    else {
      fprintf(stderr, "usage: %s [--seed S] [--calls N] [--seconds T] [--verbose] [--cross-type 0|1]\n", argv[0]);
      return 64;
    }
  }
  if (g_seed == 0) g_seed = ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid();
  if (max_calls == 0 && seconds <= 0) max_calls = 20000;
  rng_state = g_seed;
  printf("fuzz: seed %llu (reproduce with --seed %llu)%s\n", (unsigned long long)g_seed,
         (unsigned long long)g_seed,
         g_cross_type ? "" : " [FUZZ_CROSS_TYPE=0: cross-type picks off]");
  fflush(stdout);

  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;
  int sigs[] = {SIGSEGV, SIGBUS, SIGABRT, SIGILL, SIGFPE};
  for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++) sigaction(sigs[i], &sa, NULL);

  /* fake communicators: several rank counts, and bad ones (rank >= nranks, nranks 0, negative) */
  static const int cn[NCOMMS][2] = {{1, 0}, {2, 1}, {4, 0}, {4, 3}, {8, 5}, {16, 15},
                                    {3, 2}, {64, 63}, {128, 0}, {4, 4}, {0, 0}, {-2, 0}};
  for (int i = 0; i < NCOMMS; i++) {
    comms[i] = fake_comm_create(cn[i][0], cn[i][1], 0);
    comm_nranks[i] = cn[i][0];
  }

  double t0 = now_s(), deadline = seconds > 0 ? t0 + seconds : 0;
  for (g_iter = 0;; g_iter++) {
    if (max_calls && calls >= max_calls) break;
    if (deadline && (g_iter & 255) == 0 && now_s() >= deadline) break;
    one_call();
  }
  uint64_t iters = g_iter;
  teardown();
  double el = now_s() - t0;

  uint64_t crashes = 0; /* a crash never gets here: the signal handler exits 2 */
  printf("fuzz: %llu calls, %llu crashes, return codes:", (unsigned long long)calls, (unsigned long long)crashes);
  static const char *rcname[10] = {"success", "unhandled_cuda", "system", "internal", "invalid_argument",
                                   "invalid_usage", "remote", "in_progress", "timeout", ""};
  for (int r = 0; r <= 8; r++)
    if (rc_hist[r]) printf(" %d(%s)=%llu", r, rcname[r], (unsigned long long)rc_hist[r]);
  if (rc_other) printf(" other=%llu", (unsigned long long)rc_other);
  printf("\n");
  printf("fuzz: %llu iterations in %.1f s (%.0f calls/s), seed %llu\n", (unsigned long long)iters, el,
         el > 0 ? (double)calls / el : 0.0, (unsigned long long)g_seed);
  printf("fuzz: created %llu groups, %llu handles, %llu descriptors (all destroyed)\n",
         (unsigned long long)created[0], (unsigned long long)created[1], (unsigned long long)created[2]);
  printf("fuzz: destroyed group/handle addresses reused by malloc: %llu by the same kind, %llu by another kind\n",
         (unsigned long long)reused_same, (unsigned long long)reused_cross);
  printf("fuzz: per function (calls/successes):");
  for (int i = 0; i < F_COUNT; i++)
    printf("%s %s=%llu/%llu", i % 4 ? "" : "\n ", fname[i], (unsigned long long)per_func[i],
           (unsigned long long)per_func_ok[i]);
  printf("\n");
  printf("fuzz: %llu invariant violations, %llu internal errors (panics)\n", (unsigned long long)violations,
         (unsigned long long)panics);
  return violations == 0 && panics == 0 ? 0 : 1;
}
