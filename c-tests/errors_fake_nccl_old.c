/* Window-backed tensors with an NCCL older than 2.29 (the fake NCCL built without
 * ncclWinGetUserPtr / ncclGetPeerDevicePointer): everything else works, and a tensor that needs
 * its window resolved is ncclInvalidUsage naming the NCCL release it needs. */
#include "fake_nccl.h"
#include "test_util.h"

int main(void) {
  if (cuda_device_present()) {
    printf("SKIP: a GPU is present (the fake communicator is for GPU-free machines)\n");
    return 77;
  }
  ncclComm_t comm = fake_comm_create(2, 1, 0);
  ncclEpGroupConfig_t c = NCCL_EP_GROUP_CONFIG_INIT;
  c.algorithm = NCCL_EP_ALGO_LOW_LATENCY;
  c.num_experts = 8;
  c.max_dispatch_tokens_per_rank = 16;
  c.max_token_bytes = 256;
  c.zero_copy = NCCL_EP_ZERO_COPY_ON; /* accepted: it asks for windows only at each call */
  ncclEpGroup_t g = NULL;
  ncclResult_t rc = ncclEpCreateGroup(&g, comm, &c);
  if (rc == ncclUnhandledCudaError || rc == ncclSystemError || rc == ncclInternalError) {
    printf("SKIP: this build cannot create a group without a GPU (ncclEpCreateGroup: %d, %s)\n", (int)rc,
           ncclEpxGetLastError());
    return 77;
  }
  EXPECT_RC(rc, ncclSuccess, "ncclEpCreateGroup", NULL);
  if (g == NULL) return t_finish("errors_fake_nccl_old");

  size_t need = 0, sz[1];
  EXPECT_RC(ncclEpHandleMemSize(g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, &need, 2), ncclSuccess, "ncclEpHandleMemSize", NULL);
  sz[0] = need > 0 ? need : 1;
  ncclEpTensor_t hm = NCCL_EP_TENSOR_INIT;
  hm.ndim = 1;
  hm.datatype = ncclUint8;
  hm.sizes = sz;
  hm.win_hdl = (ncclWindow_t)SENTINEL;
  ncclEpHandle_t h = (ncclEpHandle_t)SENTINEL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, 2, &hm), ncclInvalidUsage, "ncclEpInitHandle",
            "NCCL >= 2.29");
  CHECK(h == NULL);
  /* with data set the window is not needed for the local address: accepted */
  hm.data = SENTINEL;
  h = NULL;
  EXPECT_RC(ncclEpInitHandle(&h, g, NCCL_EP_LAYOUT_RANK_MAJOR, NULL, 2, &hm), ncclSuccess, "ncclEpInitHandle", NULL);
  if (h) EXPECT_RC(ncclEpHandleDestroy(h), ncclSuccess, "ncclEpHandleDestroy", NULL);
  EXPECT_RC(ncclEpGroupDestroy(g), ncclSuccess, "ncclEpGroupDestroy", NULL);
  fake_comm_destroy(comm);
  return t_finish("errors_fake_nccl_old");
}
