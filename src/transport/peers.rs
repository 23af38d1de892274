//! Peer buffers: this rank's communication buffer and every rank's buffer as this rank's kernels
//! address it, for both modes (LL and HT each hold one [`PeerBuffers`] and never ask how the
//! peers are reached). The buffer is allocated zeroed, grown collectively and released at group
//! destroy by a [`PeerTransport`]:
//!
//! * [`LocalPeers`]: a local group (`ncclEpxCreateLocalGroups`): every rank in this process,
//!   every rank's buffer owned by the group's `LocalWorld`.
//! * [`IpcPeers`]: an NCCL group: buffers exchanged over the caller's communicator, peers of
//!   other processes mapped through CUDA IPC (`transport::ipc`: growth protocol, destroy barrier).
//! * [`RemotePeers`]: an NCCL group spanning nodes (docs/MULTINODE.md): the ranks of this node as
//!   `IpcPeers` does, the others through staging regions moved by `ncclSend`/`ncclRecv` on the
//!   caller's communicator and stream.

use crate::cuda::context::{CtxGuard, synchronize_current};
use crate::cuda::memory::{self, DeviceMem, Stream};
use crate::sys::{cudaStream_t, ncclComm_t};
use crate::transport::ipc::{self, SharedBuffer};
use crate::transport::local::LocalWorld;
use crate::transport::nccl::{Nccl, P2p};
use crate::transport::watchdog::ExchangeWatchdog;
use ep_core::error::Result;
use std::sync::Arc;
use std::time::Duration;

/// How one rank's communication buffer is allocated, reached by its peers and released.
///
/// Every rank of a group has the same layout in its buffer; kernels get every rank's address
/// ([`PeerTransport::peers`]) and read or write peers' buffers with plain loads, stores and
/// atomics (signals carry tags, docs/LL.md). An implementation owns this rank's buffer (with any
/// tail it needs for its own protocol past the usable bytes) and whatever it opened to reach the
/// peers'.
///
/// **Remote peers** ([`RemotePeers`], docs/MULTINODE.md): `peers` gives, for a remote rank, the
/// address of this rank's send staging region for it (the kernels write there instead of into
/// the peer's buffer); [`PeerTransport::remote`] says which ranks are remote and where their
/// messages arrive; [`PeerTransport::ensure_stage`] sizes the staging regions and
/// [`PeerTransport::exchange`] moves them between the send and the receive phase, on the
/// caller's stream. The other transports have no remote ranks: their hooks do nothing.
pub trait PeerTransport: Send + Sync {
    /// Usable bytes of this rank's buffer (0 before the first [`PeerTransport::ensure`]).
    fn bytes(&self) -> usize;

    /// Collective (every rank calls it in the same order with the same `bytes`; no operation of
    /// the group in flight): afterwards this rank's buffer is zeroed and holds at least `bytes`
    /// usable bytes, and every peer's is reachable. `LocalPeers` keeps buffers already that
    /// large; `IpcPeers` always replaces the buffer (callers only call when it must grow).
    fn ensure(&mut self, bytes: usize) -> Result<()>;

    /// Every rank's buffer as this rank's kernels address it (indexed by rank) and the usable
    /// bytes; `None` when there is no buffer yet. `need` is what the caller's layout uses: an
    /// implementation may refuse a smaller buffer with its own message (local groups do, since
    /// their buffers are shared with the other ranks' threads); callers check the fit anyway.
    fn peers(&self, need: usize) -> Result<Option<(Vec<u64>, usize)>>;

    /// This rank's own buffer (0 when there is none).
    fn own(&self) -> u64;

    /// Some peer lives in another process (and cannot read this process's memory other than
    /// the exchanged buffers): peers must read staging copies, never the caller's tensors.
    fn cross_process(&self) -> bool;

    /// One thread may drive this rank and its peers (local groups): the host must never wait
    /// for GPU work that needs a later call on another rank.
    fn peers_share_thread(&self) -> bool;

    /// Group destroy: releases this rank's buffer and its mappings of the peers' (collective
    /// where the transport's protocol needs it, bounded by `limit` so that a dead peer cannot
    /// hang the survivors). Never fails (problems are logged); afterwards `bytes` is 0.
    fn release(&mut self, limit: Duration);

