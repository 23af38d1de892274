// Shared pieces of the high-throughput kernels (docs/HT.md, "GPU design"): the open/close protocol
// and segment helpers. kernels/ep_device.cuh (loads, stores, copies) and kernels/ep_params.cuh
// (HtParams, HtHdr, EpState, HT_* constants, generated from the Rust definitions) come first.
// Header-free on purpose: NVRTC compiles this at run time with no CUDA include path.
#pragma once

__device__ __forceinline__ u32 cur_epoch(const HtParams& p) { return ((volatile EpState*)p.state)->epoch; }

__device__ __forceinline__ char* peer_buf(const HtParams& p, int r) { return (char*)p.peers[r]; }

// Rank r is on another node (docs/MULTINODE.md, "HT across nodes"): peer_buf(p, r) is this rank's
// mirror of r's buffer, which the exchange filled before this launch (stream order); nothing is
// written to it and no flag of r is waited for.
__device__ __forceinline__ bool is_remote(const HtParams& p, int r) { return (p.remote >> r) & 1; }

// Waits until the flag holds `tag`; false after a timeout (the host-visible error flag is then
// raised and the peer counts as absent). Bounded like LL's waits: p.timeout_ns nanoseconds of
// %globaltimer (0 = forever), the clock read every EP_POLLS_PER_CHECK polls.
__device__ __forceinline__ bool wait_tag(const u64* flag, u32 tag, const HtParams& p) {
  u64 start = 0;
  for (u32 polls = 0;; ++polls) {
    if (ld_acquire_sys(flag) == (u64)tag) return true;
    if (polls % EP_POLLS_PER_CHECK != 0) continue;
    const u64 now = now_ns();
    if (start == 0) start = now;
    if (p.timeout_ns > 0 && now - start > (u64)p.timeout_ns) {
      if (p.err) atomicExch((int*)p.err, 1);
      return false;
    }
  }
}

// Opening of an operation. Block 0 publishes this rank's pointers (`ptrs`, HT_PTR_SLOTS values;
// may be null) into every peer's buffer and raises its `open` flag there; then every block
// waits for all sources' flags and returns the mask of present sources, with their pointers in
// `src_ptrs[s][*]` (shared memory).
__device__ u64 open_op(const HtParams& p, u32 tag, const u64* ptrs, u64 (*src_ptrs)[HT_PTR_SLOTS]) {
  __shared__ u64 present_mask;
  if (threadIdx.x == 0) present_mask = 0;
  if (blockIdx.x == 0 && threadIdx.x < p.nranks && !is_remote(p, threadIdx.x)) {
    const int d = threadIdx.x;
    char* b = peer_buf(p, d);
    if (ptrs) {
      u64* slot = (u64*)(b + p.off_ptrs) + (u64)p.rank * HT_PTR_SLOTS;
      for (int i = 0; i < HT_PTR_SLOTS; ++i) slot[i] = ptrs[i];
    }
    __threadfence_system();
    st_release_sys((u64*)(b + p.off_open) + p.rank, (u64)tag);
  }
  __syncthreads();
  if (threadIdx.x < p.nranks) {
    const int s = threadIdx.x;
    // A remote source's flag and pointers are its own slots of its buffer, in our mirror of it.
    char* mine = peer_buf(p, is_remote(p, s) ? s : p.rank);
    if (wait_tag((const u64*)(mine + p.off_open) + s, tag, p)) {
      if (src_ptrs) {
        const u64* slot = (const u64*)(mine + p.off_ptrs) + (u64)s * HT_PTR_SLOTS;
        for (int i = 0; i < HT_PTR_SLOTS; ++i) src_ptrs[s][i] = ld_cg_u64(slot + i);
      }
      atomicOr(&present_mask, 1ull << s);
    }
  }
  __syncthreads();
  return present_mask;
}

__device__ __forceinline__ void warp_zero(void* dst, int bytes, int lane) {
  int4* d = (int4*)dst;
  const int4 z = make_int4(0, 0, 0, 0);
  for (int i = lane; i < (bytes >> 4); i += 32) d[i] = z;
}

// Rows are split into segments of this many bytes so that several warps share one long row.
#define HT_SEG_BYTES 4096

__device__ __forceinline__ int num_segments(int row_bytes) { return (row_bytes + HT_SEG_BYTES - 1) / HT_SEG_BYTES; }

__device__ __forceinline__ int segment_bytes(int row_bytes, int seg) {
  return min(HT_SEG_BYTES, row_bytes - seg * HT_SEG_BYTES);
}

__device__ __forceinline__ HtHdr* hdr(const HtParams& p) { return (HtHdr*)p.hmem; }

// The closing barrier of an HT operation, run by one block: tell each peer this rank is done
// reading its data, wait until every peer is done with ours, then advance the epoch.
__device__ void close_op(const HtParams& p) {
  const u32 tag = cur_epoch(p) + 1u;
  // Remote ranks read our mirror, never our buffer: stream order covers them.
  const bool local = threadIdx.x < p.nranks && !is_remote(p, threadIdx.x);
  if (local) {
    const int d = threadIdx.x;
    st_release_sys((u64*)(peer_buf(p, d) + p.off_done) + p.rank, (u64)tag);
  }
  __syncthreads();
  if (local) wait_tag((const u64*)(peer_buf(p, p.rank) + p.off_done) + threadIdx.x, tag, p);
  __syncthreads();
  if (threadIdx.x == 0) {
    ((EpState*)p.state)->epoch = tag;
    __threadfence();
  }
}

// The handle's metadata pass ends with this kernel (one block, its own launch so that every
// pull of the pass has finished; in every module so that no module load falls between an
// operation's launches).
extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_close(const HtParams p) { close_op(p); }

// Dispatch and combine end inside their own kernel instead: each block counts itself done in
// EpState::done once its pulls have returned (its loads fed its stores), and the last block runs
// the closing barrier. One kernel per phase, so that a profiler (NVIDIA's ep_bench times the
// kernels named *dispatch_kernel / *combine_kernel) sees the whole operation, and one launch less.
__device__ void close_when_last(const HtParams& p) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    EpState* st = (EpState*)p.state;
    last = atomicAdd(&st->done, 1u) == gridDim.x - 1;
    if (last) st->done = 0;
  }
  __syncthreads();
  if (last) close_op(p);
}

// Groups with remote ranks (docs/MULTINODE.md, "HT across nodes"): before the exchange, this
// rank writes the pointers of its operation and its open flag into its own slots of its own
// buffer, from where the exchange carries them into the remote ranks' mirrors of it (open_op
// writes the same values again). The metadata pass publishes its first bad routing entry
// (ht_meta.cu, routing_ptrs), dispatch and combine their inputs, as their kernels do.
#ifdef EP_IDX64
__device__ void routing_ptrs(const HtParams& p, u64* mine);
#endif
extern "C" __global__ void __launch_bounds__(HT_THREADS) ht_publish(const HtParams p) {
  if (threadIdx.x != 0) return;
#ifdef EP_IDX64
  u64 mine[HT_PTR_SLOTS];
  routing_ptrs(p, mine);
#else
  const u64 mine[HT_PTR_SLOTS] = {p.in0, p.in1, p.in2, 0};
#endif
  char* b = peer_buf(p, p.rank);
  u64* slot = (u64*)(b + p.off_ptrs) + (u64)p.rank * HT_PTR_SLOTS;
  for (int i = 0; i < HT_PTR_SLOTS; ++i) slot[i] = mine[i];
  __threadfence_system();
  st_release_sys((u64*)(b + p.off_open) + p.rank, (u64)(cur_epoch(p) + 1u));
}
