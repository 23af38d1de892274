/* An API-v1 caller: its own copies of the five structs that grew in v2, at their v1 sizes
 * (group config 96, layout info 40, dispatch config 20, combine inputs 24, combine config 16),
 * with version = 1, passed to the v2 library cast to the v2 types (api-v2-delta.md 1.6).
 * Each v1 struct sits right before 0xFF bytes: a library that read past the caller's size would
 * find invalid enum values there (or a wild tensor pointer) and fail, or crash.
 * Part 1 needs nothing; part 2 creates groups on a fake NCCL communicator (fake_nccl.c) and is
 * skipped, not failed, when the build cannot make a group without a GPU. */
#include <stdint.h>
#include "fake_nccl.h"
#include "test_util.h"

#define E4 ncclInvalidArgument

typedef struct {
  unsigned int size, magic, version;
  int algorithm;
  unsigned int num_experts, max_dispatch_tokens_per_rank, max_recv_tokens_per_rank, max_token_bytes;
  unsigned long rdma_buffer_size;
  unsigned int num_qp_per_rank, num_channels, max_num_sms;
  struct {
    void *alloc_fn, *free_fn, *context;
  } alloc;
  int enable_mask;
  uint64_t timeout_ns;
} v1_group_config_t;

typedef struct {
  unsigned int size, magic;
  ncclEpTensor_t *expert_counters, *src_rank_counters, *expert_offsets, *recv_total_counter;
} v1_layout_info_t;

typedef struct {
  unsigned int size, magic, send_only, round_scales;
  int pass_direction;
} v1_dispatch_config_t;

typedef struct {
  unsigned int size, magic;
  ncclEpTensor_t *tokens, *topk_weights;
} v1_combine_inputs_t;

typedef struct {
  unsigned int size, magic, send_only;
  int pass_direction;
} v1_combine_config_t;

_Static_assert(sizeof(v1_group_config_t) == 96 && sizeof(v1_group_config_t) == NCCL_EP_GROUP_CONFIG_V1_SIZE, "v1");
_Static_assert(sizeof(v1_layout_info_t) == 40 && sizeof(v1_layout_info_t) == NCCL_EP_LAYOUT_INFO_V1_SIZE, "v1");
_Static_assert(sizeof(v1_dispatch_config_t) == 20 && sizeof(v1_dispatch_config_t) == NCCL_EP_DISPATCH_CONFIG_V1_SIZE,
               "v1");
_Static_assert(sizeof(v1_combine_inputs_t) == 24 && sizeof(v1_combine_inputs_t) == NCCL_EP_COMBINE_INPUTS_V1_SIZE,
               "v1");
_Static_assert(sizeof(v1_combine_config_t) == 16 && sizeof(v1_combine_config_t) == NCCL_EP_COMBINE_CONFIG_V1_SIZE,
               "v1");

/* Each v1 struct followed by poison. */
#define POISONED(T) \
  struct {          \
    T v;            \
    unsigned char poison[64]; \
  }
static POISONED(v1_group_config_t) gcfg;
static POISONED(v1_layout_info_t) linfo;
static POISONED(v1_dispatch_config_t) dcfg;
static POISONED(v1_combine_inputs_t) cin;
static POISONED(v1_combine_config_t) ccfg;

static void reset_v1(void) {
  memset(&gcfg, 0xFF, sizeof gcfg);
  memset(&gcfg.v, 0, sizeof gcfg.v);
  gcfg.v.size = sizeof gcfg.v;
  gcfg.v.magic = NCCL_EP_MAGIC;
  gcfg.v.version = 1;
  gcfg.v.algorithm = 0;
  gcfg.v.num_experts = 8;
  gcfg.v.max_dispatch_tokens_per_rank = 16;
  gcfg.v.max_token_bytes = 256;
  memset(&linfo, 0xFF, sizeof linfo);
  memset(&linfo.v, 0, sizeof linfo.v);
  linfo.v.size = sizeof linfo.v;
  linfo.v.magic = NCCL_EP_MAGIC;
  memset(&dcfg, 0xFF, sizeof dcfg);
  memset(&dcfg.v, 0, sizeof dcfg.v);
  dcfg.v.size = sizeof dcfg.v;
  dcfg.v.magic = NCCL_EP_MAGIC;
  memset(&cin, 0xFF, sizeof cin);
  memset(&cin.v, 0, sizeof cin.v);
  cin.v.size = sizeof cin.v;
  cin.v.magic = NCCL_EP_MAGIC;
  memset(&ccfg, 0xFF, sizeof ccfg);
  memset(&ccfg.v, 0, sizeof ccfg.v);
  ccfg.v.size = sizeof ccfg.v;
  ccfg.v.magic = NCCL_EP_MAGIC;
}

