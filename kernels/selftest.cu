// Self-test kernel: proves the NVRTC -> CUBIN -> cuModuleLoadData -> cuLaunchKernel path.
// Header-free, like every file in kernels/: NVRTC gets no include paths.
//
// Specialisation: EP_SELFTEST_STRIDE (default 1) multiplies the index, to exercise -D defines.

#ifndef EP_SELFTEST_STRIDE
#define EP_SELFTEST_STRIDE 1
#endif

static_assert(sizeof(void*) == 8, "64-bit device code");

extern "C" __global__ void ep_selftest(unsigned* out, unsigned v, unsigned n) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = v + i * EP_SELFTEST_STRIDE;
    }
}
