/* Error paths of all 18 entry points that need no GPU and no NCCL communicator.
 * Every expectation is the exact code src/abi returns: ncclInvalidArgument (4) for NULL, stale
 * or foreign pointers, struct sizes below V1, wrong magics, bad enum values and shapes;
 * ncclSuccess for the documented no-ops (destroying NULL). Out-pointers must be NULL after a
 * failure, and ncclEpxGetLastError() must describe each failure (see test_util.h). */
#include <pthread.h>
#include "test_util.h"

#define E4 ncclInvalidArgument

/* A caller struct followed by room, so that sizes above sizeof stay inside the object. */
typedef union {
  unsigned char bytes[256];
  struct {
    unsigned int size, magic;
  } h;
  ncclEpGroupConfig_t gc;
  ncclEpLayoutInfo_t li;
  ncclEpDispatchInputs_t di;
  ncclEpDispatchOutputs_t dout;
  ncclEpDispatchConfig_t dc;
  ncclEpCombineInputs_t ci;
  ncclEpCombineOutputs_t co;
  ncclEpCombineConfig_t cc;
  ncclEpCompleteConfig_t pc;
  ncclEpHandleConfig_t hc;
  ncclEpTensorAllocConfig_t ac;
} big_t;

static big_t with_header(unsigned int size, unsigned int magic) {
  big_t b;
  memset(&b, 0, sizeof b);
  b.h.size = size;
  b.h.magic = magic;
  return b;
}

static void test_version(void) {
  int v = -1;
  EXPECT_RC(ncclEpGetVersion(NULL), E4, "ncclEpGetVersion", "version");
  EXPECT_RC(ncclEpGetVersion(&v), ncclSuccess, "ncclEpGetVersion", NULL);
  CHECK(v == 100);
  CHECK(v == NCCL_EP_VERSION_CODE);
}

