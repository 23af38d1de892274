/* The fake NCCL's communicator factory (fake_nccl.c). */
#ifndef FAKE_NCCL_H_
#define FAKE_NCCL_H_
#include <nccl.h>
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif
ncclComm_t fake_comm_create(int nranks, int rank, int device);
void fake_comm_destroy(ncclComm_t comm);
/* Where peer p's copy of a fake window appears: base + (p + 1) * FAKE_WIN_PEER_STRIDE. */
#define FAKE_WIN_PEER_STRIDE ((uintptr_t)1 << 32)
/* A window of `comm` at `base`; `reachable` 0: no peer is mapped (not an NVLink-only group). */
ncclWindow_t fake_win_create(ncclComm_t comm, uintptr_t base, int reachable);
void fake_win_destroy(ncclWindow_t win);
#ifdef __cplusplus
}
#endif
#endif
