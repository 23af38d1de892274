//! An EP group: validated parameters, where its ranks live, and (later) its buffers.

use crate::abi::types::{ncclComm_t, ncclEpGroupConfig_t};
use crate::core::config::{EnvOverrides, GroupParams, validate_group_config};
use crate::core::error::Result;

/// How this rank reaches its peers.
#[derive(Debug)]
pub enum Membership {
    /// A rank of the caller's NCCL communicator.
    Nccl { comm: ncclComm_t, nccl_version: i32 },
    /// Rank `rank` of a local group made by `ncclEpxCreateLocalGroups`.
    Local,
}

pub struct Group {
    pub params: GroupParams,
    pub device: i32,
    pub membership: Membership,
    /// Handles created on this group and not destroyed yet.
    pub live_handles: usize,
}

impl Group {
    /// Creates this rank's group on the caller's communicator (collective in later issues).
    ///
    /// # Safety
    /// `comm` is the caller's live communicator.
    pub unsafe fn from_comm(comm: ncclComm_t, cfg: &ncclEpGroupConfig_t) -> Result<Group> {
        let nccl = crate::transport::nccl::Nccl::get()?;
        // SAFETY: the caller passes its live communicator (C contract of ncclEpCreateGroup).
        let (rank, nranks, device) = unsafe { nccl.comm_info(comm) }?;
        let params = validate_group_config(cfg, rank, nranks, 0, &EnvOverrides::from_env())?;
        crate::abi::guard::log_info(format_args!(
            "group: rank {rank}/{nranks} on device {device}, {} experts, NCCL {}",
            params.num_experts, nccl.version
        ));
        Ok(Group {
            params,
            device,
            membership: Membership::Nccl {
                comm,
                nccl_version: nccl.version,
            },
            live_handles: 0,
        })
    }

    /// The error every GPU operation returns until its issue lands.
    pub fn not_implemented(&self, what: &str) -> crate::core::error::Error {
        crate::invalid_usage!(
            "{what} is not implemented yet in this build of nccl-ep-rs ({} mode)",
            self.params.algorithm.short()
        )
    }
}