static void test_tensor_alloc(void) {
  const char *F = "ncclEpTensorAlloc";
  size_t sizes[9] = {4, 8, 1, 1, 1, 1, 1, 1, 1};
  ncclEpTensor_t *t = (ncclEpTensor_t *)SENTINEL;

  EXPECT_RC(ncclEpTensorAlloc(NULL, 2, ncclFloat32, sizes, NULL), E4, F, "tensor");
  EXPECT_RC(ncclEpTensorAlloc(&t, 2, ncclFloat32, NULL, NULL), E4, F, "sizes");
  CHECK(t == NULL);
  t = (ncclEpTensor_t *)SENTINEL;
  EXPECT_RC(ncclEpTensorAlloc(&t, 0, ncclFloat32, sizes, NULL), E4, F, "ndim");
  CHECK(t == NULL);
  t = (ncclEpTensor_t *)SENTINEL;
  EXPECT_RC(ncclEpTensorAlloc(&t, 9, ncclFloat32, sizes, NULL), E4, F, "ndim");
  CHECK(t == NULL);
  /* any datatype, as NCCL EP: a descriptor is not a use (the call that uses it checks the type) */
  for (int dt = -1; dt <= 13; dt += 14) {
    t = NULL;
    EXPECT_RC(ncclEpTensorAlloc(&t, 2, (ncclDataType_t)dt, sizes, NULL), ncclSuccess, F, NULL);
    CHECK(t != NULL && (int)t->datatype == dt);
    if (t) EXPECT_RC(ncclEpTensorDestroy(t), ncclSuccess, "ncclEpTensorDestroy", NULL);
  }

  /* the optional config: checked by the struct-size rule */
  ncclEpTensorAllocConfig_t zero;
  memset(&zero, 0, sizeof zero);
  ncclEpTensorAllocConfig_t bad_magic = NCCL_EP_TENSOR_ALLOC_CONFIG_INIT;
  bad_magic.magic = NCCL_EP_TENSOR_MAGIC;
  ncclEpTensorAllocConfig_t small = NCCL_EP_TENSOR_ALLOC_CONFIG_INIT;
  small.size = 7;
  t = (ncclEpTensor_t *)SENTINEL;
  EXPECT_RC(ncclEpTensorAlloc(&t, 2, ncclFloat32, sizes, &zero), E4, F, "size");
  CHECK(t == NULL);
  t = (ncclEpTensor_t *)SENTINEL;
  EXPECT_RC(ncclEpTensorAlloc(&t, 2, ncclFloat32, sizes, &small), E4, F, "size");
  CHECK(t == NULL);
  t = (ncclEpTensor_t *)SENTINEL;
  EXPECT_RC(ncclEpTensorAlloc(&t, 2, ncclFloat32, sizes, &bad_magic), E4, F, "magic");
  CHECK(t == NULL);
  big_t larger = with_header(64, NCCL_EP_MAGIC); /* a future, larger config is accepted */
  EXPECT_RC(ncclEpTensorAlloc(&t, 2, ncclFloat32, sizes, &larger.ac), ncclSuccess, F, NULL);
  EXPECT_RC(ncclEpTensorDestroy(t), ncclSuccess, "ncclEpTensorDestroy", NULL);

  /* every data type 0..12 (ncclFloat4x2 = 12) and every rank 1..8 */
  for (int dt = 0; dt <= 12; dt++) {
    for (unsigned nd = 1; nd <= 8; nd++) {
      ncclEpTensorAllocConfig_t cfg = NCCL_EP_TENSOR_ALLOC_CONFIG_INIT;
      t = NULL;
      EXPECT_RC(ncclEpTensorAlloc(&t, nd, (ncclDataType_t)dt, sizes, (dt & 1) ? &cfg : NULL), ncclSuccess, F, NULL);
      CHECK(t != NULL);
      if (t == NULL) continue;
      CHECK(t->size == 48 && t->ndim == nd && (int)t->datatype == dt);
      CHECK(t->magic == 0xBEEFBEEFu); /* upstream's marker of library-owned descriptors */
      CHECK(t->data == NULL && t->win_hdl == NULL && t->win_offset == 0);
      CHECK(t->sizes != NULL && t->sizes != sizes);
      CHECK(t->sizes != NULL && memcmp(t->sizes, sizes, nd * sizeof(size_t)) == 0);
      EXPECT_RC(ncclEpTensorDestroy(t), ncclSuccess, "ncclEpTensorDestroy", NULL);
    }
  }

  /* the descriptor keeps its own copy of the extents */
  size_t mine[2] = {3, 5};
  EXPECT_RC(ncclEpTensorAlloc(&t, 2, ncclBfloat16, mine, NULL), ncclSuccess, F, NULL);
  mine[0] = 99;
  CHECK(t->sizes[0] == 3 && t->sizes[1] == 5);
  EXPECT_RC(ncclEpTensorDestroy(t), ncclSuccess, "ncclEpTensorDestroy", NULL);
}

static void test_tensor_destroy(void) {
  const char *F = "ncclEpTensorDestroy";
  size_t sizes[2] = {2, 2};
  ncclEpTensor_t *t = NULL;

  EXPECT_RC(ncclEpTensorDestroy(NULL), ncclSuccess, F, NULL);

  /* round trip, then a double destroy */
  EXPECT_RC(ncclEpTensorAlloc(&t, 2, ncclInt64, sizes, NULL), ncclSuccess, "ncclEpTensorAlloc", NULL);
  EXPECT_RC(ncclEpTensorDestroy(t), ncclSuccess, F, NULL);
  EXPECT_RC(ncclEpTensorDestroy(t), E4, F, "already destroyed");

  /* stack descriptors are not the library's to free */
  ncclEpTensor_t stack = NCCL_EP_TENSOR_INIT;
  stack.ndim = 2;
  stack.datatype = ncclInt64;
  stack.sizes = sizes;
  EXPECT_RC(ncclEpTensorDestroy(&stack), E4, F, "ncclEpTensorAlloc");
  ncclEpTensor_t garbage;
  memset(&garbage, 0xA5, sizeof garbage);
  EXPECT_RC(ncclEpTensorDestroy(&garbage), E4, F, NULL);
  ncclEpTensor_t forged = stack; /* claims to be library-owned */
  forged.magic = 0xBEEFBEEFu;
  EXPECT_RC(ncclEpTensorDestroy(&forged), E4, F, NULL);

  /* a descriptor whose sizes pointer was replaced is refused, then freed once restored */
  EXPECT_RC(ncclEpTensorAlloc(&t, 2, ncclInt64, sizes, NULL), ncclSuccess, "ncclEpTensorAlloc", NULL);
  size_t *own = t->sizes;
  t->sizes = sizes;
  EXPECT_RC(ncclEpTensorDestroy(t), E4, F, "sizes");
  t->sizes = own;
  EXPECT_RC(ncclEpTensorDestroy(t), ncclSuccess, F, NULL);

  /* many live descriptors at once, destroyed in another order */
  enum { N = 500 };
  static ncclEpTensor_t *many[N];
  for (int i = 0; i < N; i++) {
    size_t s[1] = {(size_t)i};
    many[i] = NULL;
    if (ncclEpTensorAlloc(&many[i], 1, ncclUint8, s, NULL) != ncclSuccess) t_failures++;
  }
  for (int i = N - 1; i >= 0; i -= 2) CHECK(many[i] && ncclEpTensorDestroy(many[i]) == ncclSuccess);
  for (int i = 0; i < N; i += 2) CHECK(many[i] && many[i]->sizes[0] == (size_t)i);
  for (int i = 0; i < N; i += 2) CHECK(many[i] && ncclEpTensorDestroy(many[i]) == ncclSuccess);
}

