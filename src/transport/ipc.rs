//! Peers of an NCCL communicator: each rank all-gathers a record of its communication buffer
//! (process, host, device, address, CUDA IPC handle) over the caller's communicator, then maps
//! every peer's buffer: same process by raw pointer (peer access enabled), same host by CUDA IPC
//! (`ipc_maps`: each allocation opened once per process and device). Ranks in the `remote` mask
//! (docs/MULTINODE.md: other nodes, reached through NCCL point-to-point and staging) are neither
//! mapped nor part of the destroy barrier; their address here is 0.
//!
//! A buffer must never be freed while a peer process still maps it (CUDA calls that undefined;
//! in practice the stale mapping makes the exporter's next allocation at that address fail to
//! open with CUDA_ERROR_NOT_PERMITTED). So growing is a collective protocol (`resize`): every
//! rank agrees on the new size, closes its mappings of the peers' old buffers, waits until every
//! rank has done so, and only then frees its old buffer and allocates and exchanges the new one.
//! Destroying a group does the same (`SharedBuffer::release`), as NVIDIA's group destroy is a
//! barrier too; where that barrier runs out of time (a peer died) the
//! buffer is left allocated instead of freed.

use crate::cuda::context::{CtxGuard, synchronize_current};
use crate::cuda::memory::{self, DeviceMem};
use crate::sys::ncclComm_t;
use crate::transport::identity;
use crate::transport::ipc_maps::{self, Exporter, MapKey};
use crate::transport::nccl::Nccl;
use ep_core::error::Result;

/// The step of a protocol a record belongs to; every all-gather here has the same size, so a
/// rank that is at another step shows up as a wrong tag instead of garbage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Phase {
    Exchange = 1,
    GrowAgree = 2,
    GrowClosed = 3,
    Hosts = 4,
}

const TAG_BASE: u32 = 0x4550_0000; // "EP"

/// Bytes past the layouts' part of every shared buffer: one u32 "this rank destroys the group"
/// flag per rank (at most 64 ranks), written by the peers through their mappings.
const DESTROY_TAIL: usize = 256;
const DESTROY_TAG: u32 = TAG_BASE | 0xd0;

impl Phase {
    fn tag(self) -> u32 {
        TAG_BASE | self as u32
    }
    fn name_of(tag: u32) -> &'static str {
        match tag ^ TAG_BASE {
            1 => "exchanging new buffers",
            2 => "agreeing to grow the buffer",
            3 => "growing the buffer (mappings closed)",
            4 => "creating a group (finding every rank's host)",
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
    let _g = CtxGuard::enter(device)?;
    let stage = DeviceMem::alloc(device, RECORD_BYTES * (nranks + 1))?;
    let send = stage.ptr() + (RECORD_BYTES * nranks) as u64;
    let mut all = vec![0u8; RECORD_BYTES * nranks];
    // SAFETY: `Record` is repr(C) with explicit padding, so its RECORD_BYTES are initialised
    // bytes; `send` is the last of the nranks + 1 record slots of the live staging buffer and
    // `stage.ptr()` holds the nranks records the all-gather writes; `comm` is live and every rank
    // joins (this function's contract); stream null is the legacy stream, which orders the
    // blocking copies around the all-gather, synchronised before `all` is read back.
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
        memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
        memory::memcpy_dtoh(&mut all, stage.ptr())?;
    }
    Ok((0..nranks)
        // SAFETY: `all` holds nranks packed records (read unaligned), and every bit pattern is a
        // valid `Record` (integers and bytes only).
        .map(|r| unsafe { std::ptr::read_unaligned(all.as_ptr().add(r * RECORD_BYTES).cast::<Record>()) })
        .collect())
}

/// Every rank's host ([`identity::host_id`]), all-gathered over `comm` and waited for: group
/// creation decides from it which ranks are on other hosts (docs/MULTINODE.md, "Who is remote").
///
/// # Safety
/// `comm` is the caller's live communicator; every rank calls this in the same order.
pub unsafe fn host_ids(nccl: &Nccl, comm: ncclComm_t, nranks: usize, device: i32) -> Result<Vec<u64>> {
    let mine = Record::mine(Phase::Hosts, device, 0);
    // SAFETY: all_gather's contract is this function's (live communicator, same order).
    let all = unsafe { all_gather(nccl, comm, nranks, device, &mine) }?;
    check_phase(&all, Phase::Hosts)?;
    Ok(all.iter().map(|r| r.host).collect())
}

