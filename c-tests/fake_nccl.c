/* A stand-in libnccl.so.2 for GPU-free tests: the host functions nccl-ep-rs binds at run time
 * (src/transport/nccl.rs), answering for fake communicators made by fake_comm_*. The library
 * finds it because the test links it (SONAME libnccl.so.2 is already loaded when the library
 * dlopens NCCL). Nothing here touches a GPU.
 * Windows (NCCL 2.29's ncclWinGetUserPtr / ncclGetPeerDevicePointer): fake_win_create makes a
 * window of a fake communicator at a made-up address; peer p's copy appears at
 * base + (p + 1) * FAKE_WIN_PEER_STRIDE, or nowhere (NULL) for a window made "unreachable".
 * Built with -DFAKE_NCCL_NO_WINDOWS it is an NCCL older than 2.29: no window symbols. */
#include <nccl.h>
#include <stdint.h>
#include <stdlib.h>
#include "fake_nccl.h"

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

#ifndef FAKE_NCCL_NO_WINDOWS
/* Live windows by address: a handle is looked up, never dereferenced, so that any value a test
 * (or the fuzzer) passes as win_hdl is safe. */
struct ncclWindow_vidmem {
  ncclComm_t comm;
  uintptr_t base;
  int reachable;
};
#define FAKE_MAX_WINDOWS 64
static struct ncclWindow_vidmem *fake_windows[FAKE_MAX_WINDOWS];
ncclWindow_t fake_win_create(ncclComm_t comm, uintptr_t base, int reachable) {
  for (int i = 0; i < FAKE_MAX_WINDOWS; i++) {
    if (fake_windows[i]) continue;
    struct ncclWindow_vidmem *w = (struct ncclWindow_vidmem *)calloc(1, sizeof *w);
    if (!w) return NULL;
    w->comm = comm;
    w->base = base;
    w->reachable = reachable;
    fake_windows[i] = w;
    return w;
  }
  return NULL;
}
void fake_win_destroy(ncclWindow_t w) {
  for (int i = 0; i < FAKE_MAX_WINDOWS; i++)
    if (w && fake_windows[i] == w) {
      fake_windows[i] = NULL;
      free(w);
    }
}
static int win_ok(const ncclWindow_t w) {
  for (int i = 0; i < FAKE_MAX_WINDOWS; i++)
    if (w && fake_windows[i] == w) return 1;
  return 0;
}
ncclResult_t ncclWinGetUserPtr(ncclComm_t comm, ncclWindow_t win, void **out) {
  if (!ok(comm) || !win_ok(win) || win->comm != comm || !out) return ncclInvalidArgument;
  *out = (void *)win->base;
  return ncclSuccess;
}
ncclResult_t ncclGetPeerDevicePointer(ncclWindow_t win, size_t offset, int peer, void **out) {
  if (!win_ok(win) || !out || !ok(win->comm) || peer < 0 || peer >= win->comm->nranks) return ncclInvalidArgument;
  *out = win->reachable ? (void *)(win->base + (uintptr_t)(peer + 1) * FAKE_WIN_PEER_STRIDE + offset) : NULL;
  return ncclSuccess;
}
#endif

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
