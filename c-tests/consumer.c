/* A consumer of the installed package: built by consumer_pkgconfig.sh with pkg-config and by
 * consumer_cmake/ with find_package(nccl_ep CONFIG). */
#include <stdio.h>
#include <nccl_ep.h>
#include <nccl_ep_ext.h>

int main(void) {
  int v = 0;
  ncclResult_t rc = ncclEpGetVersion(&v);
  if (rc != ncclSuccess || v != 100) {
    fprintf(stderr, "consumer: ncclEpGetVersion -> rc %d, version %d (want 0, 100)\n", (int)rc, v);
    return 1;
  }
  if (ncclEpGetVersion(NULL) != ncclInvalidArgument || ncclEpxGetLastError()[0] == '\0') {
    fprintf(stderr, "consumer: error path broken\n");
    return 1;
  }
  printf("consumer: libnccl_ep version %d (NCCL_EP_VERSION_CODE %d)\n", v, NCCL_EP_VERSION_CODE);
  return 0;
}