/// Fails unless every rank sent a record of `phase`.
fn check_phase(all: &[Record], phase: Phase) -> Result<()> {
    for (r, rec) in all.iter().enumerate() {
        ep_core::ensure_usage!(
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
/// as seen from this rank (0 for the ranks in `remote`, which are not mapped), plus the IPC
/// mappings to release later.
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
    remote: u64,
) -> Result<(Vec<u64>, OpenedPeers)> {
    let _g = CtxGuard::enter(device)?;
    let mut mine = Record::mine(Phase::Exchange, device, buf.len());
    mine.ptr = buf.ptr();
    mine.ipc = memory::ipc_get_mem_handle(buf.ptr())?;
    // SAFETY: all_gather's contract is this function's (live communicator, same order).
    let all = unsafe { all_gather(nccl, comm, nranks, device, &mine) }?;
    check_phase(&all, Phase::Exchange)?;
    let mut ptrs = Vec::with_capacity(nranks);
    let mut opened = OpenedPeers::default();
    for (r, rec) in all.iter().enumerate() {
        ep_core::ensure_usage!(
            rec.bytes == mine.bytes,
            "rank {r} has a {} byte communication buffer, this rank {} bytes: every rank must create the same handles in the same order",
            rec.bytes,
            mine.bytes
        );
        if r == rank {
            ptrs.push(mine.ptr);
        } else if ep_core::rank_set::contains(remote, r) {
            ptrs.push(0);
        } else if rec.host != mine.host {
            return Err(ep_core::invalid_usage!(
                "rank {r} is on another host but NCCL_EP_NODE_SIZE puts it in this rank's node: unset the variable \
                 (ranks on other hosts are then found by their host) or set it to the ranks per host, ranks laid out \
                 host by host (docs/MULTINODE.md)"
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
                ep_core::invalid_usage!(
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
    /// Bytes the layouts may use; the allocation has [`DESTROY_TAIL`] more.
    usable: usize,
    device: i32,
    rank: usize,
    ptrs: Vec<u64>,
    opened: OpenedPeers,
    /// Some peer lives in another process (and may map this buffer).
    cross_process: bool,
    /// Ranks not mapped (bit r; other nodes): left out of the destroy barrier.
    remote: u64,
}

impl SharedBuffer {
    pub fn len(&self) -> usize {
        if self.buf.is_some() { self.usable } else { 0 }
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
            crate::log::log_warn(format_args!(
                "keeping a {} byte communication buffer allocated until the process exits: {why}",
                b.len()
            ));
            std::mem::forget(b);
        }
    }

    /// Group destroy (collective when some peer lives in another process, like NVIDIA's group
    /// destroy, whose barrier every rank enters): waits for this rank's work, tells every rank
    /// that it is leaving (a flag in each rank's buffer tail, written through the mappings),
    /// waits up to `limit` for every rank's flag in its own tail, then closes its mappings and
    /// frees its buffer. No NCCL call: a peer that died must not hang the survivors (a
    /// collective it never joins would spin on the GPU for good and block their exit); after
    /// `limit` the buffer is kept allocated instead. Every rank takes the same path whatever its
    /// mask says (ranks disagree about who is masked). Never fails: problems are logged.
    pub fn release(mut self, limit: std::time::Duration) {
        let device = self.device;
        let Ok(_g) = CtxGuard::enter(device) else {
            return self.give_up_buffer("the device context could not be entered");
        };
        if let Err(e) = synchronize_current() {
            return self.give_up_buffer(&format!("the device did not synchronise ({})", e.msg));
        }
        if !self.cross_process {
            self.opened.close_all();
            return; // drop frees it: no other process maps it
        }
        let nranks = self.ptrs.len();
        let slot = |base: u64, r: usize| base + (self.usable + 4 * r) as u64;
        // Remote ranks (address 0) never map this buffer: no flag to or from them.
        let remote = self.remote;
        let mapped = |r: usize| !ep_core::rank_set::contains(remote, r);
        for &peer in self.ptrs.iter().filter(|&&p| p != 0) {
            // SAFETY: every rank's allocation has the DESTROY_TAIL bytes after `usable`, and
            // slot(_, rank) lies in them as nranks <= DESTROY_TAIL / 4 (allocate checks it);
            // `peer` is this rank's own buffer or a mapping kept until close_all below. A write
            // to a dead peer's buffer is harmless (the mapping keeps the memory alive).
            let _ = unsafe { memory::memcpy_htod(slot(peer, self.rank), &DESTROY_TAG.to_ne_bytes()) };
        }
        let own = self.ptr();
        let start = std::time::Instant::now();
        let mut seen = vec![0u32; nranks];
        let arrived = loop {
            // SAFETY: the tail of this rank's own live allocation holds the nranks u32 slots
            // (nranks <= DESTROY_TAIL / 4, checked by allocate); any bits are a valid u32.
            let read = unsafe { memory::memcpy_dtoh(&mut seen, slot(own, 0)) };
            if read.is_err() || (0..nranks).all(|r| !mapped(r) || seen[r] == DESTROY_TAG) {
                break read.is_ok();
            }
            if start.elapsed() > limit {
                break false;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        };
        self.opened.close_all();
        if arrived {
            drop(self.buf.take());
        } else {
            let missing: Vec<usize> = (0..nranks).filter(|&r| mapped(r) && seen[r] != DESTROY_TAG).collect();
            self.give_up_buffer(&format!(
                "ranks {missing:?} did not destroy the group within {} ms (gone, or destroying later)",
                limit.as_millis()
            ));
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
unsafe fn allocate(
    comm: ncclComm_t,
    rank: usize,
    nranks: usize,
    device: i32,
    bytes: usize,
    remote: u64,
) -> Result<SharedBuffer> {
    // Both group kinds cap the ranks at 64, which the destroy flags rely on.
    if nranks > DESTROY_TAIL / 4 {
        return Err(ep_core::internal_err!(
            "{nranks} ranks do not fit the {DESTROY_TAIL} byte destroy tail"
        ));
    }
    let buf = DeviceMem::alloc(device, bytes + DESTROY_TAIL)?;
    {
        let _g = CtxGuard::enter(device)?;
        // SAFETY: the live buffer holds `bytes` + the tail, its device's context is current and
        // the legacy stream is always valid. Zero flags are never a valid tag.
        unsafe { memory::memset_d8_async(buf.ptr(), 0, bytes + DESTROY_TAIL, memory::Stream::LEGACY_DEFAULT)? };
        memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
    }
    let nccl = Nccl::get()?;
    // SAFETY: exchange's contract is this function's (live communicator; every rank calls
    // collectively in the same order, as the callers of resize promise).
    let (ptrs, opened) = match unsafe { exchange(nccl, comm, rank, nranks, device, &buf, remote) } {
        Ok(x) => x,
        Err(e) => {
            // Peers that got past the all-gather may have mapped it: never free it.
            crate::log::log_warn(format_args!(
                "keeping a {bytes} byte communication buffer allocated until the process exits: its exchange failed"
            ));
            std::mem::forget(buf);
            return Err(e);
        }
    };
    Ok(SharedBuffer {
        cross_process: !opened.is_empty(),
        buf: Some(buf),
        usable: bytes,
        device,
        rank,
        ptrs,
        opened,
        remote,
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
/// Ranks in `remote` are not mapped (docs/MULTINODE.md).
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
    remote: u64,
) -> Result<()> {
    if let Some(old) = slot.as_mut() {
        let nccl = Nccl::get()?;
        {
            let _g = CtxGuard::enter(device)?;
            // This rank's kernels read and write the peers' buffers.
            synchronize_current()?;
        }
        let mine = Record::mine(Phase::GrowAgree, device, bytes);
        // SAFETY: all_gather's contract is this function's (live communicator, same order).
        let all = unsafe { all_gather(nccl, comm, nranks, device, &mine) }?;
        check_phase(&all, Phase::GrowAgree)?;
        for (r, rec) in all.iter().enumerate() {
            ep_core::ensure_usage!(
                rec.bytes == mine.bytes,
                "rank {r} grows its communication buffer to {} bytes, this rank to {}: every rank must create the same handles in the same order",
                rec.bytes,
                mine.bytes
            );
        }
        old.opened.close_all();
        let mine = Record::mine(Phase::GrowClosed, device, bytes);
        // SAFETY: as for the first all-gather.
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
    // SAFETY: allocate's contract (a live communicator) is part of this function's.
    *slot = Some(unsafe { allocate(comm, rank, nranks, device, bytes, remote) }?);
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
        all[2].tag = Phase::GrowClosed.tag();
        let e = check_phase(&all, Phase::GrowAgree).unwrap_err();
        assert!(
            e.msg.contains("rank 2 is growing the buffer") && e.msg.contains("agreeing to grow"),
            "{}",
            e.msg
        );
        all[2].tag = 7;
        let e = check_phase(&all, Phase::GrowAgree).unwrap_err();
        assert!(e.msg.contains("another collective"), "{}", e.msg);
    }
}
