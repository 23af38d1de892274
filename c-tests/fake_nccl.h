/* The fake NCCL's communicator factory (fake_nccl.c). */
#ifndef FAKE_NCCL_H_
#define FAKE_NCCL_H_
#include <nccl.h>
#ifdef __cplusplus
extern "C" {
#endif
ncclComm_t fake_comm_create(int nranks, int rank, int device);
void fake_comm_destroy(ncclComm_t comm);
#ifdef __cplusplus
}
#endif
#endif
