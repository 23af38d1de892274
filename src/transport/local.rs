//! Local groups: N ranks in this process (on one GPU or several), no communicator. Each rank
//! publishes its communication buffer here; kernels get the addresses at launch.

use crate::core::error::Result;
use std::sync::Mutex;

/// What the ranks of one local group share.
#[derive(Debug)]
pub struct LocalWorld {
    /// CUDA device of each rank.
    pub devices: Vec<i32>,
    /// Communication buffer (address, bytes) of each rank; (0, 0) until it has one.
    buffers: Mutex<Vec<(u64, usize)>>,
}

impl LocalWorld {
    pub fn new(devices: Vec<i32>) -> Self {
        let n = devices.len();
        Self {
            devices,
            buffers: Mutex::new(vec![(0, 0); n]),
        }
    }

    pub fn nranks(&self) -> usize {
        self.devices.len()
    }

    /// Ranks of this group that share `device` (their kernels must fit on it together).
    pub fn ranks_on(&self, device: i32) -> usize {
        self.devices.iter().filter(|&&d| d == device).count()
    }

    pub fn publish(&self, rank: usize, ptr: u64, bytes: usize) {
        self.buffers.lock().unwrap_or_else(|p| p.into_inner())[rank] = (ptr, bytes);
    }

    /// Every rank's buffer, each at least `need` bytes, or a message naming the rank that lacks it.
    pub fn peers(&self, need: usize) -> Result<Vec<u64>> {
        let b = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
        for (r, &(ptr, bytes)) in b.iter().enumerate() {
            crate::ensure_usage!(
                ptr != 0 && bytes >= need,
                "local rank {r} has no communication buffer of {need} bytes yet: create the handle on every rank \
                 (ncclEpInitHandle/ncclEpCreateHandle) before the first dispatch"
            );
        }
        Ok(b.iter().map(|&(p, _)| p).collect())
    }
}
