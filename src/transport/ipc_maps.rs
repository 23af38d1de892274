//! The CUDA IPC mappings this process holds: one per (exporting process, exported allocation,
//! importing device), counted, so that no allocation is ever opened twice in one context.
//!
//! Why: several ranks of one process (or several groups) can map the same peer allocation, and
//! drivers have answered a second `cuIpcOpenMemHandle` of one handle either with the same
//! pointer or with an error. And a mapping that outlives its allocation blocks the exporter's
//! next allocation at the same address (`cuIpcOpenMemHandle` then fails, seen as
//! CUDA_ERROR_NOT_PERMITTED): with every mapping recorded here, such an overlap is reported as
//! what it is before CUDA is asked.

use crate::cuda::memory::{self, IpcMemHandle};
use ep_core::error::Result;
use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::OnceLock;

/// A process of some host (see `transport::identity`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Exporter {
    pub host: u64,
    pub pid: u32,
    pub pidns: u64,
}

/// One exported allocation as mapped into one device's context of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MapKey {
    pub exporter: Exporter,
    /// The importing device (its primary context).
    pub device: i32,
    pub handle: IpcMemHandle,
}

#[derive(Clone, Copy, Debug)]
struct Mapping {
    ptr: u64,
    refs: usize,
    /// The allocation's address range in the exporting process.
    base: u64,
    bytes: u64,
}

/// The mappings, with the opening and closing left to the caller's functions (tests fake them).
#[derive(Debug, Default)]
pub struct Maps {
    m: HashMap<MapKey, Mapping>,
}

impl Maps {
    /// The mapping of `key` (exported as `[base, base + bytes)` by its process): the existing
    /// one with one more reference, else a new one from `open`.
    pub fn acquire(&mut self, key: MapKey, base: u64, bytes: u64, open: impl FnOnce() -> Result<u64>) -> Result<u64> {
        if let Some(m) = self.m.get_mut(&key) {
            m.refs += 1;
            return Ok(m.ptr);
        }
        // One process cannot have two live allocations that overlap: an older mapping whose
        // range overlaps this one maps memory its process has freed.
        if let Some((_, old)) = self.m.iter().find(|(k, m)| {
            k.exporter == key.exporter && k.device == key.device && m.base < base + bytes && base < m.base + m.bytes
        }) {
            return Err(ep_core::internal_err!(
                "process {} exported a new buffer at {base:#x} (+{bytes} bytes) over an older one \
                 ({:#x}, +{} bytes) that this process still maps ({} reference(s)): it freed memory \
                 another process still mapped; groups must be grown and destroyed by every rank in \
                 the same order",
                key.exporter.pid,
                old.base,
                old.bytes,
                old.refs
            ));
        }
        let ptr = open()?;
        self.m.insert(
            key,
            Mapping {
                ptr,
                refs: 1,
                base,
                bytes,
            },
        );
        Ok(ptr)
    }

    /// Drops one reference of `key`; the last one closes the mapping with `close`.
    pub fn release(&mut self, key: &MapKey, close: impl FnOnce(u64)) {
        let Some(m) = self.m.get_mut(key) else {
            return;
        };
        m.refs -= 1;
        if m.refs == 0 {
            let ptr = m.ptr;
            self.m.remove(key);
            close(ptr);
        }
    }

    pub fn len(&self) -> usize {
        self.m.len()
    }

    pub fn is_empty(&self) -> bool {
        self.m.is_empty()
    }
}

fn maps() -> MutexGuard<'static, Maps> {
    static M: OnceLock<Mutex<Maps>> = OnceLock::new();
    M.get_or_init(Default::default).lock()
}

/// Maps `key` into the current context (which must be `key.device`'s primary context).
pub fn open(key: MapKey, base: u64, bytes: u64) -> Result<u64> {
    maps().acquire(key, base, bytes, || memory::ipc_open_mem_handle(&key.handle))
}

