/* Error paths that need a live group and handle, without a GPU: the groups are made on fake
 * communicators of a stand-in libnccl.so.2 (fake_nccl.c). Covers the group config rules, enum
 * values, tensor descriptors, handle rules, dispatch/combine argument checks up to the GPU
 * work, rank-mask mode checks, and stale group/handle pointers after destroy.
 * If a build of the library cannot create a group without a GPU (ncclEpCreateGroup reports a
 * CUDA, system or internal error for a valid config), the test is skipped (exit 77). */
#define _POSIX_C_SOURCE 200809L /* setenv */
#include "fake_nccl.h"
#include "test_util.h"

#define E4 ncclInvalidArgument
#define E5 ncclInvalidUsage

static ncclEpGroupConfig_t ll_config(void) {
  ncclEpGroupConfig_t c = NCCL_EP_GROUP_CONFIG_INIT;
  c.algorithm = NCCL_EP_ALGO_LOW_LATENCY;
  c.num_experts = 8;
  c.max_dispatch_tokens_per_rank = 16;
  c.max_token_bytes = 256;
  return c;
}

static ncclEpTensor_t tensor(unsigned ndim, ncclDataType_t dt, size_t *sizes) {
  ncclEpTensor_t t = NCCL_EP_TENSOR_INIT;
  t.ndim = ndim;
  t.datatype = dt;
  t.sizes = sizes;
  t.data = SENTINEL; /* never dereferenced by argument checks */
  return t;
}

static cudaError_t my_alloc(void **p, size_t n, void *ctx) {
  (void)p, (void)n, (void)ctx;
  return cudaErrorMemoryAllocation;
}

static void test_group_config(ncclComm_t comm4) {
  const char *F = "ncclEpCreateGroup";
  ncclEpGroup_t g;
  ncclEpGroupConfig_t c;
#define BAD_CONFIG(mutation, code, needle)                  \
  do {                                                      \
    c = ll_config();                                        \
    mutation;                                               \
    g = (ncclEpGroup_t)SENTINEL;                            \
    EXPECT_RC(ncclEpCreateGroup(&g, comm4, &c), code, F, needle); \
    CHECK(g == NULL);                                       \
  } while (0)
  BAD_CONFIG(c.algorithm = (ncclEpAlgorithm_t)2, E4, "algorithm");
  BAD_CONFIG(c.algorithm = (ncclEpAlgorithm_t)-1, E4, "algorithm");
  BAD_CONFIG(c.num_experts = 0, E4, "num_experts");
  BAD_CONFIG(c.max_token_bytes = 0, E4, "max_token_bytes");
  /* HIGH_THROUGHPUT only: NCCL EP takes any LOW_LATENCY bound (accepted below) */
  BAD_CONFIG((c.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT, c.max_token_bytes = 100), E4, "multiple of 16");
  BAD_CONFIG(c.max_dispatch_tokens_per_rank = 0, E4, "max_dispatch_tokens_per_rank");
  BAD_CONFIG(c.num_experts = 6, E5, "multiple of the number of ranks");
  BAD_CONFIG(c.alloc.alloc_fn = my_alloc, E5, "alloc");
  BAD_CONFIG(c.num_topk = 9, E4, "num_topk");
  BAD_CONFIG((c.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT, c.max_recv_tokens_per_rank = 8), E4,
             "max_recv_tokens_per_rank");
  BAD_CONFIG((c.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT, c.overflow_policy = NCCL_EP_OVERFLOW_DROP), E5, "DROP");
#undef BAD_CONFIG

  /* What NCCL EP accepts without a range check (docs/CONFORMANCE.md): a LOW_LATENCY
   * max_token_bytes that is no multiple of 16; any zero_copy (only ON acts) and any
   * overflow_policy (only DROP drops; the rest trap). These were ncclInvalidArgument. */
#define GOOD_CONFIG(mutation)                                              \
  do {                                                                     \
    c = ll_config();                                                       \
    mutation;                                                              \
    g = NULL;                                                              \
    EXPECT_RC(ncclEpCreateGroup(&g, comm4, &c), ncclSuccess, F, NULL);     \
    CHECK(g != NULL);                                                      \
    if (g) EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL); \
  } while (0)
  GOOD_CONFIG(c.max_token_bytes = 100);
  GOOD_CONFIG(c.zero_copy = NCCL_EP_ZERO_COPY_OFF);
  GOOD_CONFIG(c.zero_copy = NCCL_EP_ZERO_COPY_ON);
  GOOD_CONFIG(c.zero_copy = (ncclEpZeroCopyMode_t)3);
  GOOD_CONFIG(c.overflow_policy = (ncclEpOverflowPolicy_t)-1);
  GOOD_CONFIG(c.overflow_policy = NCCL_EP_OVERFLOW_DROP); /* LOW_LATENCY ignores it */
  GOOD_CONFIG((c.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT, c.max_recv_tokens_per_rank = 16,
               c.overflow_policy = (ncclEpOverflowPolicy_t)7));
#undef GOOD_CONFIG

  /* what the communicator reports is checked too; NCCL's own errors pass through */
  c = ll_config();
  ncclComm_t odd = fake_comm_create(4, 4, 0);
  g = (ncclEpGroup_t)SENTINEL;
  EXPECT_RC(ncclEpCreateGroup(&g, odd, &c), E4, F, "rank 4 of 4");
  CHECK(g == NULL);
  fake_comm_destroy(odd);
  int not_a_comm[8] = {0};
  EXPECT_RC(ncclEpCreateGroup(&g, (ncclComm_t)(void *)not_a_comm, &c), ncclInvalidArgument, F, "ncclCommCount");
  CHECK(g == NULL);
}

/* NCCL_EP_NODE_SIZE (docs/MULTINODE.md): ranks outside this rank's block are remote. LOW_LATENCY
 * and HIGH_THROUGHPUT groups accept them (staging or mirrors + NCCL point-to-point), a bad value
 * is an invalid argument, and ncclEpxBufferSize adds the staging regions. */