static void test_create_group(void) {
  const char *F = "ncclEpCreateGroup";
  ncclEpGroupConfig_t cfg = NCCL_EP_GROUP_CONFIG_INIT;
  cfg.num_experts = 8;
  cfg.max_dispatch_tokens_per_rank = 16;
  cfg.max_token_bytes = 256;
  ncclEpGroup_t g = (ncclEpGroup_t)SENTINEL;
  ncclComm_t garbage_comm = (ncclComm_t)(uintptr_t)0x10; /* dereferencing it would crash */

  EXPECT_RC(ncclEpCreateGroup(NULL, NULL, &cfg), E4, F, "ep_group");
  EXPECT_RC(ncclEpCreateGroup(&g, NULL, NULL), E4, F, "config");
  CHECK(g == NULL);

  /* with no NCCL communicator, a valid config fails on the comm */
  g = (ncclEpGroup_t)SENTINEL;
  EXPECT_RC(ncclEpCreateGroup(&g, NULL, &cfg), E4, F, "comm");
  CHECK(g == NULL);
  big_t v1 = with_header(NCCL_EP_GROUP_CONFIG_V1_SIZE, NCCL_EP_MAGIC);
  memcpy(&v1.gc, &cfg, NCCL_EP_GROUP_CONFIG_V1_SIZE);
  v1.gc.size = NCCL_EP_GROUP_CONFIG_V1_SIZE;
  EXPECT_RC(ncclEpCreateGroup(&g, NULL, &v1.gc), E4, F, "comm");
  big_t future = with_header(200, NCCL_EP_MAGIC);
  memcpy(&future.gc, &cfg, sizeof cfg);
  future.gc.size = 200;
  EXPECT_RC(ncclEpCreateGroup(&g, NULL, &future.gc), E4, F, "comm");

  /* a bad header fails before the comm is looked at (garbage_comm is never touched) */
  ncclEpGroupConfig_t zero;
  memset(&zero, 0, sizeof zero);
  ncclEpGroupConfig_t c95 = cfg;
  c95.size = NCCL_EP_GROUP_CONFIG_V1_SIZE - 1;
  ncclEpGroupConfig_t cmagic = cfg;
  cmagic.magic = NCCL_EP_TENSOR_MAGIC;
  ncclEpGroupConfig_t cmagic0 = cfg;
  cmagic0.magic = 0;
  const ncclEpGroupConfig_t *bad[] = {&zero, &c95, &cmagic, &cmagic0};
  const char *why[] = {"size", "size", "magic", "magic"};
  for (int i = 0; i < 4; i++) {
    g = (ncclEpGroup_t)SENTINEL;
    EXPECT_RC(ncclEpCreateGroup(&g, garbage_comm, bad[i]), E4, F, why[i]);
    CHECK(g == NULL);
    g = (ncclEpGroup_t)SENTINEL;
    EXPECT_RC(ncclEpCreateGroup(&g, NULL, bad[i]), E4, F, why[i]);
    CHECK(g == NULL);
  }
}

