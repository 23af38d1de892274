//! Creating a group: the rules on its config, then the state of its mode. Above both modes
//! (`runtime::ll`, `runtime::ht`) and the group itself, so that none of those imports another.

use crate::runtime::alloc::CustomAlloc;
use crate::runtime::group::{Group, Membership};
use crate::runtime::ht::HtState;
use crate::runtime::ll::{self, LlState};
use crate::sys::ncclComm_t;
use crate::transport::local::LocalWorld;
use ep_core::config::{EnvOverrides, GroupConfig, GroupParams, validate_group_config};
use ep_core::enums::Algorithm;
use ep_core::error::Result;
use std::sync::Arc;

/// SM count of a device, or 0 (unknown) when there is no CUDA driver.
fn device_sms(device: i32) -> Result<u32> {
    if !crate::cuda::driver::driver_available() {
        return Ok(0);
    }
    Ok(crate::cuda::driver::sm_count(device)? as u32)
}

/// The ranks this rank reaches through NCCL point-to-point (bit r) and what decided it:
/// `NCCL_EP_NODE_SIZE` when set (blocks of consecutive ranks; the one-machine test mode),
/// otherwise every rank's host, all-gathered over `comm` (docs/MULTINODE.md, "Who is remote").
/// Without a CUDA driver (tests with a stand-in NCCL) no group gets buffers: none.
///
/// # Safety
/// `comm` is the caller's live communicator; every rank calls this in the same order.
unsafe fn remote_ranks(
    nccl: &crate::transport::nccl::Nccl,
    comm: ncclComm_t,
    rank: usize,
    nranks: usize,
    device: i32,
) -> Result<(u64, &'static str)> {
    use crate::transport::{identity, ipc};
    if let Some(k) = identity::node_size_from_env()? {
        return Ok((ep_core::ll_layout::remote_ranks(rank, nranks, k), "NCCL_EP_NODE_SIZE"));
    }
    if nranks == 1 || !crate::cuda::driver::driver_available() {
        return Ok((0, "one host"));
    }
    // SAFETY: this function's contract is host_ids'.
    let hosts = unsafe { ipc::host_ids(nccl, comm, nranks, device) }?;
    Ok((identity::remote_ranks_by_host(&hosts, rank), "hosts"))
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
        // SAFETY: as above; every rank creates its group in the same order (collective call).
        let (remote, by) = unsafe { remote_ranks(nccl, comm, rank as usize, nranks as usize, device) }?;
        crate::log::log_info(format_args!(
            "group: rank {rank}/{nranks} on device {device}, {} experts, NCCL {}, {} remote rank(s) ({by})",
            params.num_experts,
            nccl.version,
            remote.count_ones()
        ));
        Self::finish(
            params,
            device,
            Membership::Nccl {
                comm,
                nccl_version: nccl.version,
                remote,
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
            mode: None,
        };
        // Without a CUDA driver (tests with a stand-in NCCL) the group exists for validation only.
        if g.params.algorithm == Algorithm::LowLatency && crate::cuda::driver::driver_available() {
            g.mode = Some(Box::new(LlState::new(&g, ranks_on_device)?));
            let explicit = g.params.rdma_buffer_size;
            if explicit != 0 {
                // An explicit size is allocated now; handles must fit in it.
                let lay = ll::layout(&g, 1)?;
                ll::ensure_buffer(&mut g, &lay)?;
            }
        }
        if g.params.algorithm == Algorithm::HighThroughput && crate::cuda::driver::driver_available() {
            // The buffer is sized at the first handle (config->rdma_buffer_size is not used).
            g.mode = Some(Box::new(HtState::new(&g, ranks_on_device)?));
        }
        Ok(g)
    }
}