static void test_node_size(ncclComm_t comm4) {
  const char *F = "ncclEpCreateGroup";
  ncclEpGroupConfig_t c = ll_config();
  ncclEpGroup_t g;
  size_t one_node = 0, two_nodes = 0;
  EXPECT_RC(ncclEpxBufferSize(&c, 4, NCCL_EP_LAYOUT_EXPERT_MAJOR, 2, &one_node), ncclSuccess, "ncclEpxBufferSize", NULL);
  setenv("NCCL_EP_NODE_SIZE", "2", 1);
  g = NULL;
  EXPECT_RC(ncclEpCreateGroup(&g, comm4, &c), ncclSuccess, F, NULL);
  CHECK(g != NULL);
  if (g) EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);
  c.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT;
  c.max_recv_tokens_per_rank = 64;
  g = NULL;
  EXPECT_RC(ncclEpCreateGroup(&g, comm4, &c), ncclSuccess, F, NULL);
  CHECK(g != NULL);
  if (g) EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);
  c = ll_config();
  /* N = 4, E = 8, B = 16, Hb = 256, K = 2: signals 256 bytes, dmsg 288, the combine grid
   * 16 x 2 x 256 is the larger: a region is 256 + 8192 = 8448 bytes; 2 remote ranks, a send and
   * a receive region each. */
  EXPECT_RC(ncclEpxBufferSize(&c, 4, NCCL_EP_LAYOUT_EXPERT_MAJOR, 2, &two_nodes), ncclSuccess, "ncclEpxBufferSize", NULL);
  CHECK(two_nodes == one_node + 4 * 8448);
  setenv("NCCL_EP_NODE_SIZE", "4", 1); /* one node of four: nothing remote */
  EXPECT_RC(ncclEpxBufferSize(&c, 4, NCCL_EP_LAYOUT_EXPERT_MAJOR, 2, &two_nodes), ncclSuccess, "ncclEpxBufferSize", NULL);
  CHECK(two_nodes == one_node);
  setenv("NCCL_EP_NODE_SIZE", "0", 1);
  g = (ncclEpGroup_t)SENTINEL;
  EXPECT_RC(ncclEpCreateGroup(&g, comm4, &c), E4, F, "NCCL_EP_NODE_SIZE=0");
  CHECK(g == NULL);
  EXPECT_RC(ncclEpxBufferSize(&c, 4, NCCL_EP_LAYOUT_EXPERT_MAJOR, 2, &two_nodes), E4, "ncclEpxBufferSize",
            "positive number of ranks per node");
  unsetenv("NCCL_EP_NODE_SIZE");
}

static void test_tensor_reads(ncclEpGroup_t g) {
  /* the tensor checks, through InitHandle's optional handle_mem */
  const char *F = "ncclEpInitHandle";
  ncclEpHandle_t h;
  size_t need = 0, sz[2] = {0, 0}, nine[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1};
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, &need, 2), ncclSuccess, "ncclEpHandleMemSize",
            NULL);
  sz[0] = need > 0 ? need : 1;
  ncclEpTensor_t t;
#define BAD_TENSOR(mutation, code, needle)                                              \
  do {                                                                                  \
    t = tensor(1, ncclUint8, sz);                                                       \
    mutation;                                                                           \
    h = (ncclEpHandle_t)SENTINEL;                                                       \
    EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, &t), code, F, needle); \
    CHECK(h == NULL);                                                                   \
  } while (0)
  BAD_TENSOR(t.magic = 0, E4, "magic");
  BAD_TENSOR(t.magic = NCCL_EP_MAGIC, E4, "magic");
  BAD_TENSOR(t.magic = 0xBEEFBEEFu, E4, "ncclEpTensorAlloc"); /* forged library marker */
  BAD_TENSOR(t.size = 47, E4, "size");
  BAD_TENSOR(t.size = 0, E4, "size");
  BAD_TENSOR(t.ndim = 0, E4, "ndim");
  BAD_TENSOR((t.ndim = 9, t.sizes = nine), E4, "ndim");
  BAD_TENSOR(t.sizes = NULL, E4, "sizes");
  BAD_TENSOR(t.datatype = (ncclDataType_t)13, E4, "datatype");
  BAD_TENSOR(t.datatype = (ncclDataType_t)-1, E4, "datatype");
  BAD_TENSOR(t.data = NULL, E4, "data");
  /* window-backed (data NULL): resolved through NCCL, which refuses a handle that is no window
   * of this communicator (its code passes through); test_windows covers the rest */
  BAD_TENSOR((t.data = NULL, t.win_hdl = (ncclWindow_t)SENTINEL), E4, "ncclWinGetUserPtr");
  BAD_TENSOR(t.datatype = ncclFloat32, E4, "ncclUint8");
  BAD_TENSOR(t.ndim = 2, E4, "1-D");
  /* extents whose element count wraps size_t (2^40 x 2^40 = 2^80, 0 when wrapped) or whose
   * byte count does not fit: refused when the descriptor is read, never a wrapped size */
  size_t wrap[2] = {(size_t)1 << 40, (size_t)1 << 40}, wrap_bytes[2] = {(size_t)1 << 62, 2};
  BAD_TENSOR((t.ndim = 2, t.sizes = wrap), E4, "overflow");
  BAD_TENSOR((t.ndim = 2, t.sizes = wrap_bytes, t.datatype = ncclFloat32), E4, "overflow");
#undef BAD_TENSOR
  if (need > 0) {
    size_t small[1] = {need - 1};
    t = tensor(1, ncclUint8, small);
    EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, &t), E4, F, "shape");
  }
  /* a descriptor from ncclEpTensorAlloc is accepted while intact */
  ncclEpTensor_t *owned = NULL;
  CHECK(ncclEpTensorAlloc(&owned, 1, ncclUint8, sz, NULL) == ncclSuccess);
  if (owned) {
    owned->data = SENTINEL;
    h = NULL;
    EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, owned), ncclSuccess, F, NULL);
    CHECK(h != NULL);
    EXPECT_RC(ncclEpHandleDestroy(h), ncclSuccess, "ncclEpHandleDestroy", NULL);
    size_t *own = owned->sizes, other[1] = {sz[0]};
    owned->sizes = other;
    EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, owned), E4, F, "sizes pointer");
    owned->sizes = own;
    CHECK(ncclEpTensorDestroy(owned) == ncclSuccess);
    /* and refused once destroyed (the stale copy still says 0xBEEFBEEF) */
    ncclEpTensor_t stale = tensor(1, ncclUint8, sz);
    stale.magic = 0xBEEFBEEFu;
    EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, &stale), E4, F, "ncclEpTensorAlloc");
  }
}

