//! Peers of an NCCL communicator: each rank all-gathers a record of its communication buffer
//! (process, host, device, address, CUDA IPC handle) over the caller's communicator, then maps
//! every peer's buffer: same process by raw pointer (peer access enabled), same host by CUDA IPC
//! (`ipc_maps`: each allocation opened once per process and device). Peers on other hosts need
//! the RDMA transport, which does not exist yet.
//!
//! A buffer must never be freed while a peer process still maps it (CUDA calls that undefined;
//! in practice the stale mapping makes the exporter's next allocation at that address fail to
//! open with CUDA_ERROR_NOT_PERMITTED). So growing is a collective protocol (`resize`): every
//! rank agrees on the new size, closes its mappings of the peers' old buffers, waits until every
//! rank has done so, and only then frees its old buffer and allocates and exchanges the new one.
//! Destroying a group does the same (`SharedBuffer::release`), as NVIDIA's group destroy is a
//! barrier too; where that barrier runs out of time (a peer died) the
//! buffer is left allocated instead of freed.

use crate::abi::types::ncclComm_t;
use crate::core::error::Result;
use crate::cuda::context::{CtxGuard, synchronize_current};
use crate::cuda::memory::{self, DeviceMem};
use crate::transport::identity;
use crate::transport::ipc_maps::{self, Exporter, MapKey};
use crate::transport::nccl::Nccl;

/// The step of a protocol a record belongs to; every all-gather here has the same size, so a
/// rank that is at another step shows up as a wrong tag instead of garbage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Phase {
    Exchange = 1,
    GrowAgree = 2,
    GrowClosed = 3,
    ReleaseClosed = 4,
}

const TAG_BASE: u32 = 0x4550_0000; // "EP"

impl Phase {
    fn tag(self) -> u32 {
        TAG_BASE | self as u32
    }
    fn name_of(tag: u32) -> &'static str {
        match tag ^ TAG_BASE {
            1 => "exchanging new buffers",
            2 => "agreeing to grow the buffer",
            3 => "growing the buffer (mappings closed)",
            4 => "destroying the group (mappings closed)",
            _ => "not in an NCCL EP buffer step (another collective on the communicator?)",
        }
    }
}

/// What one rank tells the others (fixed size, plain bytes over NCCL).
#[repr(C)]
#[derive(Clone, Copy)]
struct Record {
    tag: u32,
    pid: u32,
    device: i32,
    _pad: u32,
    host: u64,
    pidns: u64,
    ptr: u64,
    bytes: u64,
    ipc: [u8; 64],
}

const RECORD_BYTES: usize = std::mem::size_of::<Record>();

impl Record {
    /// This process's record for `phase` (buffer fields zero).
    fn mine(phase: Phase, device: i32, bytes: usize) -> Record {
        let (pid, pidns) = identity::process_id();
        Record {
            tag: phase.tag(),
            pid,
            device,
            _pad: 0,
            host: identity::host_id(),
            pidns,
            ptr: 0,
            bytes: bytes as u64,
            ipc: [0; 64],
        }
    }
    fn exporter(&self) -> Exporter {
        Exporter {
            host: self.host,
            pid: self.pid,
            pidns: self.pidns,
        }
    }
}

/// All-gathers one record per rank over `comm` on the legacy stream and waits for it.
///
/// # Safety
/// `comm` is the caller's live communicator; every rank calls this in the same order.
unsafe fn all_gather(nccl: &Nccl, comm: ncclComm_t, nranks: usize, device: i32, mine: &Record) -> Result<Vec<Record>> {
    // SAFETY: forwarded.
    unsafe { all_gather_within(nccl, comm, nranks, device, mine, None) }
}

