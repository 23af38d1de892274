//! An EP group: validated parameters, where its ranks live, and its GPU state.

use crate::cuda::memory;
use crate::runtime::alloc::{CustomAlloc, GroupMem};
use crate::runtime::ht::HtState;
use crate::runtime::ll::{self, LlState};
use crate::runtime::ll_params::EP_STATE_BYTES;
use crate::sys::ncclComm_t;
use crate::transport::local::LocalWorld;
use crate::transport::peers::PeerBuffers;
use ep_core::config::{EnvOverrides, GroupConfig, GroupParams, validate_group_config};
use ep_core::enums::Algorithm;
use ep_core::error::Result;
use parking_lot::{Mutex, MutexGuard};
use std::sync::Arc;

/// How this rank reaches its peers.
#[derive(Debug)]
pub enum Membership {
    /// A rank of the caller's NCCL communicator.
    Nccl { comm: ncclComm_t, nccl_version: i32 },
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
    /// Low-latency GPU state (None for HIGH_THROUGHPUT groups).
    pub ll: Option<LlState>,
    /// High-throughput GPU state (None for LOW_LATENCY groups).
    pub ht: Option<HtState>,
}

/// SM count of a device, or 0 (unknown) when there is no CUDA driver.
fn device_sms(device: i32) -> Result<u32> {
    if !crate::cuda::driver::driver_available() {
        return Ok(0);
    }
    Ok(crate::cuda::driver::sm_count(device)? as u32)
}

impl Group {
    /// Creates this rank's group on the caller's communicator (collective).
    ///
    /// # Safety
    /// `comm` is the caller's live communicator.
    pub unsafe fn from_comm(comm: ncclComm_t, cfg: &GroupConfig, alloc: Option<CustomAlloc>) -> Result<Group> {
        let nccl = crate::transport::nccl::Nccl::get()?;
        // SAFETY: the caller passes its live communicator (C contract of ncclEpCreateGroup).
        let (rank, nranks, device) = unsafe { nccl.comm_info(comm) }?;
        let sms = device_sms(device)?;
        let params = validate_group_config(cfg, rank, nranks, sms, &EnvOverrides::from_env())?;
        crate::log::log_info(format_args!(
            "group: rank {rank}/{nranks} on device {device}, {} experts, NCCL {}",
            params.num_experts, nccl.version
        ));
        Self::finish(
            params,
            device,
            Membership::Nccl {
                comm,
                nccl_version: nccl.version,
            },
            alloc,
            1,
        )
    }

    /// Creates rank `rank` of a local group (no communicator).
    pub fn local(world: &Arc<LocalWorld>, rank: usize, cfg: &GroupConfig, alloc: Option<CustomAlloc>) -> Result<Group> {
        let device = world.devices[rank];
        let sms = device_sms(device)?;
        let params = validate_group_config(cfg, rank as u32, world.nranks() as u32, sms, &EnvOverrides::from_env())?;
        let on_device = world.ranks_on(device);
        Self::finish(
            params,
            device,
            Membership::Local { world: world.clone() },
            alloc,
            on_device,
        )
    }

    fn finish(
        params: GroupParams,
        device: i32,
        membership: Membership,
        alloc: Option<CustomAlloc>,
        ranks_on_device: usize,
    ) -> Result<Group> {
        // validate_group_config refused one callback without the other.
        let custom_alloc = alloc;
        let mut g = Group {
            params,
            device,
            membership,
            live_handles: 0,
            destroyed: false,
            custom_alloc,
            ll: None,
            ht: None,
        };
        // Without a CUDA driver (tests with a stand-in NCCL) the group exists for validation only.
        if g.params.algorithm == Algorithm::LowLatency && crate::cuda::driver::driver_available() {
            g.ll = Some(LlState::new(&g, ranks_on_device)?);
            let explicit = g.params.rdma_buffer_size;
            if explicit != 0 {
                // An explicit size is allocated now; handles must fit in it.
                let lay = ll::layout(&g, 1)?;
                ll::ensure_buffer(&mut g, &lay)?;
            }
        }
        if g.params.algorithm == Algorithm::HighThroughput && crate::cuda::driver::driver_available() {
            // The buffer is sized at the first handle (config->rdma_buffer_size is not used).
            g.ht = Some(HtState::new(&g, ranks_on_device)?);
        }
        Ok(g)
    }

    pub fn ll(&self) -> Result<&LlState> {
        self.ll.as_ref().ok_or_else(|| self.no_state(Algorithm::LowLatency))
    }

    pub fn ll_mut(&mut self) -> Result<&mut LlState> {
        let err = self.no_state(Algorithm::LowLatency);
        self.ll.as_mut().ok_or(err)
    }

    pub fn ht(&self) -> Result<&HtState> {
        self.ht.as_ref().ok_or_else(|| self.no_state(Algorithm::HighThroughput))
    }

    pub fn ht_mut(&mut self) -> Result<&mut HtState> {
        let err = self.no_state(Algorithm::HighThroughput);
        self.ht.as_mut().ok_or(err)
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
            Membership::Nccl { comm, .. } => PeerBuffers::nccl(*comm, rank, nranks, self.device),
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
        self.ll.is_some() || self.ht.is_some()
    }

    /// The group's asynchronous error flag (a GPU wait timed out, or a captured HT update
    /// overflowed under TRAP).
    pub fn async_error(&self) -> bool {
        self.ll.as_ref().is_some_and(|l| l.timed_out()) || self.ht.as_ref().is_some_and(|h| h.timed_out())
    }

    /// Clears the flag `async_error` reads.
    pub fn clear_async_error(&self) {
        if let Some(l) = &self.ll {
            l.clear_timeout();
        }
        if let Some(h) = &self.ht {
            h.clear_timeout();
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
        if let Some(l) = self.ll.as_mut() {
            l.buffers.release(limit);
        }
        if let Some(h) = self.ht.as_mut() {
            h.buffers.release(limit);
        }
        self.ll = None;
        self.ht = None;
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