static void test_handle_rules(ncclEpGroup_t g) {
  const char *M = "ncclEpHandleMemSize";
  size_t sz = 0;
  ncclEpHandleConfig_t hc = NCCL_EP_HANDLE_CONFIG_INIT;
  ncclEpHandleConfig_t hbad = NCCL_EP_HANDLE_CONFIG_INIT;
  hbad.magic = 0;
  ncclEpHandleConfig_t hsmall = NCCL_EP_HANDLE_CONFIG_INIT;
  hsmall.size = NCCL_EP_HANDLE_CONFIG_V1_SIZE - 1;
  ncclEpHandleConfig_t halign = NCCL_EP_HANDLE_CONFIG_INIT;
  halign.dispatch_output_per_expert_alignment = 3;

  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hc, &sz, 2), ncclSuccess, M, NULL);
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, &sz, 8), ncclSuccess, M, NULL);
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hc, NULL, 2), E4, M, "size_out");
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_UNSET, &hc, &sz, 2), E4, M, "UNSET");
  EXPECT_RC(ncclEpHandleMemSize(g, (ncclEpLayout_t)4, &hc, &sz, 2), E4, M, "layout");
  EXPECT_RC(ncclEpHandleMemSize(g, (ncclEpLayout_t)-1, &hc, &sz, 2), E4, M, "layout");
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hc, &sz, 0), E4, M, "num_topk");
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hc, &sz, -1), E4, M, "num_topk");
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hbad, &sz, 2), E4, M, "magic");
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hsmall, &sz, 2), E4, M, "size");
  /* NCCL EP's ncclEpHandleMemSize checks only the layout (set) and K (>= 1), and sizes anything
   * else; ncclEpInitHandle checks the rest. These three were refused (E5, E4, E4). */
  size_t sz_em = 0;
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, &sz_em, 2), ncclSuccess, M, NULL);
  sz = 0;
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_FLAT, &hc, &sz, 2), ncclSuccess, M, NULL);
  CHECK(sz == sz_em); /* the LOW_LATENCY block does not depend on the layout */
  sz = 0;
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &halign, &sz, 2), ncclSuccess, M, NULL);
  CHECK(sz == sz_em); /* the alignment is a HIGH_THROUGHPUT EXPERT_MAJOR field */
  sz = 0;
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hc, &sz, 9), ncclSuccess, M, NULL);
  CHECK(sz > sz_em);

  const char *I = "ncclEpInitHandle";
  ncclEpHandle_t h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_FLAT, NULL, 2, NULL), E5, I, "LOW_LATENCY");
  CHECK(h == NULL);
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, (ncclEpLayout_t)7, NULL, 2, NULL), E4, I, "layout");
  CHECK(h == NULL);
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hbad, 2, NULL), E4, I, "magic");
  CHECK(h == NULL);
  /* LOW_LATENCY top-k: 1..min(E, 32), NCCL EP's ncclInvalidArgument (here E = 8) */
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 9, NULL), E4, I, "num_topk");
  CHECK(h == NULL);
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, 0, NULL), E4, I, "num_topk");
  CHECK(h == NULL);
  /* the alignment is ignored outside HIGH_THROUGHPUT EXPERT_MAJOR (was ncclInvalidArgument) */
  h = NULL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &halign, 2, NULL), ncclSuccess, I, NULL);
  CHECK(h != NULL);
  if (h) EXPECT_RC(ncclEpHandleDestroy(h), ncclSuccess, "ncclEpHandleDestroy", NULL);
}

static void test_update_and_create(ncclEpGroup_t g) {
  const char *U = "ncclEpUpdateHandle", *C = "ncclEpCreateHandle";
  ncclEpHandle_t h = NULL;
  size_t s42[2] = {4, 2}, s43[2] = {4, 3}, s17[2] = {17, 2}, s4[1] = {4}, s16[2] = {16, 2}, s0[2] = {0, 2};
  ncclEpTensor_t ok64 = tensor(2, ncclInt64, s42), ok32 = tensor(2, ncclInt32, s42);
  ncclEpTensor_t full = tensor(2, ncclInt64, s16), empty = tensor(2, ncclInt64, s0);
  empty.data = NULL;
  ncclEpTensor_t wrong_k = tensor(2, ncclInt64, s43), too_many = tensor(2, ncclInt64, s17);
  ncclEpTensor_t flt = tensor(2, ncclFloat32, s42), one_d = tensor(1, ncclInt64, s4);
  ncclEpTensor_t nodata = tensor(2, ncclInt64, s42);
  nodata.data = NULL;
  ncclEpLayoutInfo_t li = NCCL_EP_LAYOUT_INFO_INIT;
  ncclEpLayoutInfo_t li_bad = NCCL_EP_LAYOUT_INFO_INIT;
  li_bad.magic = NCCL_EP_TENSOR_MAGIC;

  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, NULL), ncclSuccess, "ncclEpInitHandle",
            NULL);
  CHECK(h != NULL);
  EXPECT_RC(ncclEpUpdateHandle(h, NULL, NULL, NULL), E4, U, "topk_idx is NULL");
  EXPECT_RC(ncclEpUpdateHandle(h, &wrong_k, NULL, NULL), E4, U, "topk_idx");
  EXPECT_RC(ncclEpUpdateHandle(h, &too_many, NULL, NULL), E4, U, "max_dispatch_tokens_per_rank");
  EXPECT_RC(ncclEpUpdateHandle(h, &flt, NULL, NULL), E4, U, "ncclInt64");
  EXPECT_RC(ncclEpUpdateHandle(h, &one_d, NULL, NULL), E4, U, "2-D");
  EXPECT_RC(ncclEpUpdateHandle(h, &nodata, NULL, NULL), E4, U, "data");
  EXPECT_RC(ncclEpUpdateHandle(h, &ok64, &li_bad, NULL), E4, U, "magic");
  EXPECT_RC(ncclEpUpdateHandle(h, &ok64, &li, NULL), E5, U, "layout_info must be NULL");
  EXPECT_RC(ncclEpUpdateHandle(h, &ok64, NULL, NULL), ncclSuccess, U, NULL);
  EXPECT_RC(ncclEpUpdateHandle(h, &ok32, NULL, NULL), ncclSuccess, U, NULL);
  EXPECT_RC(ncclEpUpdateHandle(h, &full, NULL, NULL), ncclSuccess, U, NULL);
  EXPECT_RC(ncclEpUpdateHandle(h, &empty, NULL, NULL), ncclSuccess, U, NULL);

  /* a group with a live handle refuses to go */
  EXPECT_RC(ncclEpGroupDestroy(g), E5, "ncclEpGroupDestroy", "live handle");
  EXPECT_RC(ncclEpHandleDestroy(h), ncclSuccess, "ncclEpHandleDestroy", NULL);
  /* a destroyed handle is no handle */
  EXPECT_RC(ncclEpHandleDestroy(h), E4, "ncclEpHandleDestroy", "not a live handle");
  EXPECT_RC(ncclEpUpdateHandle(h, &ok64, NULL, NULL), E4, U, "not a live handle");
  EXPECT_RC(ncclEpComplete(h, NULL, NULL), E4, "ncclEpComplete", "not a live handle");

  ncclEpHandle_t c = (ncclEpHandle_t)SENTINEL;
