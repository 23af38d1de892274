// ncclEpMaskClean (docs/LL.md, "Masks and timeouts"). Compiled by NVRTC after ll_common.cuh
// (with EP_TOPK=1, which it does not use). One block of up to 64 threads, one per rank:
//  1. publishes (clean_seq << 32) | epoch into clean_flag[me] (bank 0) of every rank, masked ones
//     included: a rank that the others masked may itself be waiting for them;
//  2. waits for the clean flag of every rank active in its own mask, up to the timeout (a rank
//     that does not come is reported in clean_missing and the async error flag is raised);
//  3. moves its epoch to the latest one among itself and the ranks it waited for, so that all of
//     them run the next operation on the same bank with the same tag (a rank that was silent
//     lags behind), and zeroes the block counters.
// Nothing else needs resetting: flags are tagged with epochs that never go back, so a stale flag
// never matches (docs/LL.md). The host then sets the mask to all ones and synchronises.
// Ranks on other nodes (p.remote, docs/MULTINODE.md) have no buffer here to write into or read
// from: they are skipped, and the host exchanges (sequence, epoch) with them afterwards.

extern "C" __global__ void __launch_bounds__(LL_CLEAN_THREADS) ll_clean(const LlParams p) {
  const int N = p.nranks;
  EpState* st = (EpState*)p.state;
  const u32 epoch = ((volatile EpState*)st)->epoch;
  const u32 seq = (u32)p.clean_seq;
  __shared__ int ahead[LL_MAX_RANKS];  // how far each rank's epoch is ahead of ours (<= 0: not)
  __shared__ u64 missing;
  if (threadIdx.x == 0) missing = 0;
  for (int r = threadIdx.x; r < LL_MAX_RANKS; r += blockDim.x) ahead[r] = 0;
  __syncthreads();
  for (int d = threadIdx.x; d < N; d += blockDim.x)
    if (!is_remote(p, d))
      st_release_sys((u64*)((char*)p.peers[d] + p.off_clean) + p.rank, ((u64)seq << 32) | epoch);
  const u64* flags = (const u64*)((const char*)p.peers[p.rank] + p.off_clean);
  for (int s = threadIdx.x; s < N; s += blockDim.x) {
    if (s == p.rank || !rank_active(p, s) || is_remote(p, s)) continue;
    const u64 start = now_ns();
    while (true) {
      const u64 v = ld_acquire_sys(flags + s);
      // A later clean of that rank also counts (a rank may have retried after a timeout).
      if ((int)((u32)(v >> 32) - seq) >= 0) {
        ahead[s] = (int)((u32)v - epoch);
        break;
      }
      if (timed_out(p, start)) {
        atomicOr((unsigned long long*)&missing, 1ull << s);
        say_timeout(p.rank, s, timeout_ms(p), EP_WAIT_CLEAN, 1);
        break;
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int best = 0;
    for (int s = 0; s < N; ++s) best = max(best, ahead[s]);
    st->epoch = epoch + (u32)best;
    st->done = 0;
    st->sent_done = 0;
    st->trapping = 0;
    if (p.err) {
      *(volatile u64*)((char*)p.err + 8) = missing;
      if (missing) raise_error(p);
    }
    __threadfence_system();
  }
}
