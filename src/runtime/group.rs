//! An EP group: validated parameters, where its ranks live, and its GPU state.

use crate::cuda::memory;
use crate::runtime::alloc::{CustomAlloc, GroupMem};
use crate::runtime::ll_params::EP_STATE_BYTES;
use crate::sys::ncclComm_t;
use crate::transport::local::LocalWorld;
use crate::transport::peers::PeerBuffers;
use ep_core::config::GroupParams;
use ep_core::enums::Algorithm;
use ep_core::error::Result;
use parking_lot::{Mutex, MutexGuard};
use std::any::Any;
use std::sync::Arc;

/// How this rank reaches its peers.
#[derive(Debug)]
pub enum Membership {
    /// A rank of the caller's NCCL communicator; `remote` (bit r): ranks on other nodes,
    /// reached through NCCL point-to-point (docs/MULTINODE.md).
    Nccl {
        comm: ncclComm_t,
        nccl_version: i32,
        remote: u64,
    },
    /// A rank of a local group made by `ncclEpxCreateLocalGroups`.
    Local { world: Arc<LocalWorld> },
}

// SAFETY: `comm` is the caller's communicator, an opaque handle NCCL lets any thread pass to it;
// we use it only under the group's lock (one call at a time), as the C API lets the caller make
// that call from any thread.
unsafe impl Send for Membership {}

pub struct Group {
    pub params: GroupParams,
    pub device: i32,
    pub membership: Membership,
    /// Handles created on this group and not destroyed yet.
    pub live_handles: usize,
    /// `ncclEpGroupDestroy` ran: a call that found the group live but got its lock only
    /// afterwards must fail instead of using it (see [`SharedGroup::lock`]).
    pub destroyed: bool,
    pub custom_alloc: Option<CustomAlloc>,
    /// The mode's GPU state (`runtime::ll::LlState` or `runtime::ht::HtState`; None without a
    /// CUDA driver). Held as a trait object so that this module needs neither mode: each mode's
    /// module reaches its own state through its extension trait (`LlGroup`, `HtGroup`), and the
    /// constructors that pick the mode live above both (`runtime::create`).
    pub mode: Option<Box<dyn ModeState>>,
}