#define GC ((const ncclEpGroupConfig_t *)(const void *)&gcfg.v)
#define LI ((const ncclEpLayoutInfo_t *)(const void *)&linfo.v)
#define DC ((const ncclEpDispatchConfig_t *)(const void *)&dcfg.v)
#define CI ((const ncclEpCombineInputs_t *)(const void *)&cin.v)
#define CC ((const ncclEpCombineConfig_t *)(const void *)&ccfg.v)

/* The last error does not blame `what`. */
static void not_about(const char *file, int line, const char *what) {
  const char *m = ncclEpxGetLastError();
  t_checks++;
  if (m && strstr(m, what)) {
    fprintf(stderr, "%s:%d: FAIL: a v1 struct was rejected: %s\n", file, line, m);
    t_failures++;
  }
}
#define NOT_ABOUT(what) not_about(__FILE__, __LINE__, what)

static void part1_without_a_group(void) {
  ncclEpGroup_t g = (ncclEpGroup_t)SENTINEL;
  reset_v1();
  /* the v1 group config passes the header check and fails only on the missing comm */
  EXPECT_RC(ncclEpCreateGroup(&g, NULL, GC), E4, "ncclEpCreateGroup", "comm is NULL");
  CHECK(g == NULL);
  gcfg.v.size = NCCL_EP_GROUP_CONFIG_V1_SIZE - 1;
  EXPECT_RC(ncclEpCreateGroup(&g, NULL, GC), E4, "ncclEpCreateGroup", "size is 95");
  reset_v1();
  gcfg.v.magic = NCCL_EP_TENSOR_MAGIC;
  EXPECT_RC(ncclEpCreateGroup(&g, NULL, GC), E4, "ncclEpCreateGroup", "magic");

  /* unchanged structs at their v1 (= current) size */
  ncclEpTensorAllocConfig_t ac = {NCCL_EP_TENSOR_ALLOC_CONFIG_V1_SIZE, NCCL_EP_MAGIC};
  size_t sizes[2] = {2, 3};
  ncclEpTensor_t *t = NULL;
  EXPECT_RC(ncclEpTensorAlloc(&t, 2, ncclBfloat16, sizes, &ac), ncclSuccess, "ncclEpTensorAlloc", NULL);
  EXPECT_RC(ncclEpTensorDestroy(t), ncclSuccess, "ncclEpTensorDestroy", NULL);

  /* v1 op structs pass the header checks and fail only on the missing handle */
  ncclEpDispatchInputs_t di = NCCL_EP_DISPATCH_INPUTS_INIT;
  ncclEpDispatchOutputs_t dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
  ncclEpCombineOutputs_t co = NCCL_EP_COMBINE_OUTPUTS_INIT;
  EXPECT_RC(ncclEpDispatch(NULL, &di, &dout, LI, DC, NULL), E4, "ncclEpDispatch", "handle is NULL");
  EXPECT_RC(ncclEpCombine(NULL, CI, &co, CC, NULL), E4, "ncclEpCombine", "handle is NULL");
  linfo.v.size = NCCL_EP_LAYOUT_INFO_V1_SIZE - 1;
  EXPECT_RC(ncclEpDispatch(NULL, &di, &dout, LI, DC, NULL), E4, "ncclEpDispatch", "size");
  reset_v1();
  dcfg.v.size = NCCL_EP_DISPATCH_CONFIG_V1_SIZE - 1;
  EXPECT_RC(ncclEpDispatch(NULL, &di, &dout, LI, DC, NULL), E4, "ncclEpDispatch", "size");
  reset_v1();
  cin.v.size = NCCL_EP_COMBINE_INPUTS_V1_SIZE - 1;
  EXPECT_RC(ncclEpCombine(NULL, CI, &co, CC, NULL), E4, "ncclEpCombine", "size");
  reset_v1();
  ccfg.v.size = NCCL_EP_COMBINE_CONFIG_V1_SIZE - 1;
  EXPECT_RC(ncclEpCombine(NULL, CI, &co, CC, NULL), E4, "ncclEpCombine", "size");
}