#define BAD_CREATE(layout, topk, info, code, needle)                                 \
  do {                                                                               \
    c = (ncclEpHandle_t)SENTINEL;                                                    \
    EXPECT_RC(ncclEpCreateHandle(&c, g, layout, topk, info, NULL, NULL), code, C, needle); \
    CHECK(c == NULL);                                                                \
  } while (0)
  BAD_CREATE(NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, NULL, E4, "topk_idx is NULL");
  BAD_CREATE(NCCL_EP_LAYOUT_EXPERT_MAJOR, &one_d, NULL, E4, "2-D");
  BAD_CREATE(NCCL_EP_LAYOUT_EXPERT_MAJOR, &ok64, &li_bad, E4, "magic");
  BAD_CREATE(NCCL_EP_LAYOUT_FLAT, &ok64, NULL, E5, "LOW_LATENCY");
  BAD_CREATE(NCCL_EP_LAYOUT_UNSET, &ok64, NULL, E4, "UNSET");
  BAD_CREATE(NCCL_EP_LAYOUT_RANK_MAJOR, &ok64, &li, E5, "layout_info must be NULL");
  BAD_CREATE(NCCL_EP_LAYOUT_RANK_MAJOR, &flt, NULL, E4, "ncclInt64");
  BAD_CREATE(NCCL_EP_LAYOUT_RANK_MAJOR, &too_many, NULL, E4, "max_dispatch_tokens_per_rank");
#undef BAD_CREATE
  c = NULL;
  EXPECT_RC(ncclEpCreateHandle(&c, g, NCCL_EP_LAYOUT_RANK_MAJOR, &ok32, NULL, NULL, NULL), ncclSuccess, C, NULL);
  CHECK(c != NULL);
  EXPECT_RC(ncclEpHandleDestroy(c), ncclSuccess, "ncclEpHandleDestroy", NULL);
}

static void test_ops(ncclEpGroup_t g) {
  const char *D = "ncclEpDispatch", *C = "ncclEpCombine";
  size_t sk[2] = {4, 2}, sx[2] = {4, 128};
  ncclEpTensor_t topk = tensor(2, ncclInt64, sk), x = tensor(2, ncclBfloat16, sx), y = tensor(2, ncclBfloat16, sx);
  ncclEpTensor_t garbage;
  memset(&garbage, 0x5A, sizeof garbage);
  ncclEpTensor_t nodata = x;
  nodata.data = NULL;
  ncclEpHandle_t h = NULL;
  EXPECT_RC(ncclEpCreateHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &topk, NULL, NULL, NULL), ncclSuccess,
            "ncclEpCreateHandle", NULL);
  if (!h) return;

  ncclEpDispatchInputs_t di = NCCL_EP_DISPATCH_INPUTS_INIT;
  ncclEpDispatchOutputs_t dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
  ncclEpDispatchConfig_t dc = NCCL_EP_DISPATCH_CONFIG_INIT;
  ncclEpLayoutInfo_t li = NCCL_EP_LAYOUT_INFO_INIT;
  di.tokens = &x;
  dout.tokens = &y;
  dc.pass_direction = (ncclEpPassDir_t)2;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, &dc, NULL), E4, D, "pass_direction");
  dc.pass_direction = (ncclEpPassDir_t)-1;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, &dc, NULL), E4, D, "pass_direction");
  /* recv_topk_idx_kind: an EXPERT_MAJOR dispatch writes no expert ids and ignores it, as NCCL EP
   * (was refused in every layout): the call gets as far as the shape of outputs->tokens, which is
   * 2-D here. RANK_MAJOR refuses it (NCCL EP's kernel traps on it). */
  li.recv_topk_idx_kind = (ncclEpExpertIdKind_t)3;
  li.expert_counters = NULL;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, NULL, NULL), E4, D, "outputs->tokens");
  {
    ncclEpHandle_t rm = NULL;
    EXPECT_RC(ncclEpCreateHandle(&rm, g, NCCL_EP_LAYOUT_RANK_MAJOR, &topk, NULL, NULL, NULL), ncclSuccess,
              "ncclEpCreateHandle", NULL);
    if (rm) {
      EXPECT_RC(ncclEpDispatch(rm, &di, &dout, &li, NULL, NULL), E4, D, "recv_topk_idx_kind is 3");
      li.recv_topk_idx_kind = (ncclEpExpertIdKind_t)-1;
      EXPECT_RC(ncclEpDispatch(rm, &di, &dout, &li, NULL, NULL), E4, D, "recv_topk_idx_kind is -1");
      EXPECT_RC(ncclEpHandleDestroy(rm), ncclSuccess, "ncclEpHandleDestroy", NULL);
    }
  }
  li.recv_topk_idx_kind = NCCL_EP_EXPERT_ID_AUTO;
  /* the handle-time outputs are no dispatch argument: never read (NCCL EP does not look at them) */
  li.expert_offsets = &garbage;
  li.recv_total_counter = &garbage;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, NULL, NULL), E4, D, "outputs->tokens");
  li.expert_offsets = li.recv_total_counter = NULL;
  li.expert_counters = &garbage;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, NULL, NULL), E4, D, "layout_info->expert_counters");
  di.tokens = NULL;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, NULL, NULL), E4, D, "inputs->tokens is NULL");
  di.tokens = &garbage;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, NULL, NULL), E4, D, "inputs->tokens");
  di.tokens = &nodata;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, NULL, NULL), E4, D, "inputs->tokens");
  di.tokens = &x;
  dout.tokens = NULL;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, NULL, NULL), E4, D, "outputs->tokens is NULL");
  dout.tokens = &y;
  di.topk_weights = &garbage;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, NULL, NULL), E4, D, "inputs->topk_weights");
  di.topk_weights = NULL;
  dout.topk_idx = &garbage;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, NULL, NULL), E4, D, "outputs->topk_idx");

  ncclEpCombineInputs_t ci = NCCL_EP_COMBINE_INPUTS_INIT;
  ncclEpCombineOutputs_t co = NCCL_EP_COMBINE_OUTPUTS_INIT;
  ncclEpCombineConfig_t cc = NCCL_EP_COMBINE_CONFIG_INIT;
  ci.tokens = &y;
  co.tokens = &x;
  cc.pass_direction = (ncclEpPassDir_t)5;
  EXPECT_RC(ncclEpCombine(h, &ci, &co, &cc, NULL), E4, C, "pass_direction");
  ci.tokens = NULL;
  EXPECT_RC(ncclEpCombine(h, &ci, &co, NULL, NULL), E4, C, "inputs->tokens is NULL");
  ci.tokens = &garbage;
  EXPECT_RC(ncclEpCombine(h, &ci, &co, NULL, NULL), E4, C, "inputs->tokens");
  ci.tokens = &y;
  co.tokens = &garbage;
  EXPECT_RC(ncclEpCombine(h, &ci, &co, NULL, NULL), E4, C, "outputs->tokens");
  co.tokens = &x;
  /* LOW_LATENCY combine never reads inputs->topk_weights: not even its descriptor, as NCCL EP
   * (the call gets as far as the 2-D inputs->tokens of this expert-major handle) */
  ci.topk_weights = &garbage;
  EXPECT_RC(ncclEpCombine(h, &ci, &co, NULL, NULL), E4, C, "inputs->tokens must be 3-D");
  ci.topk_weights = NULL;
  ci.scales = &garbage;
  EXPECT_RC(ncclEpCombine(h, &ci, &co, NULL, NULL), E4, C, "inputs->scales");

  /* nothing is pending: completing is a no-op */
  ncclEpCompleteConfig_t pc = NCCL_EP_COMPLETE_CONFIG_INIT;
  EXPECT_RC(ncclEpComplete(h, &pc, NULL), ncclSuccess, "ncclEpComplete", NULL);
  EXPECT_RC(ncclEpComplete(h, NULL, NULL), ncclSuccess, "ncclEpComplete", NULL);
  EXPECT_RC(ncclEpHandleDestroy(h), ncclSuccess, "ncclEpHandleDestroy", NULL);
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, NULL, NULL, NULL), E4, D, "not a live handle");
  EXPECT_RC(ncclEpCombine(h, &ci, &co, NULL, NULL), E4, C, "not a live handle");
}