/// [`all_gather`] that gives up after `limit` (the destroy barrier: a dead peer must not hang
/// the survivors' destroy). Giving up leaves the all-gather queued on the legacy stream and its
/// staging buffer allocated: the communicator is unusable afterwards, as after any NCCL
/// collective a peer never joined.
///
/// # Safety
/// As [`all_gather`].
unsafe fn all_gather_within(
    nccl: &Nccl,
    comm: ncclComm_t,
    nranks: usize,
    device: i32,
    mine: &Record,
    limit: Option<std::time::Duration>,
) -> Result<Vec<Record>> {
    let _g = CtxGuard::enter(device)?;
    let stage = DeviceMem::alloc(device, RECORD_BYTES * (nranks + 1))?;
    let send = stage.ptr() + (RECORD_BYTES * nranks) as u64;
    let mut all = vec![0u8; RECORD_BYTES * nranks];
    // SAFETY: the staging buffer holds nranks + 1 records; the stream 0 is the legacy stream.
    unsafe {
        memory::memcpy_htod(
            send,
            std::slice::from_raw_parts((mine as *const Record).cast::<u8>(), RECORD_BYTES),
        )?;
        nccl.all_gather_bytes(
            send as *const _,
            stage.ptr() as *mut _,
            RECORD_BYTES,
            comm,
            std::ptr::null_mut(),
        )?;
        if let Some(limit) = limit {
            let done = memory::Event::new(false)?;
            done.record(memory::Stream::LEGACY_DEFAULT)?;
            let start = std::time::Instant::now();
            while !done.query()? {
                if start.elapsed() > limit {
                    std::mem::forget(stage); // the queued all-gather still writes into it
                    return Err(crate::invalid_usage!(
                        "not every rank joined within {} ms (a peer is gone, or did not destroy the group)",
                        limit.as_millis()
                    ));
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
        memory::memcpy_dtoh(&mut all, stage.ptr())?;
    }
    Ok((0..nranks)
        // SAFETY: `all` holds nranks packed records written by the all-gather.
        .map(|r| unsafe { std::ptr::read_unaligned(all.as_ptr().add(r * RECORD_BYTES).cast::<Record>()) })
        .collect())
}

/// Fails unless every rank sent a record of `phase`.
fn check_phase(all: &[Record], phase: Phase) -> Result<()> {
    for (r, rec) in all.iter().enumerate() {
        crate::ensure_usage!(
            rec.tag == phase.tag(),
            "rank {r} is {} while this rank is {}: every rank must create handles and destroy groups \
             of the communicator in the same order",
            Phase::name_of(rec.tag),
            Phase::name_of(phase.tag())
        );
    }
    Ok(())
}

/// Buffers of other processes this rank mapped through CUDA IPC; released on drop.
#[derive(Debug, Default)]
pub struct OpenedPeers {
    keys: Vec<MapKey>,
}

impl OpenedPeers {
    /// True when every peer is in this process (nothing was opened through CUDA IPC).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Releases every mapping (the last user of a mapping closes it). Nothing of this rank may
    /// use them any more.
    fn close_all(&mut self) {
        for k in self.keys.drain(..) {
            ipc_maps::close(&k);
        }
    }
}

impl Drop for OpenedPeers {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// Exchanges buffer records over `comm` (collective) and returns every rank's buffer address
/// as seen from this rank, plus the IPC mappings to release later.
///
/// # Safety
/// `comm` is the caller's live communicator; every rank calls this in the same order.
unsafe fn exchange(
    nccl: &Nccl,
    comm: ncclComm_t,
    rank: usize,
    nranks: usize,
    device: i32,
    buf: &DeviceMem,
) -> Result<(Vec<u64>, OpenedPeers)> {
    let _g = CtxGuard::enter(device)?;
    let mut mine = Record::mine(Phase::Exchange, device, buf.len());
    mine.ptr = buf.ptr();
    mine.ipc = memory::ipc_get_mem_handle(buf.ptr())?;
    // SAFETY: forwarded from the caller.
    let all = unsafe { all_gather(nccl, comm, nranks, device, &mine) }?;
    check_phase(&all, Phase::Exchange)?;
    let mut ptrs = Vec::with_capacity(nranks);
    let mut opened = OpenedPeers::default();
    for (r, rec) in all.iter().enumerate() {
        crate::ensure_usage!(
            rec.bytes == mine.bytes,
            "rank {r} has a {} byte communication buffer, this rank {} bytes: every rank must create the same handles in the same order",
            rec.bytes,
            mine.bytes
        );
        if r == rank {
            ptrs.push(mine.ptr);
        } else if rec.host != mine.host {
            return Err(crate::invalid_usage!(
                "rank {r} is on another host: reaching it needs the RDMA transport (NCCL GIN), which this build does not have yet"
            ));
        } else if rec.exporter() == mine.exporter() {
            // This process: CUDA IPC cannot open a handle exported by its own process.
            if rec.device != device {
                crate::cuda::context::enable_peer_access(device, rec.device)?;
            }
            ptrs.push(rec.ptr);
        } else {
            let key = MapKey {
                exporter: rec.exporter(),
                device,
                handle: rec.ipc,
            };
            let p = ipc_maps::open(key, rec.ptr, rec.bytes).map_err(|e| {
                crate::invalid_usage!(
                    "cannot map rank {r}'s buffer (process {}) through CUDA IPC ({}); peers that P2P cannot reach need the RDMA transport, which this build does not have yet",
                    rec.pid,
                    e.msg
                )
            })?;
            opened.keys.push(key);
            ptrs.push(p);
        }
    }
    Ok((ptrs, opened))
}

/// One rank's communication buffer of an NCCL group and every rank's buffer as seen from here.
#[derive(Debug)]
pub struct SharedBuffer {
    /// None once freed or given up (only inside `resize` / `release`).
    buf: Option<DeviceMem>,
    device: i32,
    ptrs: Vec<u64>,
    opened: OpenedPeers,
    /// Some peer lives in another process (and may map this buffer).
    cross_process: bool,
}

impl SharedBuffer {
    pub fn len(&self) -> usize {
        self.buf.as_ref().map_or(0, |b| b.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This rank's buffer.
    pub fn ptr(&self) -> u64 {
        self.buf.as_ref().map_or(0, |b| b.ptr())
    }

    /// Every rank's buffer, as this rank addresses it.
    pub fn peers(&self) -> &[u64] {
        &self.ptrs
    }

    /// True when some peer lives in another process.
    pub fn cross_process(&self) -> bool {
        self.cross_process
    }

    /// Keeps this rank's buffer allocated for the rest of the process: a peer process may still
    /// map it.
    fn give_up_buffer(&mut self, why: &str) {
        if let Some(b) = self.buf.take() {
            crate::abi::guard::log_warn(format_args!(
                "keeping a {} byte communication buffer allocated until the process exits: {why}",
                b.len()
            ));
            std::mem::forget(b);
        }
    }

    /// Group destroy (collective when some peer lives in another process, like NVIDIA's group
    /// destroy, whose barrier every rank enters): waits for this rank's work, closes its mappings
    /// of the peers' buffers, waits until every rank has closed theirs, then frees this rank's
    /// buffer. Every rank enters the barrier whatever its mask says (ranks disagree about who is
    /// masked, and a barrier some ranks skip hangs the others); it gives up after `limit` (a
    /// peer that died never comes), keeping the buffer allocated. Never fails: problems are
    /// logged.
    ///
    /// # Safety
    /// `comm` is the group's live communicator.
    pub unsafe fn release(mut self, comm: ncclComm_t, nranks: usize, limit: std::time::Duration) {
        let device = self.device;
        let idle = CtxGuard::enter(device).and_then(|_g| synchronize_current());
        self.opened.close_all();
        if !self.cross_process {
            return; // drop frees it: no other process maps it
        }
        let why = match idle {
            Err(e) => Some(format!("the device did not synchronise ({})", e.msg)),
            Ok(()) => {
                let barrier = Nccl::get().and_then(|nccl| {
                    let mine = Record::mine(Phase::ReleaseClosed, device, self.len());
                    // SAFETY: the caller's communicator.
                    let all = unsafe { all_gather_within(nccl, comm, nranks, device, &mine, Some(limit)) }?;
                    check_phase(&all, Phase::ReleaseClosed)
                });
                barrier.err().map(|e| format!("the destroy barrier failed: {}", e.msg))
            }
        };
        match why {
            Some(why) => self.give_up_buffer(&why),
            None => drop(self.buf.take()),
        }
    }
}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        self.opened.close_all();
        if self.cross_process {
            // Not released collectively (an error path): peers may still map it.
            self.give_up_buffer("the group was dropped without the destroy barrier");
        }
    }
}

/// Allocates this rank's zeroed buffer of `bytes` on `device` and maps every rank's (collective).
///
/// # Safety
/// `comm` is the caller's live communicator.
unsafe fn allocate(comm: ncclComm_t, rank: usize, nranks: usize, device: i32, bytes: usize) -> Result<SharedBuffer> {
    let buf = DeviceMem::alloc(device, bytes)?;
    {
        let _g = CtxGuard::enter(device)?;
        // SAFETY: the buffer holds `bytes`; zero flags are never a valid tag.
        unsafe { memory::memset_d8_async(buf.ptr(), 0, bytes, memory::Stream::LEGACY_DEFAULT)? };
        memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
    }
    let nccl = Nccl::get()?;
    // SAFETY: forwarded from the caller.
    let (ptrs, opened) = match unsafe { exchange(nccl, comm, rank, nranks, device, &buf) } {
        Ok(x) => x,
        Err(e) => {
            // Peers that got past the all-gather may have mapped it: never free it.
            crate::abi::guard::log_warn(format_args!(
                "keeping a {bytes} byte communication buffer allocated until the process exits: its exchange failed"
            ));
            std::mem::forget(buf);
            return Err(e);
        }
    };
    Ok(SharedBuffer {
        cross_process: !opened.is_empty(),
        buf: Some(buf),
        device,
        ptrs,
        opened,
    })
}

/// Gives this rank a zeroed buffer of `bytes` in `slot` and maps every rank's (collective:
/// every rank calls it in the same order with the same size). An existing buffer is replaced
/// by the growth protocol:
///   (a) every rank waits for its work and all-gathers the size it wants: all agree, or all
///       fail with the old buffers untouched;
///   (b) every rank closes its mappings of the peers' old buffers;
///   (c) a second all-gather: past it, no rank maps any old buffer;
///   (d) every rank frees its old buffer, allocates the new one and exchanges it.
///
/// If (c) fails the old buffer stays allocated (a peer may still map it) and `slot` is empty.
///
/// # Safety
/// `comm` is the caller's live communicator; no operation of the group is in flight.
pub unsafe fn resize(
    slot: &mut Option<SharedBuffer>,
    comm: ncclComm_t,
    rank: usize,
    nranks: usize,
    device: i32,
    bytes: usize,
) -> Result<()> {
    if let Some(old) = slot.as_mut() {
        let nccl = Nccl::get()?;
        {
            let _g = CtxGuard::enter(device)?;
            // This rank's kernels read and write the peers' buffers.
            synchronize_current()?;
        }
        let mine = Record::mine(Phase::GrowAgree, device, bytes);
        // SAFETY: forwarded from the caller.
        let all = unsafe { all_gather(nccl, comm, nranks, device, &mine) }?;
        check_phase(&all, Phase::GrowAgree)?;
        for (r, rec) in all.iter().enumerate() {
            crate::ensure_usage!(
                rec.bytes == mine.bytes,
                "rank {r} grows its communication buffer to {} bytes, this rank to {}: every rank must create the same handles in the same order",
                rec.bytes,
                mine.bytes
            );
        }
        old.opened.close_all();
        let mine = Record::mine(Phase::GrowClosed, device, bytes);
        // SAFETY: forwarded from the caller.
        let closed = unsafe { all_gather(nccl, comm, nranks, device, &mine) }
            .and_then(|all| check_phase(&all, Phase::GrowClosed));
        let mut old = slot.take().expect("checked above");
        if let Err(e) = closed {
            old.give_up_buffer("growing it failed before every rank had closed its mappings");
            return Err(e);
        }
        // Nobody maps it any more: free it before allocating the larger one.
        drop(old.buf.take());
    }
    // SAFETY: forwarded from the caller.
    *slot = Some(unsafe { allocate(comm, rank, nranks, device, bytes) }?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_plain_and_tagged() {
        assert_eq!(RECORD_BYTES, 112, "one size for every collective of this module");
        let r = Record::mine(Phase::GrowAgree, 3, 4096);
        assert_eq!((r.tag, r.device, r.bytes, r.ptr), (0x4550_0002, 3, 4096, 0));
        assert_eq!(r.exporter(), Record::mine(Phase::Exchange, 0, 0).exporter());
        let mut all = vec![r; 3];
        assert!(check_phase(&all, Phase::GrowAgree).is_ok());
        all[2].tag = Phase::ReleaseClosed.tag();
        let e = check_phase(&all, Phase::GrowAgree).unwrap_err();
        assert!(
            e.msg.contains("rank 2 is destroying the group") && e.msg.contains("agreeing to grow"),
            "{}",
            e.msg
        );
        all[2].tag = 7;
        let e = check_phase(&all, Phase::GrowAgree).unwrap_err();
        assert!(e.msg.contains("another collective"), "{}", e.msg);
    }
}