/// Releases one reference taken by [`open`]; the last one closes the mapping in `key.device`'s
/// primary context. Nothing may use the mapping any more.
pub fn close(key: &MapKey) {
    maps().release(key, |ptr| {
        let r = crate::cuda::context::CtxGuard::enter(key.device).and_then(|_g| {
            // SAFETY: ptr came from ipc_open_mem_handle in this device's primary context and
            // this was its last reference.
            unsafe { memory::ipc_close_mem_handle(ptr) }
        });
        if let Err(e) = r {
            crate::log::log_warn(format_args!(
                "closing the CUDA IPC mapping {ptr:#x} of process {}: {}",
                key.exporter.pid, e.msg
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: u32, device: i32, h: u8) -> MapKey {
        let mut handle = [0u8; 64];
        handle[0] = h;
        MapKey {
            exporter: Exporter { host: 7, pid, pidns: 1 },
            device,
            handle,
        }
    }

    #[test]
    fn opened_once_closed_once() {
        let mut m = Maps::default();
        let opens = std::cell::Cell::new(0);
        let open = |p: u64| {
            let opens = &opens;
            move || {
                opens.set(opens.get() + 1);
                Ok(p)
            }
        };
        assert_eq!(m.acquire(key(1, 0, 1), 0x1000, 0x100, open(0xa000)).unwrap(), 0xa000);
        // The same allocation again (another rank or group of this process): the same pointer.
        assert_eq!(m.acquire(key(1, 0, 1), 0x1000, 0x100, open(0xb000)).unwrap(), 0xa000);
        // Another importing device maps it on its own.
        assert_eq!(m.acquire(key(1, 1, 1), 0x1000, 0x100, open(0xc000)).unwrap(), 0xc000);
        assert_eq!(opens.get(), 2);
        let mut closed = Vec::new();
        m.release(&key(1, 0, 1), |p| closed.push(p));
        assert!(closed.is_empty(), "one reference left");
        m.release(&key(1, 0, 1), |p| closed.push(p));
        m.release(&key(1, 1, 1), |p| closed.push(p));
        assert_eq!(closed, vec![0xa000, 0xc000]);
        m.release(&key(1, 0, 1), |p| closed.push(p));
        assert_eq!(closed.len(), 2, "releasing an unknown key does nothing");
        assert!(m.is_empty());
    }

    #[test]
    fn stale_overlap_is_reported_before_cuda() {
        let mut m = Maps::default();
        m.acquire(key(1, 0, 1), 0x10_0000, 0x1000, || Ok(0xa000)).unwrap();
        // The same process re-exports an overlapping range under a new handle: the old one was
        // freed while still mapped here.
        let e = m
            .acquire(key(1, 0, 2), 0x10_0800, 0x1000, || panic!("must not open"))
            .unwrap_err();
        assert!(e.msg.contains("still maps"), "{}", e.msg);
        // Other processes, other devices and disjoint ranges are fine.
        m.acquire(key(2, 0, 2), 0x10_0800, 0x1000, || Ok(0xb000)).unwrap();
        m.acquire(key(1, 1, 2), 0x10_0800, 0x1000, || Ok(0xc000)).unwrap();
        m.acquire(key(1, 0, 3), 0x10_1000, 0x1000, || Ok(0xd000)).unwrap();
        // Once the old mapping is closed, the new one opens.
        m.release(&key(1, 0, 1), |_| {});
        assert_eq!(
            m.acquire(key(1, 0, 2), 0x10_0000, 0x800, || Ok(0xe000)).unwrap(),
            0xe000
        );
        assert_eq!(m.len(), 4);
    }

    #[test]
    fn failed_open_records_nothing() {
        let mut m = Maps::default();
        assert!(
            m.acquire(key(1, 0, 1), 0, 16, || Err(ep_core::internal_err!("no")))
                .is_err()
        );
        assert!(m.is_empty());
    }
}
