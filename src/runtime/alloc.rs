//! Device memory that belongs to a group: from the caller's allocator when the config has one
//! (for everything not shared with peers), else from the driver.

use crate::abi::types::ncclEpAllocConfig_t;
use crate::core::error::{Error, ErrorKind, Result};
use crate::cuda::context::CtxGuard;
use crate::cuda::memory::DeviceMem;
use std::ffi::c_void;

/// The caller's allocator callbacks (both set, checked at group creation).
#[derive(Clone, Copy, Debug)]
pub struct CustomAlloc {
    pub cfg: ncclEpAllocConfig_t,
}

// SAFETY: the callbacks and their context are the caller's, who promises they may be called from
// any thread that uses the group.
unsafe impl Send for CustomAlloc {}
unsafe impl Sync for CustomAlloc {}

/// One block of group-private device memory.
#[derive(Debug)]
pub enum GroupMem {
    Driver(DeviceMem),
    Custom {
        ptr: u64,
        bytes: usize,
        device: i32,
        alloc: CustomAlloc,
    },
}

impl GroupMem {
    /// Allocates `bytes` on `device` (not cleared).
    pub fn alloc(device: i32, bytes: usize, custom: Option<CustomAlloc>) -> Result<GroupMem> {
        let Some(a) = custom else {
            return Ok(GroupMem::Driver(DeviceMem::alloc(device, bytes)?));
        };
        let f = a
            .cfg
            .alloc_fn
            .ok_or_else(|| crate::internal_err!("custom allocator without alloc_fn"))?;
        let _g = CtxGuard::enter(device)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: the caller's callback, called as its typedef documents.
        let r = unsafe { f(&mut p, bytes, a.cfg.context) };
        if r != 0 || p.is_null() {
            return Err(Error::new(
                ErrorKind::Cuda,
                format!("config->alloc.alloc_fn failed for {bytes} bytes (cudaError_t {r})"),
            ));
        }
        Ok(GroupMem::Custom {
            ptr: p as u64,
            bytes,
            device,
            alloc: a,
        })
    }

    pub fn ptr(&self) -> u64 {
        match self {
            GroupMem::Driver(m) => m.ptr(),
            GroupMem::Custom { ptr, .. } => *ptr,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            GroupMem::Driver(m) => m.len(),
            GroupMem::Custom { bytes, .. } => *bytes,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for GroupMem {
    fn drop(&mut self) {
        if let GroupMem::Custom { ptr, device, alloc, .. } = self
            && let Some(f) = alloc.cfg.free_fn
            && let Ok(_g) = CtxGuard::enter(*device)
        {
            // SAFETY: frees what the matching alloc_fn returned.
            unsafe { f(*ptr as *mut c_void, alloc.cfg.context) };
        }
    }
}