    /// The ranks reached through staging (bit r) and where their messages arrive; None when
    /// every peer is reached by load/store.
    fn remote(&self) -> Option<RemoteStage> {
        None
    }

    /// Makes every staging region hold at least `stride` bytes (zeroed when (re)allocated).
    /// Local to this rank; no operation of the group may be in flight.
    fn ensure_stage(&mut self, _stride: usize) -> Result<()> {
        Ok(())
    }

    /// Moves the first `bytes` of this rank's send region for every remote peer into that
    /// peer's receive region for this rank (and the reverse), queued on `stream`: one NCCL
    /// group, the same calls on every operation (CUDA-graph capturable). The ranks in `skip`
    /// (bit r: masked by the application on the host, docs/MULTINODE.md "Masks and dead peers")
    /// are left out, which is consistent only when every rank that takes part skips them too.
    ///
    /// # Safety
    /// `stream` is a valid stream of this rank's device (the caller's, C contract of the
    /// operation), and every rank posts its exchange for the same operation.
    unsafe fn exchange(&self, _bytes: usize, _skip: u64, _stream: cudaStream_t) -> Result<()> {
        Ok(())
    }

    /// HT's variant (docs/MULTINODE.md, "HT across nodes"): no send regions (a sender sends
    /// straight from its own buffer) and one **mirror** of each remote rank's buffer holding at
    /// least `bytes` (zeroed when (re)allocated); afterwards [`PeerTransport::peers`] gives a
    /// remote rank's mirror, which the kernels read as if it were that rank's buffer. Local to
    /// this rank; no operation of the group may be in flight.
    fn ensure_mirrors(&mut self, _bytes: usize) -> Result<()> {
        Ok(())
    }

    /// Moves the byte `ranges` (offset, length) of this rank's own buffer to the same offsets of
    /// every remote rank's mirror of it, and receives theirs into this rank's mirrors, queued on
    /// `stream`: one NCCL group, ranges in the given order for each peer.
    ///
    /// # Safety
    /// As [`PeerTransport::exchange`].
    unsafe fn exchange_ranges(&self, _ranges: &[(usize, usize)], _stream: cudaStream_t) -> Result<()> {
        Ok(())
    }

    /// `ncclEpMaskClean` across nodes (docs/MULTINODE.md, "Masks and dead peers"): sends `record`
    /// to every remote rank and receives each one's, queued on `stream`, and waits for that at
    /// most `limit`. Returns (rank, record) per remote rank in rank order, or None when the
    /// exchange did not complete in time (its buffers are then kept: NCCL may still write them).
    /// Collective over the remote ranks, masked ones included (the calls must pair up).
    ///
    /// # Safety
    /// As [`PeerTransport::exchange`].
    unsafe fn swap_records(
        &self,
        _record: [u32; 4],
        _limit: Duration,
        _stream: cudaStream_t,
    ) -> Result<Option<Vec<RankRecord>>> {
        Ok(Some(Vec::new()))
    }

    /// An exchange with remote ranks stayed outstanding past the group's timeout since the flag
    /// was last cleared (`transport::watchdog`); part of the group's asynchronous error.
    fn remote_timed_out(&self) -> bool {
        false
    }

    /// Clears the flag `remote_timed_out` reads.
    fn clear_remote_timeout(&self) {}
}

/// A remote rank and the 16-byte record it sent ([`PeerTransport::swap_records`]).
pub type RankRecord = (usize, [u32; 4]);

/// Where the kernels find remote peers' messages (docs/MULTINODE.md, `LlParams::remote`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteStage {
    /// Bit r: rank r is remote.
    pub mask: u64,
    /// Receive regions, one per remote rank in rank order.
    pub recv: u64,
    /// Bytes between two regions.
    pub stride: u64,
}

/// The peer buffers of one rank of a group (LL or HT state holds one).
pub struct PeerBuffers {
    t: Box<dyn PeerTransport>,
}

impl PeerBuffers {
    pub fn new(t: impl PeerTransport + 'static) -> PeerBuffers {
        PeerBuffers { t: Box::new(t) }
    }

    /// A local group's rank `rank`.
    pub fn local(world: Arc<LocalWorld>, rank: usize) -> PeerBuffers {
        Self::new(LocalPeers { world, rank })
    }

