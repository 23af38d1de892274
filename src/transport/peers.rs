//! Peer buffers: this rank's communication buffer and every rank's buffer as this rank's kernels
//! address it, for both modes (LL and HT each hold one [`PeerBuffers`] and never ask how the
//! peers are reached). The buffer is allocated zeroed, grown collectively and released at group
//! destroy by a [`PeerTransport`]:
//!
//! * [`LocalPeers`]: a local group (`ncclEpxCreateLocalGroups`): every rank in this process,
//!   every rank's buffer owned by the group's `LocalWorld`.
//! * [`IpcPeers`]: an NCCL group: buffers exchanged over the caller's communicator, peers of
//!   other processes mapped through CUDA IPC (`transport::ipc`: growth protocol, destroy barrier).
//!
//! docs/LL.md ("Peer buffers") says how a remote transport (issue 14) would be a third one.

use crate::sys::ncclComm_t;
use crate::transport::ipc::{self, SharedBuffer};
use crate::transport::local::LocalWorld;
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
/// **A remote transport** (issue 14: peers on other hosts through the caller's NCCL, staging
/// regions and `ncclSend`/`ncclRecv`) plugs in as a third implementation: `ensure` allocates the
/// buffer plus a staging region per remote peer (collectively, over the same communicator);
/// `peers` gives, for a remote rank, the address of this rank's staging region for it (the
/// kernels write there as if into the peer's buffer), for the others the direct addresses as
/// [`IpcPeers`] does; `cross_process` is true (peers read staging copies, never caller tensors);
/// `release` runs its own barrier. What it adds and this trait has not yet: hooks that move the
/// staging regions between the send and the receive phase of an operation on the caller's
/// stream, which LL and HT would call around their launches (no-ops for the two transports
/// here).
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

    /// Rank `rank` of `nranks` of the caller's communicator `comm`, on `device`.
    pub fn nccl(comm: ncclComm_t, rank: usize, nranks: usize, device: i32) -> PeerBuffers {
        Self::new(IpcPeers {
            comm,
            rank,
            nranks,
            device,
            shared: None,
        })
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
        unsafe { ipc::resize(&mut self.shared, self.comm, self.rank, self.nranks, self.device, bytes) }
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
        let mut p = PeerBuffers::nccl(std::ptr::null_mut(), 1, 4, 0);
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
