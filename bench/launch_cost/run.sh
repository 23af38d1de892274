#!/bin/bash
# The host time of one cuLaunchKernel on this machine (issue 15's "host time per ncclEpDispatch"
# has this as its floor): launch_cost (an empty kernel, by parameter block size) and launch_real
# (our own ll_dispatch / ll_combine cubins, built here by nvcc from the same concatenated source
# NVRTC compiles, launched with phases = 0 so that they only read their state and return).
# Needs nvcc and a GPU; writes nothing but /tmp files. Results: bench/results/launch-cost-*.txt.
set -euo pipefail
cd "$(dirname "$0")"
K=../../kernels
nvcc -O2 -arch=sm_90 -o /tmp/launch_cost launch_cost.cu -lcuda
nvcc -O2 -arch=sm_90 -o /tmp/launch_real launch_real.cu -lcuda
nvcc -cubin -arch=sm_90a -o /tmp/trivial.cubin trivial.cu
cat $K/ep_device.cuh $K/ep_params.cuh $K/ll_common.cuh $K/ll_dispatch.cu | grep -v '#pragma once' >/tmp/lld.cu
cat $K/ep_device.cuh $K/ep_params.cuh $K/ll_common.cuh $K/ll_combine.cu | grep -v '#pragma once' >/tmp/llc.cu
nvcc -cubin -arch=sm_90a -DEP_TOPK=8 -DEP_EM=1 -DEP_IDX64=1 -DEP_MASK=0 -o /tmp/lld.cubin /tmp/lld.cu
nvcc -cubin -arch=sm_90a -DEP_TOPK=8 -DEP_EM=1 -DEP_IDX64=1 -DEP_MASK=0 -DEP_DTYPE=0 -o /tmp/llc.cubin /tmp/llc.cu
/tmp/launch_cost
/tmp/launch_real /tmp/trivial.cubin /tmp/lld.cubin ll_dispatch /tmp/llc.cubin ll_combine