    /// Rank `rank` of `nranks` of the caller's communicator `comm`, on `device`; the ranks in
    /// `remote` (bit r) are reached through staging ([`RemotePeers`]), the others by load/store.
    /// Exchanges with remote ranks are watched against `timeout` (zero: not watched).
    pub fn nccl(
        comm: ncclComm_t,
        rank: usize,
        nranks: usize,
        device: i32,
        remote: u64,
        timeout: Duration,
    ) -> PeerBuffers {
        let ipc = IpcPeers {
            comm,
            rank,
            nranks,
            device,
            remote,
            shared: None,
        };
        if remote == 0 {
            Self::new(ipc)
        } else {
            Self::new(RemotePeers {
                ipc,
                send: None,
                recv: None,
                stride: 0,
                mirror: false,
                timeout,
                watch: None,
            })
        }
    }

    /// Usable bytes of this rank's buffer (0 before the first `ensure`).
    pub fn len(&self) -> usize {
        self.t.bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// See [`PeerTransport::ensure`] (collective).
    pub fn ensure(&mut self, bytes: usize) -> Result<()> {
        self.t.ensure(bytes)
    }

    /// Every rank's buffer address and the usable bytes (see [`PeerTransport::peers`]); without a
    /// buffer, fails with "the group has no `what` buffer yet".
    pub fn peers(&self, need: usize, what: &str) -> Result<(Vec<u64>, usize)> {
        self.t
            .peers(need)?
            .ok_or_else(|| ep_core::invalid_usage!("the group has no {what} buffer yet"))
    }

    pub fn own(&self) -> u64 {
        self.t.own()
    }

    pub fn cross_process(&self) -> bool {
        self.t.cross_process()
    }

    pub fn peers_share_thread(&self) -> bool {
        self.t.peers_share_thread()
    }

    /// See [`PeerTransport::release`].
    pub fn release(&mut self, limit: Duration) {
        self.t.release(limit)
    }

    /// See [`PeerTransport::swap_records`].
    ///
    /// # Safety
    /// As [`PeerTransport::exchange`].
    pub unsafe fn swap_records(
        &self,
        record: [u32; 4],
        limit: Duration,
        stream: cudaStream_t,
    ) -> Result<Option<Vec<RankRecord>>> {
        // SAFETY: this function's contract is the trait method's.
        unsafe { self.t.swap_records(record, limit, stream) }
    }

    /// See [`PeerTransport::remote_timed_out`].
    pub fn remote_timed_out(&self) -> bool {
        self.t.remote_timed_out()
    }

    /// See [`PeerTransport::clear_remote_timeout`].
    pub fn clear_remote_timeout(&self) {
        self.t.clear_remote_timeout()
    }

    /// See [`PeerTransport::remote`].
    pub fn remote(&self) -> Option<RemoteStage> {
        self.t.remote()
    }

    /// See [`PeerTransport::ensure_stage`].
    pub fn ensure_stage(&mut self, stride: usize) -> Result<()> {
        self.t.ensure_stage(stride)
    }

    /// See [`PeerTransport::exchange`].
    ///
    /// # Safety
    /// As [`PeerTransport::exchange`].
    pub unsafe fn exchange(&self, bytes: usize, skip: u64, stream: cudaStream_t) -> Result<()> {
        // SAFETY: this function's contract is the trait method's.
        unsafe { self.t.exchange(bytes, skip, stream) }
    }

    /// See [`PeerTransport::ensure_mirrors`].
    pub fn ensure_mirrors(&mut self, bytes: usize) -> Result<()> {
        self.t.ensure_mirrors(bytes)
    }

    /// See [`PeerTransport::exchange_ranges`].
    ///
    /// # Safety
    /// As [`PeerTransport::exchange`].
    pub unsafe fn exchange_ranges(&self, ranges: &[(usize, usize)], stream: cudaStream_t) -> Result<()> {
        // SAFETY: this function's contract is the trait method's.
        unsafe { self.t.exchange_ranges(ranges, stream) }
    }
}

/// A rank of a local group: the world owns every rank's buffer, so whichever rank's thread sizes
/// them first sizes them all; nothing to exchange and no barrier at destroy (the buffers go with
/// the world, when its last group is gone).
pub struct LocalPeers {
    world: Arc<LocalWorld>,
    rank: usize,
}

impl PeerTransport for LocalPeers {
    fn bytes(&self) -> usize {
        self.world.buffer_bytes()
    }

