//! Device memory that belongs to a group: from the caller's allocator when the config has one
//! (for everything not shared with peers), else from the driver.

use crate::cuda::context::CtxGuard;
use crate::cuda::memory::DeviceMem;
use ep_core::error::{Error, ErrorKind, Result};
use std::ffi::c_void;

/// `ncclEpAllocFn_t`: allocates `size` bytes of device memory into `*ptr`, returns a CUDA error.
pub type AllocFn = unsafe extern "C" fn(ptr: *mut *mut c_void, size: usize, context: *mut c_void) -> i32;
/// `ncclEpFreeFn_t`: frees memory the matching [`AllocFn`] returned.
pub type FreeFn = unsafe extern "C" fn(ptr: *mut c_void, context: *mut c_void) -> i32;

/// The caller's allocator callbacks (both set: checked at group creation).
#[derive(Clone, Copy, Debug)]
pub struct CustomAlloc {
    pub alloc_fn: AllocFn,
    pub free_fn: FreeFn,
    pub context: *mut c_void,
}

// SAFETY: the callbacks and their context are the caller's, who promises they may be called from
// any thread that uses the group.
unsafe impl Send for CustomAlloc {}
// SAFETY: as for Send: the value is two function pointers and an opaque context, never written.
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
        let f = a.alloc_fn;
        let _g = CtxGuard::enter(device)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: the caller's callback, called as its typedef documents.
        let r = unsafe { f(&mut p, bytes, a.context) };
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
            && let Ok(_g) = CtxGuard::enter(*device)
        {
            // SAFETY: frees what the matching alloc_fn returned.
            unsafe { (alloc.free_fn)(*ptr as *mut c_void, alloc.context) };
        }
    }
}
