//! Our own small NCCL binding: the host functions we need, looked up at run time in the
//! `libnccl.so.2` the caller already loaded (so we use the NCCL that made the communicator),
//! falling back to loading it by name. Missing libraries or symbols are errors, never panics.

use crate::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclResult_t};
use ep_core::error::{Error, ErrorKind, Result};
use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> ncclResult_t;
type CommIntFn = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> ncclResult_t;
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, cudaStream_t) -> ncclResult_t;
type ErrStrFn = unsafe extern "C" fn(ncclResult_t) -> *const c_char;
type P2pFn =
    unsafe extern "C" fn(*const c_void, usize, ncclDataType_t, c_int, ncclComm_t, cudaStream_t) -> ncclResult_t;
type GroupFn = unsafe extern "C" fn() -> ncclResult_t;
/// `ncclCommRevoke(comm, flags)` (NCCL 2.28.7+).
type CommRevokeFn = unsafe extern "C" fn(ncclComm_t, c_int) -> ncclResult_t;
/// `ncclWinGetUserPtr(comm, win, &ptr)` (NCCL 2.29+).
type WinUserPtrFn = unsafe extern "C" fn(ncclComm_t, *mut c_void, *mut *mut c_void) -> ncclResult_t;
/// `ncclGetPeerDevicePointer(win, offset, peer, &ptr)` (NCCL 2.29+).
type PeerPtrFn = unsafe extern "C" fn(*mut c_void, usize, c_int, *mut *mut c_void) -> ncclResult_t;

/// The NCCL release that introduced the two window queries window-backed tensors need.
pub const WINDOW_API_VERSION: &str = "2.29";

/// The resolved NCCL entry points. Plain function pointers (hence `Send + Sync`) into a library
/// that is never unloaded.
pub struct Nccl {
    pub version: i32,
    get_version: GetVersionFn,
    comm_count: CommIntFn,
    comm_user_rank: CommIntFn,
    comm_cu_device: CommIntFn,
    all_gather: AllGatherFn,
    error_string: Option<ErrStrFn>,
    /// Point-to-point (remote peers, docs/MULTINODE.md): resolved at load, so that a missing
    /// symbol fails group creation rather than an operation. `ncclRecv` takes a `void*`; the
    /// pointer types share one ABI.
    send: P2pFn,
    recv: P2pFn,
    group_start: GroupFn,
    group_end: GroupFn,
    /// `ncclCommRevoke`: only the remote-exchange watchdog's opt-in uses it (absent before NCCL
    /// 2.28.7 and in stand-ins, which still load).
    comm_revoke: Option<CommRevokeFn>,
    /// Window queries: absent before NCCL 2.29, which is an error only for a window-backed
    /// tensor (everything else works with older NCCL).
    win_user_ptr: Option<WinUserPtrFn>,
    peer_ptr: Option<PeerPtrFn>,
}

/// One transfer of an exchange: `bytes` from `send` to rank `peer`, and `bytes` from `peer`
/// into `recv` (device pointers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct P2p {
    pub peer: usize,
    pub send: u64,
    pub recv: u64,
    pub bytes: usize,
}

const LIB_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// `dlerror`'s text of a failed `dlopen`, as libloading reports it.
fn dlopen_error_text(e: &libloading::Error) -> String {
    match e {
        libloading::Error::DlOpen { source } => source.to_string(),
        libloading::Error::DlOpenUnknown => "unknown dlopen error".into(),
        other => other.to_string(),
    }
}

/// Opens NCCL: the copy already in the process first (`RTLD_NOLOAD`), else by name, trying
/// `libnccl.so.2` before `libnccl.so` each time. The library is never closed: the function
/// pointers we keep point into it. It is kept in a static (not leaked), so that leak checkers
/// see it reachable.
fn open() -> Result<&'static Library> {
    static LIB: OnceLock<Library> = OnceLock::new();
    let mut last = String::from("unknown dlopen error");
    for flags in [libc::RTLD_NOLOAD | RTLD_NOW | RTLD_GLOBAL, RTLD_NOW | RTLD_GLOBAL] {
        for name in LIB_NAMES {
            // SAFETY: loading NCCL runs its initialisers, which have no preconditions on us; with
            // RTLD_NOLOAD nothing new is loaded at all.
            match unsafe { Library::open(Some(name), flags) } {
                // A second open (only if the first load failed later, on a missing symbol) finds
                // the first library kept; dropping the new handle only lowers dlopen's count.
                Ok(lib) => return Ok(LIB.get_or_init(|| lib)),
                Err(e) => last = dlopen_error_text(&e),
            }
        }
    }
    Err(Error::new(
        ErrorKind::System,
        format!(
            "cannot load NCCL (libnccl.so.2): {last}; load NCCL before calling NCCL EP or put it on LD_LIBRARY_PATH"
        ),
    ))
}