/* LOW_LATENCY dispatch recipes (NCCL EP v2's validateDispatchRecipe): each rule is
 * ncclInvalidArgument with a message naming the tensor and the rule; checked before the pass
 * direction (a backward call with a valid recipe is ncclInvalidUsage, as every LL backward
 * dispatch). Group: N = 1, E = L = 8, B = 16, max_token_bytes 256. */
static void test_recipes(ncclEpGroup_t g) {
  const char *D = "ncclEpDispatch";
  size_t sk[2] = {4, 2}, sx[2] = {4, 128}, ss[2] = {4, 4}, sy[3] = {8, 16, 128}, sys[3] = {8, 16, 4};
  size_t sb[2] = {4, 512}, syb[3] = {8, 16, 512}, sds[3] = {8, 16, 4}, sodd[2] = {4, 120};
  ncclEpTensor_t topk = tensor(2, ncclInt64, sk), counters;
  size_t sc[1] = {8};
  counters = tensor(1, ncclInt32, sc);
  ncclEpHandle_t h = NULL;
  EXPECT_RC(ncclEpCreateHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &topk, NULL, NULL, NULL), ncclSuccess,
            "ncclEpCreateHandle", NULL);
  if (!h) return;
  /* QUANT_FWD: E4M3 rows of 128 bytes, 4 fp32 scales (16 bytes) per token. */
  ncclEpTensor_t x = tensor(2, ncclFloat8e4m3, sx), xs = tensor(2, ncclFloat32, ss);
  ncclEpTensor_t y = tensor(3, ncclFloat8e4m3, sy), ys = tensor(3, ncclFloat32, sys);
  ncclEpDispatchInputs_t di = NCCL_EP_DISPATCH_INPUTS_INIT;
  ncclEpDispatchOutputs_t dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
  ncclEpDispatchConfig_t dc = NCCL_EP_DISPATCH_CONFIG_INIT;
  ncclEpLayoutInfo_t li = NCCL_EP_LAYOUT_INFO_INIT;
  li.expert_counters = &counters;
  di.tokens = &x;
  di.scales = &xs;
  dout.tokens = &y;
  dout.scales = &ys;
  dc.quant_recipe = NCCL_EP_DISP_QUANT_FWD;
  dc.round_scales = 1;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "round_scales must be 0");
  dc.round_scales = 0;
  di.scales = NULL;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "inputs->scales is required");
  di.scales = &xs;
  dout.scales = NULL;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "outputs->scales is required");
  dout.scales = &ys;
  xs.data = (void *)((uintptr_t)SENTINEL + 4);
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "16-byte aligned");
  xs.data = SENTINEL;
  xs.datatype = ncclInt32;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "inputs->scales");
  xs.datatype = ncclFloat32;
  x.datatype = ncclInt8;
  y.datatype = ncclInt8;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "inputs->tokens");
  x.datatype = ncclFloat8e4m3;
  y.datatype = ncclFloat8e4m3;
  x.sizes = sodd; /* 120 bytes: not a multiple of 16 */
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "multiple of 16");
  x.sizes = sx;
  ys.datatype = ncclUint8;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "outputs->scales");
  ys.datatype = ncclFloat32;
  /* 128 token bytes + 256 scale bytes > max_token_bytes (256) */
  ncclEpTensor_t big = tensor(2, ncclFloat32, ss), ybig = tensor(3, ncclFloat32, sys);
  size_t sbig[2] = {4, 64}, sybig[3] = {8, 16, 64};
  big.sizes = sbig;
  ybig.sizes = sybig;
  di.scales = &big;
  dout.scales = &ybig;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "max_token_bytes");
  di.scales = &xs;
  dout.scales = &ys;
  /* A valid recipe, backward: LOW_LATENCY has no backward dispatch. */
  dc.pass_direction = NCCL_EP_BWD_PASS;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E5, D, "NCCL_EP_FWD_PASS");
  dc.pass_direction = NCCL_EP_FWD_PASS;

  /* DS_FP8E3M4: bf16 [4, 512] in (H % 512 == 0), E4M3 [8, 16, 512] and fp32 [8, 16, 4] out;
   * 2H = 1024 bytes > max_token_bytes (256) is the last rule this group trips. */
  ncclEpTensor_t xb = tensor(2, ncclBfloat16, sb), yb = tensor(3, ncclFloat8e4m3, syb);
  ncclEpTensor_t yds = tensor(3, ncclFloat32, sds);
  di.tokens = &xb;
  di.scales = NULL;
  dout.tokens = &yb;
  dout.scales = &yds;
  dc.quant_recipe = NCCL_EP_DISP_QUANT_DS_FP8E3M4;
  dc.round_scales = 1;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "max_token_bytes");
  xb.datatype = ncclFloat16;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "ncclBfloat16");
  xb.datatype = ncclBfloat16;
  yb.datatype = ncclBfloat16;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "ncclFloat8e4m3");
  yb.datatype = ncclFloat8e4m3;
  xb.sizes = sx; /* H = 128 */
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "divisible by 512");
  xb.sizes = sb;
  di.scales = &xs;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "inputs->scales must be NULL");
  di.scales = NULL;
  dout.scales = NULL;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "outputs->scales is required");
  dout.scales = &ys; /* [8, 16, 4] fp32 would fit H = 512; make it the wrong width */
  ys.sizes[2] = 8;
  EXPECT_RC(ncclEpDispatch(h, &di, &dout, &li, &dc, NULL), E4, D, "outputs->scales must have shape");
  ys.sizes[2] = 4;
  EXPECT_RC(ncclEpHandleDestroy(h), ncclSuccess, "ncclEpHandleDestroy", NULL);
}

/* Window-backed tensors and config->zero_copy (docs/ZERO_COPY.md) on a fake 4-rank
 * communicator whose windows live at made-up addresses: resolution, ON's rules for LOW_LATENCY
 * dispatch, and NCCL's own errors. A call that passes every rule stops at the missing GPU
 * state (ncclUnhandledCudaError), which proves it got past them. */