static void test_group_functions(void) {
  int x = 0, mask[8] = {0}, err = -1;
  size_t sz = 0;
  ncclEpHandle_t h = (ncclEpHandle_t)SENTINEL;
  ncclEpHandleConfig_t hc = NCCL_EP_HANDLE_CONFIG_INIT;
  size_t tsz[2] = {4, 2};
  ncclEpTensor_t topk = NCCL_EP_TENSOR_INIT;
  topk.ndim = 2;
  topk.datatype = ncclInt64;
  topk.sizes = tsz;
  topk.data = SENTINEL;
  ncclEpGroup_t groups[2] = {NULL, NOT_A_GROUP(x)};
  const char *why[2] = {"ep_group is NULL", "not a live group"};

  EXPECT_RC(ncclEpGroupDestroy(NULL), ncclSuccess, "ncclEpGroupDestroy", NULL);
  EXPECT_RC(ncclEpGroupDestroy(NOT_A_GROUP(x)), E4, "ncclEpGroupDestroy", "not a live group");
  for (int i = 0; i < 2; i++) {
    ncclEpGroup_t g = groups[i];
    EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, &sz, 2), E4, "ncclEpHandleMemSize", why[i]);
    EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hc, NULL, 2), E4, "ncclEpHandleMemSize", NULL);
    h = (ncclEpHandle_t)SENTINEL;
    EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, NULL), E4, "ncclEpInitHandle", why[i]);
    CHECK(h == NULL);
    h = (ncclEpHandle_t)SENTINEL;
    EXPECT_RC(ncclEpCreateHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &topk, NULL, NULL, NULL), E4,
              "ncclEpCreateHandle", why[i]);
    CHECK(h == NULL);
    EXPECT_RC(ncclEpMaskQuery(g, mask, NULL), E4, "ncclEpMaskQuery", why[i]);
    EXPECT_RC(ncclEpMaskUpdate(g, mask, NULL), E4, "ncclEpMaskUpdate", why[i]);
    EXPECT_RC(ncclEpMaskClean(g, NULL), E4, "ncclEpMaskClean", why[i]);
    EXPECT_RC(ncclEpGetAsyncError(g, &err), E4, "ncclEpGetAsyncError", why[i]);
    EXPECT_RC(ncclEpGetAsyncError(g, NULL), E4, "ncclEpGetAsyncError", NULL);
    EXPECT_RC(ncclEpErrorClear(g), E4, "ncclEpErrorClear", why[i]);
  }
  EXPECT_RC(ncclEpInitHandle(NULL, NULL, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, NULL), E4, "ncclEpInitHandle",
            "handle");
  EXPECT_RC(ncclEpCreateHandle(NULL, NULL, NCCL_EP_LAYOUT_EXPERT_MAJOR, &topk, NULL, NULL, NULL), E4,
            "ncclEpCreateHandle", "handle");
}

static void test_handle_functions(void) {
  int x = 0;
  size_t tsz[2] = {4, 2};
  ncclEpTensor_t topk = NCCL_EP_TENSOR_INIT;
  topk.ndim = 2;
  topk.datatype = ncclInt64;
  topk.sizes = tsz;
  topk.data = SENTINEL;
  ncclEpHandle_t handles[2] = {NULL, NOT_A_HANDLE(x)};
  const char *why[2] = {"handle is NULL", "not a live handle"};
  ncclEpDispatchInputs_t di = NCCL_EP_DISPATCH_INPUTS_INIT;
  ncclEpDispatchOutputs_t dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
  ncclEpLayoutInfo_t li = NCCL_EP_LAYOUT_INFO_INIT;
  ncclEpDispatchConfig_t dc = NCCL_EP_DISPATCH_CONFIG_INIT;
  ncclEpCombineInputs_t ci = NCCL_EP_COMBINE_INPUTS_INIT;
  ncclEpCombineOutputs_t co = NCCL_EP_COMBINE_OUTPUTS_INIT;
  ncclEpCombineConfig_t cc = NCCL_EP_COMBINE_CONFIG_INIT;
  ncclEpCompleteConfig_t pc = NCCL_EP_COMPLETE_CONFIG_INIT;

  EXPECT_RC(ncclEpHandleDestroy(NULL), ncclSuccess, "ncclEpHandleDestroy", NULL);
  EXPECT_RC(ncclEpHandleDestroy(NOT_A_HANDLE(x)), E4, "ncclEpHandleDestroy", "not a live handle");
  for (int i = 0; i < 2; i++) {
    ncclEpHandle_t h = handles[i];
    EXPECT_RC(ncclEpUpdateHandle(h, &topk, NULL, NULL), E4, "ncclEpUpdateHandle", why[i]);
    EXPECT_RC(ncclEpUpdateHandle(h, NULL, NULL, NULL), E4, "ncclEpUpdateHandle", why[i]);
    /* valid structs (current and NULL optionals) get as far as the handle */
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, "ncclEpDispatch", why[i]);
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, NULL, NULL), E4, "ncclEpDispatch", why[i]);
    EXPECT_RC(ncclEpCombine(h, &ci, &co, &cc, NULL), E4, "ncclEpCombine", why[i]);
    EXPECT_RC(ncclEpCombine(h, &ci, &co, NULL, NULL), E4, "ncclEpCombine", why[i]);
    EXPECT_RC(ncclEpComplete(h, &pc, NULL), E4, "ncclEpComplete", why[i]);
    EXPECT_RC(ncclEpComplete(h, NULL, NULL), E4, "ncclEpComplete", why[i]);
  }
}