/// A required symbol as the function-pointer type `F`.
///
/// # Safety
/// `F` must be the symbol's true C prototype (a function pointer type).
unsafe fn need<F: Copy>(lib: &'static Library, name: &str) -> Result<F> {
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
    let missing = || Error::new(ErrorKind::System, format!("the loaded NCCL has no symbol {name}"));
    // SAFETY: looked up as a plain address, which is what every symbol is; nothing is called.
    let p: *mut c_void = *unsafe { lib.get::<*mut c_void>(name.as_bytes()) }.map_err(|_| missing())?;
    if p.is_null() {
        return Err(missing());
    }
    // SAFETY: a non-null address of the symbol whose prototype is `F` (the caller's promise),
    // in a library that stays loaded; `F` is pointer-sized (checked at compile time above).
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

impl Nccl {
    fn load() -> Result<Self> {
        let h = open()?;
        // SAFETY: each symbol gets the prototype nccl.h gives it (all present since NCCL 2.18);
        // ncclGetVersion only writes the int it is given.
        unsafe {
            let get_version: GetVersionFn = need(h, "ncclGetVersion")?;
            let mut version = 0;
            get_version(&mut version);
            Ok(Self {
                version,
                get_version,
                comm_count: need(h, "ncclCommCount")?,
                comm_user_rank: need(h, "ncclCommUserRank")?,
                comm_cu_device: need(h, "ncclCommCuDevice")?,
                all_gather: need(h, "ncclAllGather")?,
                error_string: need::<ErrStrFn>(h, "ncclGetErrorString").ok(),
                send: need(h, "ncclSend")?,
                recv: need(h, "ncclRecv")?,
                group_start: need(h, "ncclGroupStart")?,
                group_end: need(h, "ncclGroupEnd")?,
                // SAFETY: the prototype of nccl.h 2.28.7+.
                comm_revoke: need::<CommRevokeFn>(h, "ncclCommRevoke").ok(),
                // SAFETY: the prototypes of nccl.h 2.29+ (ncclWindow_t is a pointer).
                win_user_ptr: need::<WinUserPtrFn>(h, "ncclWinGetUserPtr").ok(),
                peer_ptr: need::<PeerPtrFn>(h, "ncclGetPeerDevicePointer").ok(),
            })
        }
    }

    /// The process-wide binding, loaded on first use.
    pub fn get() -> Result<&'static Nccl> {
        static N: OnceLock<std::result::Result<Nccl, Error>> = OnceLock::new();
        N.get_or_init(Nccl::load).as_ref().map_err(Clone::clone)
    }

    fn check(&self, what: &str, r: ncclResult_t) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        let text = self
            .error_string
            // SAFETY: ncclGetErrorString has the prototype we resolved it with and returns a
            // static NUL-terminated string for every code (unknown ones included), never null.
            .map(|f| unsafe { CStr::from_ptr(f(r)) }.to_string_lossy().into_owned())
            .unwrap_or_default();
        Err(Error::new(
            ErrorKind::Nccl(r),
            format!("{what} failed with NCCL error {r} ({text})"),
        ))
    }

    /// `ncclCommRevoke(comm, NCCL_REVOKE_DEFAULT)`: stops the communicator's in-flight
    /// operations (their kernels return) without freeing it; the owner may then shrink or destroy
    /// it once NCCL reports it quiescent.
    ///
    /// # Safety
    /// `comm` is a live communicator of this NCCL.
    pub unsafe fn comm_revoke(&self, comm: ncclComm_t) -> Result<()> {
        let f = self.comm_revoke.ok_or_else(|| {
            Error::new(
                ErrorKind::System,
                format!(
                    "the loaded NCCL ({}) has no ncclCommRevoke (NCCL 2.28.7 or later)",
                    self.version
                ),
            )
        })?;
        // SAFETY: the prototype of nccl.h; `comm` as this function's contract says; flags 0 is
        // NCCL_REVOKE_DEFAULT, the only value NCCL accepts.
        let r = unsafe { f(comm, 0) };
        // ncclInProgress (7): revoked, not quiescent yet, which is all the watchdog needs.
        if r == 7 {
            Ok(())
        } else {
            self.check("ncclCommRevoke", r)
        }
    }

    /// (rank, number of ranks, CUDA device ordinal) of a communicator.
    ///
    /// # Safety
    /// `comm` is a live communicator of this NCCL.
    pub unsafe fn comm_info(&self, comm: ncclComm_t) -> Result<(u32, u32, i32)> {
        let (mut n, mut r, mut d) = (0, 0, 0);
        // SAFETY: the pointers have nccl.h's prototypes; `comm` is a live communicator of this
        // NCCL (this function's contract); each call writes one int to a live local.
        unsafe {
            self.check("ncclCommCount", (self.comm_count)(comm, &mut n))?;
            self.check("ncclCommUserRank", (self.comm_user_rank)(comm, &mut r))?;
            self.check("ncclCommCuDevice", (self.comm_cu_device)(comm, &mut d))?;
        }
        ep_core::ensure_arg!(n >= 1 && r >= 0 && r < n, "the communicator reports rank {r} of {n}");
        Ok((r as u32, n as u32, d))
    }

    /// Byte all-gather of `count` bytes per rank between device buffers, on `stream`.
    ///
    /// # Safety
    /// `comm` is a live communicator of this NCCL and `stream` a valid stream of its device;
    /// `send` holds `count` device bytes, `recv` holds `count * nranks`, both valid until the
    /// all-gather ran.
    pub unsafe fn all_gather_bytes(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        comm: ncclComm_t,
        stream: cudaStream_t,
    ) -> Result<()> {
        // SAFETY: the pointer has ncclAllGather's prototype; buffers, communicator and stream are
        // as the contract requires; datatype 1 is ncclUint8, so `count` counts bytes.
        self.check("ncclAllGather", unsafe {
            (self.all_gather)(send, recv, count, 1, comm, stream)
        })
    }

    /// One NCCL group of byte sends and receives on `stream` (every transfer's send and
    /// receive); nothing when `xfers` is empty. The group is always ended, also after a failed
    /// call inside it (NCCL requires the pairing), and the first error is returned.
    ///
    /// # Safety
    /// `comm` is a live communicator of this NCCL and `stream` a valid stream of its device; each
    /// transfer's `send` and `recv` hold `bytes` device bytes, valid until the stream ran the
    /// group; every peer posts the matching calls in the same order.
    pub unsafe fn exchange(&self, xfers: &[P2p], comm: ncclComm_t, stream: cudaStream_t) -> Result<()> {
        if xfers.is_empty() {
            return Ok(());
        }
        // SAFETY: the pointers have nccl.h's prototypes; buffers, communicator and stream are
        // as this function's contract requires; datatype 1 is ncclUint8 (counts are bytes).
        unsafe {
            self.check("ncclGroupStart", (self.group_start)())?;
            let mut first = Ok(());
            for x in xfers {
                let peer = x.peer as c_int;
                let r = self
                    .check(
                        "ncclSend",
                        (self.send)(x.send as *const c_void, x.bytes, 1, peer, comm, stream),
                    )
                    .and_then(|_| {
                        self.check(
                            "ncclRecv",
                            (self.recv)(x.recv as *const c_void, x.bytes, 1, peer, comm, stream),
                        )
                    });
                if let Err(e) = r {
                    first = Err(e.context(format_args!("exchange with rank {}", x.peer)));
                    break;
                }
            }
            let end = self.check("ncclGroupEnd", (self.group_end)());
            first.and(end)
        }
    }

    /// The local address of byte 0 of window `win` (the buffer the caller registered).
    ///
    /// # Safety
    /// `comm` is a live communicator of this NCCL; `win` is any value (NCCL checks it).
    pub unsafe fn win_user_ptr(&self, comm: ncclComm_t, win: u64) -> Result<u64> {
        let f = self
            .win_user_ptr
            .ok_or_else(|| window_api_missing(self.version, "ncclWinGetUserPtr"))?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: ncclWinGetUserPtr's prototype; it writes one pointer to a live local.
        self.check("ncclWinGetUserPtr", unsafe { f(comm, win as *mut c_void, &mut p) })?;
        ep_core::ensure_usage!(
            !p.is_null(),
            "ncclWinGetUserPtr gave a NULL address for window {win:#x}"
        );
        Ok(p as u64)
    }

    /// Where byte `offset` of `peer`'s copy of window `win` is mapped in this process, or None
    /// when NCCL cannot reach that peer by load/store (not in this rank's NVLink domain).
    ///
    /// # Safety
    /// `win` is any value (NCCL checks it).
    pub unsafe fn peer_ptr(&self, win: u64, offset: u64, peer: u32) -> Result<Option<u64>> {
        let f = self
            .peer_ptr
            .ok_or_else(|| window_api_missing(self.version, "ncclGetPeerDevicePointer"))?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: ncclGetPeerDevicePointer's prototype; it writes one pointer to a live local.
        self.check("ncclGetPeerDevicePointer", unsafe {
            f(win as *mut c_void, offset as usize, peer as c_int, &mut p)
        })?;
        Ok((!p.is_null()).then_some(p as u64))
    }

    pub fn runtime_version(&self) -> i32 {
        let mut v = 0;
        // SAFETY: ncclGetVersion's prototype; it only writes one int to a live local.
        unsafe { (self.get_version)(&mut v) };
        v
    }
}