    fn ensure(&mut self, bytes: usize) -> Result<()> {
        self.world.ensure(bytes)
    }

    fn peers(&self, need: usize) -> Result<Option<(Vec<u64>, usize)>> {
        self.world.peers(need).map(Some)
    }

    fn own(&self) -> u64 {
        self.world.buffer_ptr(self.rank)
    }

    fn cross_process(&self) -> bool {
        false
    }

    fn peers_share_thread(&self) -> bool {
        true
    }

    fn release(&mut self, _limit: Duration) {}
}

/// A rank of an NCCL group: its [`SharedBuffer`] (None until the first `ensure`), grown and
/// released by the protocols of `transport::ipc`.
pub struct IpcPeers {
    comm: ncclComm_t,
    rank: usize,
    nranks: usize,
    device: i32,
    /// Ranks not mapped (bit r): [`RemotePeers`] reaches them.
    remote: u64,
    shared: Option<SharedBuffer>,
}

// SAFETY: the communicator is the caller's, used only from `ensure` (`&mut self`: one thread at a
// time), as NCCL allows from any thread; the rest is plain data and owned device memory.
unsafe impl Send for IpcPeers {}
// SAFETY: shared references only read plain data (pointers, sizes); the communicator is used
// through `&mut self` only.
unsafe impl Sync for IpcPeers {}

impl PeerTransport for IpcPeers {
    fn bytes(&self) -> usize {
        self.shared.as_ref().map_or(0, SharedBuffer::len)
    }

    fn ensure(&mut self, bytes: usize) -> Result<()> {
        // SAFETY: the caller's communicator (live while its group is); the trait's contract: all
        // ranks size buffers in lockstep and no operation of the group is in flight (handles are
        // created collectively).
        unsafe {
            ipc::resize(
                &mut self.shared,
                self.comm,
                self.rank,
                self.nranks,
                self.device,
                bytes,
                self.remote,
            )
        }
    }

    fn peers(&self, _need: usize) -> Result<Option<(Vec<u64>, usize)>> {
        Ok(self.shared.as_ref().map(|b| (b.peers().to_vec(), b.len())))
    }

    fn own(&self) -> u64 {
        self.shared.as_ref().map_or(0, SharedBuffer::ptr)
    }

    fn cross_process(&self) -> bool {
        self.shared.as_ref().is_some_and(SharedBuffer::cross_process)
    }

    fn peers_share_thread(&self) -> bool {
        false
    }

    fn release(&mut self, limit: Duration) {
        if let Some(sb) = self.shared.take() {
            sb.release(limit);
        }
    }
}

/// A rank of an NCCL group spanning nodes: the ranks of its node through [`IpcPeers`], every
/// other (remote) rank through a send and a receive staging region of this rank
/// (`ep_core::ll_layout::LlStage`), packed in rank order, moved by [`PeerTransport::exchange`]
/// (LL); or (HT, [`PeerTransport::ensure_mirrors`]) through a receive region per remote rank
/// that mirrors its buffer, filled by [`PeerTransport::exchange_ranges`].
pub struct RemotePeers {
    ipc: IpcPeers,
    send: Option<DeviceMem>,
    recv: Option<DeviceMem>,
    /// Bytes per staging region (0 before the first `ensure_stage`).
    stride: usize,
    /// The receive regions are mirrors (HT): no send regions, `peers` gives the mirrors.
    mirror: bool,
    /// The group's timeout (zero: none), the bound on each exchange.
    timeout: Duration,
    /// Watches the exchanges (docs/MULTINODE.md, "Masks and dead peers"); started with the
    /// first staging, so that a group that never exchanges has no thread.
    watch: Option<ExchangeWatchdog>,
}

impl RemotePeers {
    fn remote_ranks(&self) -> impl Iterator<Item = usize> + '_ {
        ep_core::rank_set::members(self.ipc.remote, self.ipc.nranks)
    }

    /// Region of the `i`-th remote rank in a staging block.
    fn region(&self, block: &Option<DeviceMem>, i: usize) -> u64 {
        block.as_ref().map_or(0, |b| b.ptr() + (i * self.stride) as u64)
    }