static void test_windows(ncclComm_t comm4, ncclComm_t other) {
  const char *D = "ncclEpDispatch", *I = "ncclEpInitHandle";
  ncclWindow_t win = fake_win_create(comm4, (uintptr_t)0x70000000u, 1);
  ncclWindow_t far = fake_win_create(comm4, (uintptr_t)0x70000000u, 0); /* no peer mapped */
  ncclWindow_t alien = fake_win_create(other, (uintptr_t)0x70000000u, 1);
  CHECK(win && far && alien);
  for (int mode = 0; mode < 4; mode++) {
    ncclEpZeroCopyMode_t zc = mode == 3 ? (ncclEpZeroCopyMode_t)7 : (ncclEpZeroCopyMode_t)mode;
    int on = zc == NCCL_EP_ZERO_COPY_ON;
    ncclEpGroupConfig_t c = ll_config();
    c.zero_copy = zc;
    ncclEpGroup_t g = NULL;
    EXPECT_RC(ncclEpCreateGroup(&g, comm4, &c), ncclSuccess, "ncclEpCreateGroup", NULL);
    if (!g) continue;
    /* N = 4, B = 16, H = 128, L = 2, K = 2 */
    size_t sk[2] = {4, 2}, sx[2] = {4, 128}, srm[3] = {4, 16, 128}, sidx[3] = {4, 16, 2}, sem[3] = {2, 64, 128},
           sc[1] = {2}, shm[1] = {0};
    ncclEpTensor_t topk = tensor(2, ncclInt64, sk), x = tensor(2, ncclBfloat16, sx), w = tensor(2, ncclFloat32, sk);
    ncclEpTensor_t rm_out = tensor(3, ncclBfloat16, srm), idx = tensor(3, ncclInt32, sidx);
    ncclEpTensor_t em_out = tensor(3, ncclBfloat16, sem), cnt = tensor(1, ncclInt32, sc);
    ncclEpHandle_t rm = NULL, em = NULL;
    EXPECT_RC(ncclEpCreateHandle(&rm, g, NCCL_EP_LAYOUT_RANK_MAJOR, &topk, NULL, NULL, NULL), ncclSuccess,
              "ncclEpCreateHandle", NULL);
    EXPECT_RC(ncclEpCreateHandle(&em, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &topk, NULL, NULL, NULL), ncclSuccess,
              "ncclEpCreateHandle", NULL);
    ncclEpDispatchInputs_t di = NCCL_EP_DISPATCH_INPUTS_INIT;
    ncclEpDispatchOutputs_t dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
    ncclEpLayoutInfo_t li = NCCL_EP_LAYOUT_INFO_INIT;
    di.tokens = &x;
    di.topk_weights = &w;
    dout.tokens = &rm_out;
    dout.topk_idx = &idx;
    if (rm) {
      /* an ordinary output: ON refuses it, AUTO / OFF / other values stage (and stop at the GPU) */
      EXPECT_RC(ncclEpDispatch(rm, &di, &dout, NULL, NULL, NULL), on ? E4 : ncclUnhandledCudaError, D,
                on ? "ZERO_COPY_ON" : "GPU state");
      /* a window-backed output, data NULL or set: direct in every mode */
      rm_out.win_hdl = win;
      rm_out.win_offset = 4096;
      rm_out.data = NULL;
      EXPECT_RC(ncclEpDispatch(rm, &di, &dout, NULL, NULL, NULL), ncclUnhandledCudaError, D, "GPU state");
      rm_out.data = SENTINEL;
      EXPECT_RC(ncclEpDispatch(rm, &di, &dout, NULL, NULL, NULL), ncclUnhandledCudaError, D, "GPU state");
      /* a window no peer maps (not NVLink-only): ON refuses, the others stage */
      rm_out.win_hdl = far;
      EXPECT_RC(ncclEpDispatch(rm, &di, &dout, NULL, NULL, NULL), on ? E4 : ncclUnhandledCudaError, D,
                on ? "NVLink" : "GPU state");
      /* a handle of another communicator: NCCL's error passes through, naming the tensor */
      rm_out.win_hdl = alien;
      rm_out.data = NULL;
      EXPECT_RC(ncclEpDispatch(rm, &di, &dout, NULL, NULL, NULL), E4, D, "outputs->tokens: ncclWinGetUserPtr");
      /* an input in a window resolves as well (any tensor) */
      rm_out.win_hdl = win;
      x.data = NULL;
      x.win_hdl = win;
      EXPECT_RC(ncclEpDispatch(rm, &di, &dout, NULL, NULL, NULL), ncclUnhandledCudaError, D, "GPU state");
      x.data = SENTINEL;
      x.win_hdl = NULL;
      rm_out = tensor(3, ncclBfloat16, srm);
      EXPECT_RC(ncclEpHandleDestroy(rm), ncclSuccess, "ncclEpHandleDestroy", NULL);
    }
    if (em) {
      /* EXPERT_MAJOR has no direct path: ON refuses even a window-backed output */
      dout.tokens = &em_out;
      dout.topk_idx = NULL;
      di.topk_weights = NULL;
      li.expert_counters = &cnt;
      em_out.win_hdl = win;
      EXPECT_RC(ncclEpDispatch(em, &di, &dout, &li, NULL, NULL), on ? E4 : ncclUnhandledCudaError, D,
                on ? "RANK_MAJOR" : "GPU state");
      EXPECT_RC(ncclEpHandleDestroy(em), ncclSuccess, "ncclEpHandleDestroy", NULL);
    }
    /* handle_mem in a window (InitHandle): resolved to base + win_offset, then checked */
    if (mode == 0) {
      size_t need = 0;
      EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, &need, 2), ncclSuccess, "ncclEpHandleMemSize",
                NULL);
      shm[0] = need > 0 ? need : 1;
      ncclEpTensor_t hm = tensor(1, ncclUint8, shm);
      hm.data = NULL;
      hm.win_hdl = win;
      hm.win_offset = 4;
      ncclEpHandle_t h = (ncclEpHandle_t)SENTINEL;
      EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, 2, &hm), E4, I, "8-byte aligned");
      hm.win_offset = 64;
      h = NULL;
      EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, 2, &hm), ncclSuccess, I, NULL);
      if (h) EXPECT_RC(ncclEpHandleDestroy(h), ncclSuccess, "ncclEpHandleDestroy", NULL);
    }
    EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);
  }
  fake_win_destroy(win);
  fake_win_destroy(far);
  fake_win_destroy(alien);
}