/* Returns 0 when skipped. */
static int part2_with_fake_nccl(void) {
  if (cuda_device_present()) {
    printf("SKIP part 2: a GPU is present (the fake communicator is for GPU-free machines)\n");
    return 0;
  }
  ncclComm_t comm = fake_comm_create(1, 0, 0);
  ncclEpGroup_t g = NULL;
  reset_v1();
  ncclResult_t rc = ncclEpCreateGroup(&g, comm, GC);
  if (rc == ncclUnhandledCudaError || rc == ncclSystemError || rc == ncclInternalError) {
    printf("SKIP part 2: this build cannot create a group without a GPU (%d: %s)\n", (int)rc,
           ncclEpxGetLastError());
    fake_comm_destroy(comm);
    return 0;
  }
  /* accepted, so the poison after byte 96 (zero_copy = overflow_policy = -1, num_topk = 0xFFFFFFFF)
   * was not read */
  EXPECT_RC(rc, ncclSuccess, "ncclEpCreateGroup", NULL);
  if (!g) return 1;
  EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);

  /* control: a v2-sized config with that poison in its v2 fields is refused, for its num_topk
   * (NCCL EP takes any zero_copy and overflow_policy value, and so do we) */
  {
    ncclEpGroupConfig_t v2 = NCCL_EP_GROUP_CONFIG_INIT;
    memcpy(&v2, &gcfg, sizeof v2);
    v2.size = sizeof v2;
    EXPECT_RC(ncclEpCreateGroup(&g, comm, &v2), E4, "ncclEpCreateGroup", "num_topk");
  }
  /* a size between v1 and v2 is read byte-wise: 100 covers zero_copy, not overflow_policy */
  reset_v1();
  gcfg.v.size = 100;
  memset(gcfg.poison, 0, 4); /* zero_copy = AUTO */
  g = NULL;
  EXPECT_RC(ncclEpCreateGroup(&g, comm, GC), ncclSuccess, "ncclEpCreateGroup", NULL);
  EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);
  /* versions 0, 1 and 2 are all accepted; only the size decides */
  for (unsigned v = 0; v <= 2; v++) {
    reset_v1();
    gcfg.v.version = v;
    g = NULL;
    EXPECT_RC(ncclEpCreateGroup(&g, comm, GC), ncclSuccess, "ncclEpCreateGroup", NULL);
    EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);
  }

  /* an LL group from the v1 config; handle config and tensors are unchanged in v2 */
  reset_v1();
  g = NULL;
  EXPECT_RC(ncclEpCreateGroup(&g, comm, GC), ncclSuccess, "ncclEpCreateGroup", NULL);
  ncclEpHandleConfig_t hc = {NCCL_EP_HANDLE_CONFIG_V1_SIZE, NCCL_EP_MAGIC, 0};
  size_t need = 0;
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hc, &need, 2), ncclSuccess, "ncclEpHandleMemSize",
            NULL);
  size_t sk[2] = {4, 2}, sx[2] = {4, 128};
  ncclEpTensor_t topk = NCCL_EP_TENSOR_INIT, x = NCCL_EP_TENSOR_INIT, y = NCCL_EP_TENSOR_INIT;
  topk.ndim = x.ndim = y.ndim = 2;
  topk.datatype = ncclInt64;
  x.datatype = y.datatype = ncclBfloat16;
  topk.sizes = sk;
  x.sizes = y.sizes = sx;
  topk.data = x.data = y.data = SENTINEL;
  ncclEpHandle_t h = NULL;
  EXPECT_RC(ncclEpCreateHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &topk, NULL, &hc, NULL), ncclSuccess,
            "ncclEpCreateHandle", NULL);
  /* the v1 layout info passes its header check: LL then refuses layout_info as such */
  EXPECT_RC(ncclEpUpdateHandle(h, &topk, LI, NULL), ncclInvalidUsage, "ncclEpUpdateHandle",
            "layout_info must be NULL");

  /* Dispatch: the poison after the v1 layout info would be recv_topk_idx_kind = -1, after the v1
   * dispatch config quant_recipe = -1; neither may be blamed (the call may still fail later:
   * no GPU) */
  ncclEpDispatchInputs_t di = NCCL_EP_DISPATCH_INPUTS_INIT;
  ncclEpDispatchOutputs_t dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
  di.tokens = &x;
  dout.tokens = &y;
  reset_v1();
  rc = ncclEpDispatch(h, &di, &dout, LI, DC, NULL);
  CHECK(rc != ncclSuccess); /* there is no GPU */
  NOT_ABOUT("ncclEpLayoutInfo_t");
  NOT_ABOUT("recv_topk_idx_kind");
  NOT_ABOUT("ncclEpDispatchConfig_t");
  NOT_ABOUT("quant_recipe");
  {
    /* control: the same poison inside a v2 layout info is refused where the kind is used (a
     * RANK_MAJOR dispatch writes expert ids; EXPERT_MAJOR ignores the kind, as NCCL EP does) */
    ncclEpLayoutInfo_t v2 = NCCL_EP_LAYOUT_INFO_INIT;
    memcpy(&v2, &linfo, sizeof v2);
    v2.size = sizeof v2;
    ncclEpHandle_t rm = NULL;
    EXPECT_RC(ncclEpCreateHandle(&rm, g, NCCL_EP_LAYOUT_RANK_MAJOR, &topk, NULL, &hc, NULL), ncclSuccess,
              "ncclEpCreateHandle", NULL);
    if (rm) {
      EXPECT_RC(ncclEpDispatch(rm, &di, &dout, &v2, NULL, NULL), E4, "ncclEpDispatch", "recv_topk_idx_kind");
      EXPECT_RC(ncclEpHandleDestroy(rm), ncclSuccess, "ncclEpHandleDestroy", NULL);
    }
  }

  /* Combine: the poison after the v1 inputs would be a wild `scales` tensor pointer */
  ncclEpCombineOutputs_t co = NCCL_EP_COMBINE_OUTPUTS_INIT;
  reset_v1();
  cin.v.tokens = &y;
  co.tokens = &x;
  rc = ncclEpCombine(h, CI, &co, CC, NULL);
  CHECK(rc != ncclSuccess);
  NOT_ABOUT("ncclEpCombineInputs_t");
  NOT_ABOUT("scales");
  NOT_ABOUT("ncclEpCombineConfig_t");
  NOT_ABOUT("quant_recipe");

  ncclEpCompleteConfig_t pc = {NCCL_EP_COMPLETE_CONFIG_V1_SIZE, NCCL_EP_MAGIC};
  EXPECT_RC(ncclEpComplete(h, &pc, NULL), ncclSuccess, "ncclEpComplete", NULL);
  EXPECT_RC(ncclEpHandleDestroy(h), ncclSuccess, "ncclEpHandleDestroy", NULL);
  EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);

  /* HT from a v1 config: group num_topk reads as 0 (unset), so any top-k is allowed */
  reset_v1();
  gcfg.v.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT;
  g = NULL;
  EXPECT_RC(ncclEpCreateGroup(&g, comm, GC), ncclSuccess, "ncclEpCreateGroup", NULL);
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_FLAT, &hc, &need, 8), ncclSuccess, "ncclEpHandleMemSize", NULL);
  EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);
  fake_comm_destroy(comm);
  return 1;
}

int main(void) {
  part1_without_a_group();
  part2_with_fake_nccl();
  return t_finish("v1_caller");
}
