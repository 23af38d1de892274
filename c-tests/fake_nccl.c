/* A stand-in libnccl.so.2 for GPU-free tests: the host functions nccl-ep-rs binds at run time
 * (src/transport/nccl.rs), answering for fake communicators made by fake_comm_*. The library
 * finds it because the test links it (SONAME libnccl.so.2 is already loaded when the library
 * dlopens NCCL). Nothing here touches a GPU. */
#include <nccl.h>
#include <stdint.h>
#include <stdlib.h>

#define FAKE_COMM_MAGIC 0xFA4EC033u

struct ncclComm {
  uint32_t magic;
  int nranks, rank, device;
};

/* Exported for the tests (declared in fake_nccl.h). */
ncclComm_t fake_comm_create(int nranks, int rank, int device) {
  struct ncclComm *c = (struct ncclComm *)calloc(1, sizeof *c);
  if (c) {
    c->magic = FAKE_COMM_MAGIC;
    c->nranks = nranks;
    c->rank = rank;
    c->device = device;
  }
  return c;
}
void fake_comm_destroy(ncclComm_t c) {
  if (c) c->magic = 0;
  free(c);
}

static int ok(const ncclComm_t c) { return c != NULL && c->magic == FAKE_COMM_MAGIC; }

ncclResult_t ncclGetVersion(int *version) {
  if (!version) return ncclInvalidArgument;
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}
ncclResult_t ncclCommCount(const ncclComm_t comm, int *count) {
  if (!ok(comm) || !count) return ncclInvalidArgument;
  *count = comm->nranks;
  return ncclSuccess;
}
ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank) {
  if (!ok(comm) || !rank) return ncclInvalidArgument;
  *rank = comm->rank;
  return ncclSuccess;
}
ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int *device) {
  if (!ok(comm) || !device) return ncclInvalidArgument;
  *device = comm->device;
  return ncclSuccess;
}
/* Collectives would need device memory: the fake refuses them. */
ncclResult_t ncclAllGather(const void *sendbuff, void *recvbuff, size_t sendcount, ncclDataType_t datatype,
                           ncclComm_t comm, cudaStream_t stream) {
  (void)sendbuff, (void)recvbuff, (void)sendcount, (void)datatype, (void)comm, (void)stream;
  return ncclSystemError;
}
/* Point-to-point needs device memory too: refused; a group opens and closes. */
ncclResult_t ncclSend(const void *sendbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  (void)sendbuff, (void)count, (void)datatype, (void)peer, (void)comm, (void)stream;
  return ncclSystemError;
}
ncclResult_t ncclRecv(void *recvbuff, size_t count, ncclDataType_t datatype, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
  (void)recvbuff, (void)count, (void)datatype, (void)peer, (void)comm, (void)stream;
  return ncclSystemError;
}
ncclResult_t ncclGroupStart(void) { return ncclSuccess; }
ncclResult_t ncclGroupEnd(void) { return ncclSuccess; }
const char *ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess: return "no error (fake NCCL)";
    case ncclInvalidArgument: return "invalid argument (fake NCCL)";
    default: return "error (fake NCCL)";
  }
}