/* Struct checks of Dispatch/Combine/Complete come before the handle is looked at. */
static void test_op_structs(void) {
  ncclEpHandle_t h = NULL;
  ncclEpDispatchInputs_t di = NCCL_EP_DISPATCH_INPUTS_INIT;
  ncclEpDispatchOutputs_t dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
  ncclEpLayoutInfo_t li = NCCL_EP_LAYOUT_INFO_INIT;
  ncclEpDispatchConfig_t dc = NCCL_EP_DISPATCH_CONFIG_INIT;
  ncclEpCombineInputs_t ci = NCCL_EP_COMBINE_INPUTS_INIT;
  ncclEpCombineOutputs_t co = NCCL_EP_COMBINE_OUTPUTS_INIT;
  ncclEpCombineConfig_t cc = NCCL_EP_COMBINE_CONFIG_INIT;
  ncclEpCompleteConfig_t pc = NCCL_EP_COMPLETE_CONFIG_INIT;
  big_t zero = with_header(0, 0);
  const char *D = "ncclEpDispatch", *C = "ncclEpCombine";

  EXPECT_RC(ncclEpDispatch(h, NULL, &dout, NULL, NULL, NULL), E4, D, "inputs");
  EXPECT_RC(ncclEpDispatch(h, &zero.di, &dout, NULL, NULL, NULL), E4, D, "inputs");
  EXPECT_RC(ncclEpDispatch(h, &di, NULL, NULL, NULL, NULL), E4, D, "outputs");
  EXPECT_RC(ncclEpDispatch(h, &di, &zero.dout, NULL, NULL, NULL), E4, D, "outputs");
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &zero.li, NULL, NULL), E4, D, "layout_info");
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, &zero.dc, NULL), E4, D, "config");
  {
    big_t b = with_header(NCCL_EP_DISPATCH_INPUTS_V1_SIZE - 1, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpDispatch(h, &b.di, &dout, NULL, NULL, NULL), E4, D, "size");
    b = with_header(NCCL_EP_DISPATCH_OUTPUTS_V1_SIZE - 1, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpDispatch(h, &di, &b.dout, NULL, NULL, NULL), E4, D, "size");
    b = with_header(NCCL_EP_LAYOUT_INFO_V1_SIZE - 1, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, &b.li, NULL, NULL), E4, D, "size");
    b = with_header(NCCL_EP_DISPATCH_CONFIG_V1_SIZE - 1, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, &b.dc, NULL), E4, D, "size");
    b = with_header(sizeof di, NCCL_EP_TENSOR_MAGIC);
    EXPECT_RC(ncclEpDispatch(h, &b.di, &dout, NULL, NULL, NULL), E4, D, "magic");
    b = with_header(sizeof dout, 0xC00FFFEFu);
    EXPECT_RC(ncclEpDispatch(h, &di, &b.dout, NULL, NULL, NULL), E4, D, "magic");
    b = with_header(sizeof li, 0);
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, &b.li, NULL, NULL), E4, D, "magic");
    b = with_header(sizeof dc, 1);
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, &b.dc, NULL), E4, D, "magic");
    /* sizes between V1 and V2, and above V2, pass the header check */
    b = with_header(NCCL_EP_LAYOUT_INFO_V1_SIZE + 4, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, &b.li, NULL, NULL), E4, D, "handle is NULL");
    b = with_header(200, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, &b.dc, NULL), E4, D, "handle is NULL");
  }

  EXPECT_RC(ncclEpCombine(h, NULL, &co, NULL, NULL), E4, C, "inputs");
  EXPECT_RC(ncclEpCombine(h, &zero.ci, &co, NULL, NULL), E4, C, "inputs");
  EXPECT_RC(ncclEpCombine(h, &ci, NULL, NULL, NULL), E4, C, "outputs");
  EXPECT_RC(ncclEpCombine(h, &ci, &zero.co, NULL, NULL), E4, C, "outputs");
  EXPECT_RC(ncclEpCombine(h, &ci, &co, &zero.cc, NULL), E4, C, "config");
  {
    big_t b = with_header(NCCL_EP_COMBINE_INPUTS_V1_SIZE - 1, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpCombine(h, &b.ci, &co, NULL, NULL), E4, C, "size");
    b = with_header(NCCL_EP_COMBINE_OUTPUTS_V1_SIZE - 1, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpCombine(h, &ci, &b.co, NULL, NULL), E4, C, "size");
    b = with_header(NCCL_EP_COMBINE_CONFIG_V1_SIZE - 1, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpCombine(h, &ci, &co, &b.cc, NULL), E4, C, "size");
    b = with_header(sizeof ci, ~NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpCombine(h, &b.ci, &co, NULL, NULL), E4, C, "magic");
    b = with_header(sizeof cc, NCCL_EP_TENSOR_MAGIC);
    EXPECT_RC(ncclEpCombine(h, &ci, &co, &b.cc, NULL), E4, C, "magic");
    b = with_header(NCCL_EP_COMBINE_INPUTS_V1_SIZE, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpCombine(h, &b.ci, &co, NULL, NULL), E4, C, "handle is NULL");
  }

  EXPECT_RC(ncclEpComplete(h, &zero.pc, NULL), E4, "ncclEpComplete", "config");
  {
    big_t b = with_header(NCCL_EP_COMPLETE_CONFIG_V1_SIZE - 1, NCCL_EP_MAGIC);
    EXPECT_RC(ncclEpComplete(h, &b.pc, NULL), E4, "ncclEpComplete", "size");
    b = with_header(sizeof pc, 0);
    EXPECT_RC(ncclEpComplete(h, &b.pc, NULL), E4, "ncclEpComplete", "magic");
  }
}