static void test_masks(ncclComm_t comm) {
  int mask[4] = {1, 1, 1, 1}, err = -1;
  ncclEpGroup_t g = NULL;
  ncclEpGroupConfig_t c = ll_config();
  /* LL without enable_mask: every mask call is a usage error */
  EXPECT_RC(ncclEpCreateGroup(&g, comm, &c), ncclSuccess, "ncclEpCreateGroup", NULL);
  EXPECT_RC(ncclEpMaskQuery(g, mask, NULL), E5, "ncclEpMaskQuery", "enable_mask");
  EXPECT_RC(ncclEpMaskUpdate(g, mask, NULL), E5, "ncclEpMaskUpdate", "enable_mask");
  EXPECT_RC(ncclEpMaskClean(g, NULL), E5, "ncclEpMaskClean", "enable_mask");
  EXPECT_RC(ncclEpGetAsyncError(g, &err), E5, "ncclEpGetAsyncError", "enable_mask");
  EXPECT_RC(ncclEpErrorClear(g), E5, "ncclEpErrorClear", "enable_mask");
  EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);

  /* HT: masks exist only in LL; the async error flag is readable (no GPU state here: 0) */
  c.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT;
  c.enable_mask = 1;
  g = NULL;
  EXPECT_RC(ncclEpCreateGroup(&g, comm, &c), ncclSuccess, "ncclEpCreateGroup", NULL);
  EXPECT_RC(ncclEpMaskQuery(g, mask, NULL), E5, "ncclEpMaskQuery", "LOW_LATENCY");
  err = -1;
  EXPECT_RC(ncclEpGetAsyncError(g, &err), ncclSuccess, "ncclEpGetAsyncError", NULL);
  CHECK(err == 0);
  EXPECT_RC(ncclEpErrorClear(g), ncclSuccess, "ncclEpErrorClear", NULL);
  EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);

  /* LL with enable_mask */
  c.algorithm = NCCL_EP_ALGO_LOW_LATENCY;
  g = NULL;
  EXPECT_RC(ncclEpCreateGroup(&g, comm, &c), ncclSuccess, "ncclEpCreateGroup", NULL);
  EXPECT_RC(ncclEpMaskQuery(g, NULL, NULL), E4, "ncclEpMaskQuery", "mask_status");
  EXPECT_RC(ncclEpMaskUpdate(g, NULL, NULL), E4, "ncclEpMaskUpdate", "mask");
  /* valid arguments, but this group has no GPU state (no CUDA driver on this machine) */
  EXPECT_RC(ncclEpMaskQuery(g, mask, NULL), ncclUnhandledCudaError, "ncclEpMaskQuery", "GPU state");
  EXPECT_RC(ncclEpMaskUpdate(g, mask, NULL), ncclUnhandledCudaError, "ncclEpMaskUpdate", "GPU state");
  EXPECT_RC(ncclEpMaskClean(g, NULL), ncclUnhandledCudaError, "ncclEpMaskClean", "GPU state");
  EXPECT_RC(ncclEpGetAsyncError(g, NULL), E4, "ncclEpGetAsyncError", "error_out");
  err = -1;
  EXPECT_RC(ncclEpGetAsyncError(g, &err), ncclSuccess, "ncclEpGetAsyncError", NULL);
  CHECK(err == 0);
  EXPECT_RC(ncclEpErrorClear(g), ncclSuccess, "ncclEpErrorClear", NULL);
  EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);
}