    /// (Re)allocates the regions, zeroed: `stride` bytes per remote rank, receive regions and
    /// (LL, `send`) send regions; without send regions the receive regions are HT's mirrors.
    fn allocate(&mut self, stride: usize, send: bool) -> Result<()> {
        let n = self.remote_ranks().count();
        let bytes = stride
            .checked_mul(n)
            .ok_or_else(|| ep_core::invalid_arg!("the staging size overflows ({stride} x {n})"))?;
        let dev = self.ipc.device;
        let _g = CtxGuard::enter(dev)?;
        // The old regions may still be read by queued exchanges.
        synchronize_current()?;
        self.send = None;
        self.recv = None;
        let blocks = if send { 2 } else { 1 };
        let send = send.then(|| DeviceMem::alloc(dev, bytes)).transpose()?;
        let recv = DeviceMem::alloc(dev, bytes)?;
        // SAFETY: every live allocation holds `bytes`; zero is never a valid tag.
        unsafe {
            if let Some(s) = &send {
                memory::memset_d8_async(s.ptr(), 0, bytes, memory::Stream::LEGACY_DEFAULT)?;
            }
            memory::memset_d8_async(recv.ptr(), 0, bytes, memory::Stream::LEGACY_DEFAULT)?;
        }
        memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
        crate::log::log_info(format_args!(
            "rank {}: staging for {n} remote rank(s), {blocks} x {bytes} bytes",
            self.ipc.rank
        ));
        self.mirror = send.is_none();
        self.send = send;
        self.recv = Some(recv);
        self.stride = stride;
        if self.watch.is_none() && !self.timeout.is_zero() {
            self.watch = Some(ExchangeWatchdog::start(
                self.ipc.comm,
                self.ipc.rank,
                self.ipc.remote,
                dev,
                self.timeout,
            )?);
        }
        Ok(())
    }

    /// Queues an exchange with `queue` on `stream`, under the watchdog when there is one.
    ///
    /// # Safety
    /// `stream` is a valid stream of this rank's device.
    unsafe fn watched(&self, stream: cudaStream_t, queue: impl FnOnce() -> Result<()>) -> Result<()> {
        match &self.watch {
            // SAFETY: a valid stream (this function's contract).
            Some(w) => w.watch(unsafe { Stream::from_raw(stream.cast()) }, queue),
            None => queue(),
        }
    }
}

impl PeerTransport for RemotePeers {
    fn bytes(&self) -> usize {
        self.ipc.bytes()
    }

    fn ensure(&mut self, bytes: usize) -> Result<()> {
        self.ipc.ensure(bytes)
    }

    fn peers(&self, need: usize) -> Result<Option<(Vec<u64>, usize)>> {
        let Some((mut ptrs, bytes)) = self.ipc.peers(need)? else {
            return Ok(None);
        };
        // LL writes a remote rank's messages into its send region; HT reads its mirror.
        let regions = if self.mirror { &self.recv } else { &self.send };
        ep_core::ensure_usage!(
            regions.is_some(),
            "the group has no staging regions for its remote ranks yet"
        );
        for (i, r) in self.remote_ranks().enumerate() {
            ptrs[r] = self.region(regions, i);
        }
        Ok(Some((ptrs, bytes)))
    }

    fn own(&self) -> u64 {
        self.ipc.own()
    }

    fn cross_process(&self) -> bool {
        true
    }

    fn peers_share_thread(&self) -> bool {
        false
    }

    fn release(&mut self, limit: Duration) {
        // Remote ranks never map this rank's memory: the staging needs no barrier, only the
        // end of this rank's own work (an exchange may still read or write it). After an
        // exchange outlived the timeout that end may never come (NCCL's kernel waits for a dead
        // peer): the staging is then kept, not waited for.
        let stuck = self.watch.take().is_some_and(|w| w.ever_fired());
        self.ipc.release(limit);
        let idle = if stuck {
            Err(ep_core::invalid_usage!(
                "an exchange with a remote rank never completed"
            ))
        } else {
            CtxGuard::enter(self.ipc.device).and_then(|_g| synchronize_current())
        };
        let (send, recv) = (self.send.take(), self.recv.take());
        if let Err(e) = idle {
            crate::log::log_warn(format_args!(
                "keeping the staging regions allocated until the process exits: the device did not synchronise ({})",
                e.msg
            ));
            std::mem::forget((send, recv));
        }
        self.stride = 0;
    }

