//! Local groups: N ranks in this process (on one GPU or several), no communicator. The world
//! owns every rank's communication buffer, so that whichever rank's thread sizes them first
//! sizes them all: ranks may be driven by one thread or by one thread each.

use crate::cuda::memory::{self, DeviceMem};
use ep_core::error::Result;
use parking_lot::{Mutex, MutexGuard};

/// What the ranks of one local group share.
#[derive(Debug)]
pub struct LocalWorld {
    /// CUDA device of each rank.
    pub devices: Vec<i32>,
    /// Communication buffer of each rank (all allocated together, all the same size).
    buffers: Mutex<Vec<DeviceMem>>,
}

impl LocalWorld {
    pub fn new(devices: Vec<i32>) -> Self {
        Self {
            devices,
            buffers: Mutex::new(Vec::new()),
        }
    }

    pub fn nranks(&self) -> usize {
        self.devices.len()
    }

    /// Ranks of this group that share `device` (their kernels must fit on it together).
    pub fn ranks_on(&self, device: i32) -> usize {
        self.devices.iter().filter(|&&d| d == device).count()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<DeviceMem>> {
        self.buffers.lock()
    }

    /// Bytes of each rank's buffer (0 before the first handle).
    pub fn buffer_bytes(&self) -> usize {
        self.lock().first().map_or(0, |b| b.len())
    }

    /// Gives every rank a zeroed buffer of `bytes` unless they already have one at least that
    /// large. Growing frees the old buffers once every device of the group is idle (handles are
    /// created collectively, so no operation of the group is in flight).
    pub fn ensure(&self, bytes: usize) -> Result<()> {
        let mut bufs = self.lock();
        if bufs.first().is_some_and(|b| b.len() >= bytes) {
            return Ok(());
        }
        if !bufs.is_empty() {
            for &d in &self.devices {
                let _g = crate::cuda::context::CtxGuard::enter(d)?;
                crate::cuda::context::synchronize_current()?;
            }
            bufs.clear();
        }
        let mut fresh = Vec::with_capacity(self.devices.len());
        for &d in &self.devices {
            let b = DeviceMem::alloc(d, bytes)?;
            let _g = crate::cuda::context::CtxGuard::enter(d)?;
            // SAFETY: the live buffer holds `bytes`, its device's context is current and the
            // legacy stream is always valid. Zero flags are never a valid tag.
            unsafe { memory::memset_d8_async(b.ptr(), 0, bytes, memory::Stream::LEGACY_DEFAULT)? };
            memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
            fresh.push(b);
        }
        *bufs = fresh;
        Ok(())
    }

    /// Rank `rank`'s buffer (0 before the first handle).
    pub fn buffer_ptr(&self, rank: usize) -> u64 {
        self.lock().get(rank).map_or(0, |b| b.ptr())
    }

    /// Every rank's buffer address and their common size, which must be at least `need`.
    pub fn peers(&self, need: usize) -> Result<(Vec<u64>, usize)> {
        let bufs = self.lock();
        let bytes = bufs.first().map_or(0, |b| b.len());
        ep_core::ensure_usage!(
            bytes >= need,
            "the local group has no communication buffer of {need} bytes yet: create the handle \
             (ncclEpInitHandle/ncclEpCreateHandle) before the first dispatch"
        );
        Ok((bufs.iter().map(|b| b.ptr()).collect(), bytes))
    }
}