/// The error for a window-backed tensor when the loaded NCCL lacks the window queries.
fn window_api_missing(version: i32, symbol: &str) -> Error {
    ep_core::invalid_usage!(
        "window-backed tensors need NCCL >= {WINDOW_API_VERSION} (the loaded NCCL, version code {version}, has no \
         {symbol}); load a newer NCCL or pass device pointers in data"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With or without NCCL on the machine: a binding or a System error, never a panic.
    #[test]
    fn loading_never_panics() {
        match Nccl::get() {
            Ok(n) => assert!(n.version > 0 && n.runtime_version() == n.version),
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::System, "{e}");
                assert!(e.msg.starts_with("cannot load NCCL (libnccl.so.2): "), "{}", e.msg);
                assert!(e.msg.contains("LD_LIBRARY_PATH"), "{}", e.msg);
                assert!(
                    !e.msg.contains("unknown dlopen error"),
                    "dlerror's text is kept: {}",
                    e.msg
                );
            }
        }
    }

    /// A missing symbol is a System error naming it; a present one resolves.
    #[test]
    fn missing_symbols_are_errors() {
        // SAFETY: libc is already loaded (RTLD_NOLOAD), so no initialiser runs.
        let lib = unsafe { Library::open(Some("libc.so.6"), libc::RTLD_NOLOAD | RTLD_NOW) }.unwrap();
        let lib: &'static Library = Box::leak(Box::new(lib));
        // SAFETY: the type is never called; only the lookup is under test.
        let e = unsafe { need::<GetVersionFn>(lib, "ncclNoSuchFunction") }
            .err()
            .unwrap();
        assert_eq!(e.kind, ErrorKind::System);
        assert_eq!(e.msg, "the loaded NCCL has no symbol ncclNoSuchFunction");
        // SAFETY: getpid's prototype is `pid_t getpid(void)`.
        let getpid = unsafe { need::<unsafe extern "C" fn() -> libc::pid_t>(lib, "getpid") }.unwrap();
        // SAFETY: getpid has no preconditions.
        assert_eq!(unsafe { getpid() } as u32, std::process::id());
    }

    #[test]
    fn missing_window_api_says_which_nccl() {
        let e = window_api_missing(22803, "ncclWinGetUserPtr");
        assert_eq!(e.kind, ErrorKind::InvalidUsage);
        assert!(
            e.msg.contains("NCCL >= 2.29") && e.msg.contains("ncclWinGetUserPtr"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn dlopen_errors_keep_dlerror_text() {
        // SAFETY: the file does not exist, so nothing is loaded.
        let e = unsafe { Library::open(Some("libnccl_ep_no_such_library.so.9"), RTLD_NOW) }.unwrap_err();
        let text = dlopen_error_text(&e);
        assert!(text.contains("libnccl_ep_no_such_library.so.9"), "{text}");
    }
}