/* The messages are copied: a thread's message dies with the thread. */
static void *thread_last_error(void *arg) {
  char(*out)[256] = (char(*)[256])arg;
  const char *m = ncclEpxGetLastError(); /* this thread has failed nothing yet */
  snprintf(out[0], 256, "%s", m ? m : "(NULL)");
  (void)ncclEpTensorDestroy((ncclEpTensor_t *)SENTINEL);
  m = ncclEpxGetLastError();
  snprintf(out[1], 256, "%s", m ? m : "(NULL)");
  return NULL;
}

static void test_last_error_is_per_thread(void) {
  char seen[2][256] = {"x", "x"};
  (void)ncclEpGetVersion(NULL);
  pthread_t th;
  CHECK(pthread_create(&th, NULL, thread_last_error, seen) == 0);
  CHECK(pthread_join(th, NULL) == 0);
  CHECK(seen[0][0] == '\0');
  CHECK(strncmp(seen[1], "ncclEpTensorDestroy:", 20) == 0);
  const char *mine = ncclEpxGetLastError();
  CHECK(mine != NULL && strncmp(mine, "ncclEpGetVersion:", 17) == 0);
  /* a successful call leaves the last message in place */
  int v;
  CHECK(ncclEpGetVersion(&v) == ncclSuccess);
  CHECK(strncmp(ncclEpxGetLastError(), "ncclEpGetVersion:", 17) == 0);
}

int main(void) {
  test_version();
  test_tensor_alloc();
  test_tensor_destroy();
  test_create_group();
  test_group_functions();
  test_handle_functions();
  test_op_structs();
  test_last_error_is_per_thread();
  return t_finish("errors");
}