static void test_ht_rules(ncclComm_t comm) {
  const char *M = "ncclEpHandleMemSize";
  ncclEpGroup_t g = NULL;
  ncclEpGroupConfig_t c = ll_config();
  c.algorithm = NCCL_EP_ALGO_HIGH_THROUGHPUT;
  c.num_topk = 2;
  size_t sz = 0;
  ncclEpHandleConfig_t hc = NCCL_EP_HANDLE_CONFIG_INIT;
  hc.dispatch_output_per_expert_alignment = 64;
  EXPECT_RC(ncclEpCreateGroup(&g, comm, &c), ncclSuccess, "ncclEpCreateGroup", NULL);
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_FLAT, NULL, &sz, 2), ncclSuccess, M, NULL);
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &hc, &sz, 1), ncclSuccess, M, NULL);
  /* sized as NCCL EP sizes them (it checks neither the layout's mode nor config->num_topk here;
   * ncclEpInitHandle does): both were ncclInvalidUsage */
  size_t sz_flat = 0;
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_FLAT, NULL, &sz_flat, 2), ncclSuccess, M, NULL);
  sz = 0;
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, &sz, 2), ncclSuccess, M, NULL);
  CHECK(sz == sz_flat);
  sz = 0;
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_FLAT, NULL, &sz, 3), ncclSuccess, M, NULL);
  CHECK(sz > sz_flat);
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_FLAT, NULL, &sz, 0), E4, M, "num_topk");

  /* Handles and routing: the rules that come before any GPU work (this group is in eager mode:
   * max_recv_tokens_per_rank is 0). */
  const char *I = "ncclEpInitHandle", *U = "ncclEpUpdateHandle", *C = "ncclEpCreateHandle";
  size_t s42[2] = {4, 2}, s43[2] = {4, 3}, s17[2] = {17, 2};
  ncclEpTensor_t ok32 = tensor(2, ncclInt32, s42), wrong_k = tensor(2, ncclInt64, s43);
  ncclEpTensor_t too_many = tensor(2, ncclInt64, s17), flt = tensor(2, ncclFloat32, s42);
  ncclEpTensor_t k3 = tensor(2, ncclInt64, s43);
  ncclEpHandleConfig_t h3 = NCCL_EP_HANDLE_CONFIG_INIT;
  h3.dispatch_output_per_expert_alignment = 3;
  ncclEpHandle_t h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &h3, 2, NULL), E4, I, "power of two");
  CHECK(h == NULL);
  /* HIGH_THROUGHPUT K <= 0: NCCL EP's ncclInvalidUsage (was ncclInvalidArgument) */
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_FLAT, NULL, 0, NULL), E5, I, "num_topk");
  CHECK(h == NULL);
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_FLAT, NULL, -1, NULL), E5, I, "num_topk");
  CHECK(h == NULL);
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_FLAT, NULL, 3, NULL), E5, I, "config->num_topk");
  CHECK(h == NULL);
  /* FLAT ignores the alignment (was ncclInvalidArgument) */
  h = NULL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_FLAT, &h3, 2, NULL), ncclSuccess, I, NULL);
  CHECK(h != NULL);
  if (h) EXPECT_RC(ncclEpHandleDestroy(h), ncclSuccess, "ncclEpHandleDestroy", NULL);
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, 2, NULL), E5, I, "FLAT or EXPERT_MAJOR");
  CHECK(h == NULL);
  h = NULL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_FLAT, NULL, 2, NULL), ncclSuccess, I, NULL);
  if (h) {
    EXPECT_RC(ncclEpUpdateHandle(h, NULL, NULL, NULL), E4, U, "topk_idx is NULL");
    EXPECT_RC(ncclEpUpdateHandle(h, &wrong_k, NULL, NULL), E4, U, "topk_idx");
    EXPECT_RC(ncclEpUpdateHandle(h, &too_many, NULL, NULL), E4, U, "max_dispatch_tokens_per_rank");
    EXPECT_RC(ncclEpUpdateHandle(h, &flt, NULL, NULL), E4, U, "ncclInt64");
    /* layout_info: FLAT ignores expert_offsets and src_rank_counters, as NCCL EP (both were
     * ncclInvalidArgument): the update gets past the rules to the missing GPU state. */
    size_t s8[1] = {8}, s1[1] = {1};
    ncclEpTensor_t c32 = tensor(1, ncclInt32, s8), c64 = tensor(1, ncclInt64, s8), tot = tensor(1, ncclInt32, s1);
    ncclEpTensor_t odd = tensor(1, ncclFloat64, s1);
    ncclEpLayoutInfo_t li = NCCL_EP_LAYOUT_INFO_INIT;
    li.expert_counters = &c32;
    li.recv_total_counter = &tot;
    li.expert_offsets = &odd;
    li.src_rank_counters = &odd;
    EXPECT_RC(ncclEpUpdateHandle(h, &ok32, &li, NULL), E5, U, "GPU state");
    li.expert_counters = &c64; /* FLAT counters are int32 */
    EXPECT_RC(ncclEpUpdateHandle(h, &ok32, &li, NULL), E4, U, "expert_counters");
    /* recv_topk_idx_kind: refused in a forward HIGH_THROUGHPUT dispatch (NCCL EP's kernel traps
     * on it), ignored in a backward one (which then needs the routing this handle lacks) */
    size_t sx[2] = {4, 128};
    ncclEpTensor_t x = tensor(2, ncclBfloat16, sx), y = tensor(2, ncclBfloat16, sx);
    ncclEpDispatchInputs_t di = NCCL_EP_DISPATCH_INPUTS_INIT;
    ncclEpDispatchOutputs_t dout = NCCL_EP_DISPATCH_OUTPUTS_INIT;
    ncclEpDispatchConfig_t dc = NCCL_EP_DISPATCH_CONFIG_INIT;
    ncclEpLayoutInfo_t dli = NCCL_EP_LAYOUT_INFO_INIT;
    di.tokens = &x;
    dout.tokens = &y;
    dli.recv_topk_idx_kind = (ncclEpExpertIdKind_t)3;
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, &dli, &dc, NULL), E4, "ncclEpDispatch", "recv_topk_idx_kind is 3");
    dc.pass_direction = NCCL_EP_BWD_PASS;
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, &dli, &dc, NULL), E5, "ncclEpDispatch", "routing");
    /* HT dispatch reads no layout_info tensor (NCCL EP takes only the kind from it) */
    ncclEpTensor_t junk;
    memset(&junk, 0x5A, sizeof junk);
    dc.pass_direction = NCCL_EP_FWD_PASS;
    dli.recv_topk_idx_kind = NCCL_EP_EXPERT_ID_GLOBAL;
    dli.expert_counters = dli.src_rank_counters = dli.expert_offsets = dli.recv_total_counter = &junk;
    EXPECT_RC(ncclEpDispatch(h, &di, &dout, &dli, &dc, NULL), E5, "ncclEpDispatch", "routing");
    EXPECT_RC(ncclEpHandleDestroy(h), ncclSuccess, "ncclEpHandleDestroy", NULL);
  }
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpCreateHandle(&h, g, NCCL_EP_LAYOUT_RANK_MAJOR, &ok32, NULL, NULL, NULL), E5, C, "HIGH_THROUGHPUT");
  CHECK(h == NULL);
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpCreateHandle(&h, g, NCCL_EP_LAYOUT_FLAT, &k3, NULL, NULL, NULL), E5, C, "config->num_topk");
  CHECK(h == NULL);
  h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpCreateHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, &too_many, NULL, NULL, NULL), E4, C,
            "max_dispatch_tokens_per_rank");
  CHECK(h == NULL);
  EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);

  /* DROP with a fixed budget (at least B) is a valid group. */
  c.max_recv_tokens_per_rank = 16;
  c.overflow_policy = NCCL_EP_OVERFLOW_DROP;
  g = NULL;
  EXPECT_RC(ncclEpCreateGroup(&g, comm, &c), ncclSuccess, "ncclEpCreateGroup", NULL);
  if (g) EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);
}

int main(void) {
  if (cuda_device_present()) {
    printf("SKIP: a GPU is present (the fake communicator is for GPU-free machines)\n");
    return 77;
  }
  ncclComm_t comm1 = fake_comm_create(1, 0, 0), comm4 = fake_comm_create(4, 3, 0);
  ncclEpGroupConfig_t c = ll_config();
  ncclEpGroup_t g = NULL;
  ncclResult_t rc = ncclEpCreateGroup(&g, comm1, &c);
  if (rc == ncclUnhandledCudaError || rc == ncclSystemError || rc == ncclInternalError) {
    printf("SKIP: this build cannot create a group without a GPU (ncclEpCreateGroup: %d, %s)\n", (int)rc,
           ncclEpxGetLastError());
    return 77;
  }
  EXPECT_RC(rc, ncclSuccess, "ncclEpCreateGroup", NULL);
  if (g == NULL) return t_finish("errors_fake_nccl");

  test_group_config(comm4);
  test_node_size(comm4);
  test_tensor_reads(g);
  test_handle_rules(g);
  test_update_and_create(g);
  test_ops(g);
  test_recipes(g);
  test_masks(comm4);
  test_ht_rules(comm1);
  test_windows(comm4, comm1);

  EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);
  /* a destroyed group is no group, for every function that takes one */
  size_t sz;
  int mask[1] = {1}, err;
  ncclEpHandle_t h = (ncclEpHandle_t)SENTINEL;
  const char *why = "not a live group";
  EXPECT_RC(ncclEpGroupDestroy(g), E4, "ncclEpGroupDestroy", why);
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, &sz, 2), E4, "ncclEpHandleMemSize", why);
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_EXPERT_MAJOR, NULL, 2, NULL), E4, "ncclEpInitHandle", why);
  CHECK(h == NULL);
  EXPECT_RC(ncclEpMaskQuery(g, mask, NULL), E4, "ncclEpMaskQuery", why);
  EXPECT_RC(ncclEpMaskUpdate(g, mask, NULL), E4, "ncclEpMaskUpdate", why);
  EXPECT_RC(ncclEpMaskClean(g, NULL), E4, "ncclEpMaskClean", why);
  EXPECT_RC(ncclEpGetAsyncError(g, &err), E4, "ncclEpGetAsyncError", why);
  EXPECT_RC(ncclEpErrorClear(g), E4, "ncclEpErrorClear", why);

  fake_comm_destroy(comm1);
  fake_comm_destroy(comm4);
  return t_finish("errors_fake_nccl");
}