/// What the group needs of its mode's state, whichever mode it is.
pub trait ModeState: Any + Send {
    /// The communication buffer and every peer's view of it.
    fn buffers_mut(&mut self) -> &mut PeerBuffers;
    /// A kernel timed out waiting for a peer (or a captured HT update overflowed) since the flag
    /// was last cleared.
    fn timed_out(&self) -> bool;
    /// Clears the flag `timed_out` reads.
    fn clear_timeout(&self);
    fn as_any(&self) -> &dyn Any;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl Group {
    /// The mode's state as its own type `T`, or why there is none.
    pub fn mode_state<T: ModeState>(&self, mode: Algorithm) -> Result<&T> {
        self.mode
            .as_deref()
            .and_then(|m| m.as_any().downcast_ref::<T>())
            .ok_or_else(|| self.no_state(mode))
    }

    /// As [`Group::mode_state`], mutable.
    pub fn mode_state_mut<T: ModeState>(&mut self, mode: Algorithm) -> Result<&mut T> {
        let err = self.no_state(mode);
        self.mode
            .as_deref_mut()
            .and_then(|m| m.as_any_mut().downcast_mut::<T>())
            .ok_or(err)
    }

    /// Why the `mode` state is missing: no CUDA driver, or a group of the other mode.
    fn no_state(&self, mode: Algorithm) -> ep_core::error::Error {
        if self.params.algorithm == mode {
            ep_core::error::Error::new(
                ep_core::error::ErrorKind::Cuda,
                "this group has no GPU state: the CUDA driver (libcuda.so.1) could not be loaded",
            )
        } else {
            ep_core::invalid_usage!("this is not a {} group", mode.short())
        }
    }

    /// This rank's (still empty) peer buffers: the one place that asks how the ranks reach
    /// each other (LL and HT hold the result and never look at `membership`).
    pub fn peer_buffers(&self) -> PeerBuffers {
        let (rank, nranks) = (self.params.rank as usize, self.params.nranks as usize);
        match &self.membership {
            Membership::Local { world } => PeerBuffers::local(world.clone(), rank),
            Membership::Nccl { comm, remote, .. } => PeerBuffers::nccl(
                *comm,
                rank,
                nranks,
                self.device,
                *remote,
                std::time::Duration::from_nanos(self.params.timeout_ns),
            ),
        }
    }

    /// A zeroed `struct EpState` (the device epoch and block counters LL and HT kernels share),
    /// from the caller's allocator when the config has one.
    pub fn zeroed_ep_state(&self) -> Result<GroupMem> {
        let state = GroupMem::alloc(self.device, EP_STATE_BYTES, self.custom_alloc)?;
        let _ctx = crate::cuda::context::CtxGuard::enter(self.device)?;
        // SAFETY: state holds EP_STATE_BYTES bytes; the legacy stream is synchronised right after.
        unsafe { memory::memset_d8_async(state.ptr(), 0, EP_STATE_BYTES, memory::Stream::LEGACY_DEFAULT)? };
        memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
        Ok(state)
    }

    /// The bound on every GPU wait, as the kernels take it: nanoseconds of the GPU's timer
    /// (`%globaltimer`, not SM cycles, whose rate varies with the clock), 0 = none.
    pub fn kernel_timeout_ns(&self) -> i64 {
        self.params.timeout_ns.min(i64::MAX as u64) as i64
    }

    /// Blocks of each data-parallel kernel: this device's SMs shared among the group's ranks on
    /// it, at most `max_num_sms` when the config sets it.
    pub fn kernel_blocks(&self, ranks_on_device: usize) -> Result<u32> {
        let sms = crate::cuda::driver::sm_count(self.device)? as u32;
        let blocks = (sms / ranks_on_device.max(1) as u32).max(1);
        Ok(match self.params.max_num_sms {
            0 => blocks,
            max => blocks.min(max),
        })
    }

    /// True when the group has GPU state (LL or HT).
    pub fn has_gpu_state(&self) -> bool {
        self.mode.is_some()
    }

    /// The group's asynchronous error flag (a GPU wait timed out, or a captured HT update
    /// overflowed under TRAP).
    pub fn async_error(&self) -> bool {
        self.mode.as_ref().is_some_and(|m| m.timed_out())
    }

    /// Clears the flag `async_error` reads.
    pub fn clear_async_error(&self) {
        if let Some(m) = &self.mode {
            m.clear_timeout();
        }
    }

    /// `ncclEpGroupDestroy`, run once, by the caller's destroy, under the group's lock: releases
    /// the communication buffer through its transport (NCCL groups with a peer in another
    /// process: the destroy barrier, `SharedBuffer::release`; every rank destroys its group, as
    /// NVIDIA's destroy is collective too), then frees the GPU state now rather than at the last
    /// `Arc`'s drop (a call racing the destroy may still hold one; it fails on `destroyed`).
    pub fn destroy(&mut self) {
        self.destroyed = true;
        // Every rank enters the barrier (as NVIDIA's destroy), bounded by the group's timeout so
        // that a peer that died cannot hang the survivors.
        let limit = std::time::Duration::from_nanos(self.params.timeout_ns);
        if let Some(m) = self.mode.as_mut() {
            m.buffers_mut().release(limit);
        }
        self.mode = None;
    }
}

/// A group as its C pointer (the ABI registry) and its handles share it. One lock serialises
/// every call on the group, so concurrent calls from several threads are safe (NVIDIA's
/// library takes no lock: there they are the caller's race). Lock order: a handle's lock, then
/// its group's, then the ABI registry's; no call holds two groups' locks, so one thread driving
/// every rank of a local group (each rank its own group) cannot deadlock on them.
/// `parking_lot`: no poisoning; a call that panics (the ABI turns that into ncclInternalError)
/// leaves the group as the call left it, as a C error return would.
pub struct SharedGroup {
    /// The validated parameters, which never change: readable without the lock.
    pub params: GroupParams,
    state: Mutex<Group>,
}

/// What a handle and the ABI registry hold of a group.
pub type GroupRef = Arc<SharedGroup>;

impl SharedGroup {
    pub fn new(g: Group) -> GroupRef {
        Arc::new(SharedGroup {
            params: g.params.clone(),
            state: Mutex::new(g),
        })
    }

    /// Locks the group for one call; fails if `ncclEpGroupDestroy` ran meanwhile (the caller
    /// found the group live, then waited for this lock while another thread destroyed it).
    pub fn lock(&self) -> Result<MutexGuard<'_, Group>> {
        let g = self.state.lock();
        ep_core::ensure_arg!(
            !g.destroyed,
            "the group was destroyed (ncclEpGroupDestroy on another thread) while this call waited for it"
        );
        Ok(g)
    }
}
