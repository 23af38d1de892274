//! Peers of an NCCL communicator: each rank all-gathers a record of its communication buffer
//! (process, host, device, address, CUDA IPC handle) over the caller's communicator, then maps
//! every peer's buffer: same process by raw pointer (peer access enabled), same host by CUDA IPC.
//! Peers on other hosts need the RDMA transport, which does not exist yet.

use crate::abi::types::ncclComm_t;
use crate::core::error::Result;
use crate::cuda::memory::{self, DeviceMem};
use crate::transport::nccl::Nccl;

/// What one rank tells the others about its buffer (fixed size, plain bytes over NCCL).
#[repr(C)]
#[derive(Clone, Copy)]
struct PeerRecord {
    pid: u32,
    device: i32,
    host: u64,
    ptr: u64,
    bytes: u64,
    ipc: [u8; 64],
}

const RECORD_BYTES: usize = std::mem::size_of::<PeerRecord>();

fn host_id() -> u64 {
    let mut name = [0u8; 256];
    // SAFETY: gethostname writes at most len bytes.
    unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    // FNV-1a: stable across processes (std's hasher is randomly keyed).
    name.iter()
        .take_while(|&&c| c != 0)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &c| {
            (h ^ c as u64).wrapping_mul(0x100_0000_01b3)
        })
}

/// Buffers of other processes opened through CUDA IPC; closed on drop.
#[derive(Debug, Default)]
pub struct OpenedPeers {
    device: i32,
    ptrs: Vec<u64>,
}

impl OpenedPeers {
    /// True when every peer is in this process (nothing was opened through CUDA IPC).
    pub fn is_empty(&self) -> bool {
        self.ptrs.is_empty()
    }
}

impl Drop for OpenedPeers {
    fn drop(&mut self) {
        if self.ptrs.is_empty() {
            return;
        }
        if let Ok(_g) = crate::cuda::context::CtxGuard::enter(self.device) {
            for &p in &self.ptrs {
                // SAFETY: p came from ipc_open_mem_handle and is closed once.
                let _ = unsafe { memory::ipc_close_mem_handle(p) };
            }
        }
    }
}

/// Exchanges buffer records over `comm` (collective) and returns every rank's buffer address
/// as seen from this rank, plus the IPC mappings to close later.
///
/// # Safety
/// `comm` is the caller's live communicator; every rank calls this in the same order.
pub unsafe fn exchange(
    nccl: &Nccl,
    comm: ncclComm_t,
    rank: usize,
    nranks: usize,
    device: i32,
    buf: &DeviceMem,
) -> Result<(Vec<u64>, OpenedPeers)> {
    let _g = crate::cuda::context::CtxGuard::enter(device)?;
    let mine = PeerRecord {
        pid: std::process::id(),
        device,
        host: host_id(),
        ptr: buf.ptr(),
        bytes: buf.len() as u64,
        ipc: memory::ipc_get_mem_handle(buf.ptr())?,
    };
    let stage = DeviceMem::alloc(device, RECORD_BYTES * (nranks + 1))?;
    let send = stage.ptr() + (RECORD_BYTES * nranks) as u64;
    let mut all = vec![0u8; RECORD_BYTES * nranks];
    // SAFETY: the staging buffer holds nranks + 1 records; the stream 0 is the legacy stream.
    unsafe {
        memory::memcpy_htod(
            send,
            std::slice::from_raw_parts((&mine as *const PeerRecord).cast::<u8>(), RECORD_BYTES),
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
    let mut ptrs = Vec::with_capacity(nranks);
    let mut opened = OpenedPeers {
        device,
        ptrs: Vec::new(),
    };
    for r in 0..nranks {
        // SAFETY: `all` holds nranks packed records written by the all-gather.
        let rec: PeerRecord = unsafe { std::ptr::read_unaligned(all.as_ptr().add(r * RECORD_BYTES).cast()) };
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
        } else if rec.pid == mine.pid {
            if rec.device != device {
                crate::cuda::context::enable_peer_access(device, rec.device)?;
            }
            ptrs.push(rec.ptr);
        } else {
            let p = memory::ipc_open_mem_handle(&rec.ipc).map_err(|e| {
                crate::invalid_usage!(
                    "cannot map rank {r}'s buffer through CUDA IPC ({}); peers that P2P cannot reach need the RDMA transport, which this build does not have yet",
                    e.msg
                )
            })?;
            opened.ptrs.push(p);
            ptrs.push(p);
        }
    }
    Ok((ptrs, opened))
}

/// Allocates this rank's zeroed buffer of `bytes` on `device` and maps every rank's (collective:
/// every rank calls it in the same order with the same size). Growing callers synchronise first.
///
/// # Safety
/// `comm` is the caller's live communicator.
pub unsafe fn alloc_shared(
    comm: ncclComm_t,
    rank: usize,
    nranks: usize,
    device: i32,
    bytes: usize,
) -> Result<(DeviceMem, Vec<u64>, OpenedPeers)> {
    let buf = DeviceMem::alloc(device, bytes)?;
    {
        let _g = crate::cuda::context::CtxGuard::enter(device)?;
        // SAFETY: the buffer holds `bytes`; zero flags are never a valid tag.
        unsafe { memory::memset_d8_async(buf.ptr(), 0, bytes, memory::Stream::LEGACY_DEFAULT)? };
        memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT)?;
    }
    let nccl = Nccl::get()?;
    // SAFETY: forwarded from the caller.
    let (ptrs, opened) = unsafe { exchange(nccl, comm, rank, nranks, device, &buf) }?;
    Ok((buf, ptrs, opened))
}