    fn remote(&self) -> Option<RemoteStage> {
        Some(RemoteStage {
            mask: self.ipc.remote,
            recv: self.region(&self.recv, 0),
            stride: self.stride as u64,
        })
    }

    fn ensure_stage(&mut self, stride: usize) -> Result<()> {
        if self.send.is_some() && stride <= self.stride {
            return Ok(());
        }
        self.allocate(stride, true)
    }

    fn ensure_mirrors(&mut self, bytes: usize) -> Result<()> {
        if self.mirror && self.recv.is_some() && bytes <= self.stride {
            return Ok(());
        }
        self.allocate(bytes, false)
    }

    unsafe fn exchange_ranges(&self, ranges: &[(usize, usize)], stream: cudaStream_t) -> Result<()> {
        let own = self.ipc.own();
        for &(off, len) in ranges {
            ep_core::ensure_usage!(
                self.mirror && own != 0 && off + len <= self.stride && off + len <= self.ipc.bytes(),
                "the mirrors of the remote ranks ({} bytes) or this rank's buffer ({} bytes) are too small for \
                 {len} bytes at offset {off}",
                self.stride,
                self.ipc.bytes()
            );
        }
        let xfers = mirror_transfers(
            self.ipc.remote,
            self.ipc.nranks,
            own,
            |i| self.region(&self.recv, i),
            ranges,
        );
        let nccl = Nccl::get()?;
        // SAFETY: the caller's live communicator; `stream` as this function's contract says; every
        // range lies inside this rank's buffer and inside each mirror (checked above), which live
        // until the next `ensure`/`ensure_mirrors` (both synchronise first); every rank posts the
        // same ranges for the same operation, remote ranks in rank order, so each pair's calls
        // match.
        unsafe { self.watched(stream, || nccl.exchange(&xfers, self.ipc.comm, stream)) }
    }

    unsafe fn swap_records(
        &self,
        record: [u32; 4],
        limit: Duration,
        stream: cudaStream_t,
    ) -> Result<Option<Vec<RankRecord>>> {
        let ranks: Vec<usize> = self.remote_ranks().collect();
        let dev = self.ipc.device;
        let _g = CtxGuard::enter(dev)?;
        // Slot 0: this rank's record; slot 1 + i: the i-th remote rank's.
        let mem = DeviceMem::alloc(dev, 16 * (ranks.len() + 1))?;
        // SAFETY: a valid stream of this device (this function's contract).
        let s = unsafe { Stream::from_raw(stream.cast()) };
        // SAFETY: slot 0 holds 16 bytes; `record` is 16 bytes of pageable memory, which the copy
        // reads before it returns.
        unsafe { memory::memcpy_htod_async(mem.ptr(), record.as_ptr().cast(), 16, s)? };
        let xfers: Vec<P2p> = ranks
            .iter()
            .enumerate()
            .map(|(i, &peer)| P2p {
                peer,
                send: mem.ptr(),
                recv: mem.ptr() + 16 * (i as u64 + 1),
                bytes: 16,
            })
            .collect();
        // SAFETY: the caller's live communicator; `stream` as this function's contract says;
        // every slot holds 16 bytes of `mem`, which lives until the stream ran the group (waited
        // for below) or forever (forgotten on expiry); every rank posts the same calls, remote
        // ranks in rank order.
        unsafe { Nccl::get()?.exchange(&xfers, self.ipc.comm, stream) }?;
        let done = memory::Event::new(false)?;
        done.record(s)?;
        let deadline = std::time::Instant::now() + limit;
        while !done.query()? {
            if std::time::Instant::now() > deadline {
                std::mem::forget(mem);
                return Ok(None);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let mut got = vec![0u32; 4 * ranks.len()];
        // SAFETY: the exchange has completed (the event after it is done); slots 1.. hold
        // 16 bytes per remote rank.
        unsafe { memory::memcpy_dtoh(&mut got, mem.ptr() + 16)? };
        Ok(Some(
            ranks
                .iter()
                .zip(got.chunks_exact(4))
                .map(|(&r, c)| (r, [c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }

    fn remote_timed_out(&self) -> bool {
        self.watch.as_ref().is_some_and(ExchangeWatchdog::fired)
    }

    fn clear_remote_timeout(&self) {
        if let Some(w) = &self.watch {
            w.clear();
        }
    }

    unsafe fn exchange(&self, bytes: usize, skip: u64, stream: cudaStream_t) -> Result<()> {
        ep_core::ensure_usage!(
            self.send.is_some() && bytes <= self.stride,
            "the staging regions ({} bytes) are too small for this operation ({bytes} bytes)",
            self.stride
        );
        let xfers = remote_transfers(
            self.ipc.remote,
            skip,
            self.ipc.nranks,
            |i| (self.region(&self.send, i), self.region(&self.recv, i)),
            bytes,
        );
        let nccl = Nccl::get()?;
        // SAFETY: the caller's live communicator; `stream` as this function's contract says; the
        // regions hold `stride >= bytes` bytes and live until the next `ensure_stage`, which
        // synchronises first; every rank posts its exchange for the same operation, with its
        // remote ranks in rank order, so each pair's calls match.
        unsafe { self.watched(stream, || nccl.exchange(&xfers, self.ipc.comm, stream)) }
    }
}

/// The transfers of one exchange: every remote rank not in `skip`, in rank order, its send and
/// receive regions given by `region(index among all the remote ranks)` (a skipped rank keeps its
/// regions; pure, for tests).
pub fn remote_transfers(
    remote: u64,
    skip: u64,
    nranks: usize,
    region: impl Fn(usize) -> (u64, u64),
    bytes: usize,
) -> Vec<P2p> {
    ep_core::rank_set::members(remote, nranks)
        .enumerate()
        .filter(|&(_, peer)| !ep_core::rank_set::contains(skip, peer))
        .map(|(i, peer)| {
            let (send, recv) = region(i);
            P2p {
                peer,
                send,
                recv,
                bytes,
            }
        })
        .collect()
}

/// The transfers of one HT exchange (`exchange_ranges`): for each range in order, every remote
/// rank in rank order, sent from `own + offset` and received at `mirror(index among the remote
/// ranks) + offset` (pure, for tests). Empty ranges post nothing.
pub fn mirror_transfers(
    remote: u64,
    nranks: usize,
    own: u64,
    mirror: impl Fn(usize) -> u64,
    ranges: &[(usize, usize)],
) -> Vec<P2p> {
    ranges
        .iter()
        .filter(|r| r.1 > 0)
        .flat_map(|&(off, len)| {
            remote_transfers(remote, 0, nranks, |i| (own + off as u64, mirror(i) + off as u64), len)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send_sync<T: Send + Sync>() {}

    #[test]
    fn peer_buffers_are_send_and_sync() {
        // LL and HT state stay Send + Sync with a PeerBuffers in them.
        send_sync::<PeerBuffers>();
    }

    #[test]
    fn nccl_peers_before_the_first_buffer() {
        // No CUDA and no NCCL needed: nothing is allocated before `ensure`.
        let mut p = PeerBuffers::nccl(std::ptr::null_mut(), 1, 4, 0, 0, Duration::from_secs(1));
        assert_eq!(
            (p.len(), p.own(), p.cross_process(), p.peers_share_thread()),
            (0, 0, false, false)
        );
        let e = p.peers(1, "low-latency").unwrap_err();
        assert_eq!(e.kind, ep_core::error::ErrorKind::InvalidUsage);
        assert_eq!(e.msg, "the group has no low-latency buffer yet");
        p.release(Duration::ZERO);
        assert!(p.is_empty());
    }

    #[test]
    fn remote_peers_before_the_first_buffer() {
        let mut p = PeerBuffers::nccl(std::ptr::null_mut(), 1, 4, 0, 0b1100, Duration::from_secs(1));
        assert_eq!((p.len(), p.own(), p.cross_process()), (0, 0, true));
        assert_eq!(
            p.remote(),
            Some(RemoteStage {
                mask: 0b1100,
                recv: 0,
                stride: 0
            })
        );
        let e = p.peers(1, "low-latency").unwrap_err();
        assert_eq!(e.msg, "the group has no low-latency buffer yet");
        // SAFETY: refused before any NCCL call (no staging yet).
        let e = unsafe { p.exchange(64, 0, std::ptr::null_mut()) }.unwrap_err();
        assert!(e.msg.contains("too small"), "{}", e.msg);
        p.release(Duration::ZERO);
        assert!(p.is_empty());
        // Load/store transports have no remote ranks and nothing to exchange.
        let q = PeerBuffers::nccl(std::ptr::null_mut(), 1, 4, 0, 0, Duration::from_secs(1));
        assert_eq!(q.remote(), None);
        // SAFETY: nothing to exchange: no NCCL call.
        assert!(unsafe { q.exchange(64, 0, std::ptr::null_mut()) }.is_ok());
    }

    #[test]
    fn transfers_follow_rank_order() {
        let x = remote_transfers(0b1011_0000, 0, 8, |i| (100 + i as u64, 200 + i as u64), 64);
        assert_eq!(
            x,
            vec![
                P2p {
                    peer: 4,
                    send: 100,
                    recv: 200,
                    bytes: 64
                },
                P2p {
                    peer: 5,
                    send: 101,
                    recv: 201,
                    bytes: 64
                },
                P2p {
                    peer: 7,
                    send: 102,
                    recv: 202,
                    bytes: 64
                },
            ]
        );
        assert!(remote_transfers(0, 0, 8, |_| (0, 0), 64).is_empty());
        // Bits past nranks are ignored.
        assert_eq!(remote_transfers(0b1_0000_0010, 0, 4, |_| (0, 0), 8).len(), 1);
        // A skipped (host-masked) rank is left out; the others keep their own regions.
        let y = remote_transfers(0b1011_0000, 0b0010_0001, 8, |i| (100 + i as u64, 200 + i as u64), 64);
        assert_eq!(
            y.iter().map(|t| (t.peer, t.send, t.recv)).collect::<Vec<_>>(),
            vec![(4, 100, 200), (7, 102, 202)]
        );
    }

    #[test]
    fn mirror_transfers_keep_range_order_per_peer() {
        let x = mirror_transfers(0b1010, 4, 1000, |i| 5000 + 100 * i as u64, &[(0, 8), (16, 0), (32, 4)]);
        let p = |peer, send, recv, bytes| P2p {
            peer,
            send,
            recv,
            bytes,
        };
        assert_eq!(
            x,
            vec![
                p(1, 1000, 5000, 8),
                p(3, 1000, 5100, 8),
                p(1, 1032, 5032, 4),
                p(3, 1032, 5132, 4)
            ]
        );
        assert!(mirror_transfers(0, 4, 1000, |_| 0, &[(0, 8)]).is_empty());
    }

    #[test]
    fn remote_mirrors_before_the_first_buffer() {
        let p = PeerBuffers::nccl(std::ptr::null_mut(), 0, 4, 0, 0b1100, Duration::from_secs(1));
        // SAFETY: refused before any NCCL call (no mirrors yet).
        let e = unsafe { p.exchange_ranges(&[(0, 64)], std::ptr::null_mut()) }.unwrap_err();
        assert!(e.msg.contains("too small"), "{}", e.msg);
        // Load/store transports have nothing to mirror.
        let mut q = PeerBuffers::nccl(std::ptr::null_mut(), 0, 4, 0, 0, Duration::from_secs(1));
        assert!(q.ensure_mirrors(1 << 20).is_ok());
        // SAFETY: nothing to exchange: no NCCL call.
        assert!(unsafe { q.exchange_ranges(&[(0, 64)], std::ptr::null_mut()) }.is_ok());
    }

    #[test]
    fn local_peers_before_the_first_buffer() {
        let world = Arc::new(LocalWorld::new(vec![0, 0]));
        let p = PeerBuffers::local(world, 1);
        assert_eq!(
            (p.len(), p.own(), p.cross_process(), p.peers_share_thread()),
            (0, 0, false, true)
        );
        let e = p.peers(64, "high-throughput").unwrap_err();
        assert_eq!(e.kind, ep_core::error::ErrorKind::InvalidUsage);
        assert!(e.msg.contains("no communication buffer of 64 bytes yet"), "{}", e.msg);
    }
}
