//! Our own small NCCL binding: the host functions we need, looked up at run time in the
//! `libnccl.so.2` the caller already loaded (so we use the NCCL that made the communicator),
//! falling back to loading it by name. Missing libraries or symbols are errors, never panics.

use crate::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclResult_t};
use ep_core::error::{Error, ErrorKind, Result};
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::sync::OnceLock;

type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> ncclResult_t;
type CommIntFn = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> ncclResult_t;
type AllGatherFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, cudaStream_t) -> ncclResult_t;
type ErrStrFn = unsafe extern "C" fn(ncclResult_t) -> *const c_char;

/// The resolved NCCL entry points.
pub struct Nccl {
    pub version: i32,
    get_version: GetVersionFn,
    comm_count: CommIntFn,
    comm_user_rank: CommIntFn,
    comm_cu_device: CommIntFn,
    all_gather: AllGatherFn,
    error_string: Option<ErrStrFn>,
}

// SAFETY: plain function pointers into a library that is never unloaded.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

const LIB_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

fn dlerror_text() -> String {
    // SAFETY: dlerror returns NULL or a thread-local C string.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown dlopen error".into()
    } else {
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Opens NCCL: the copy already in the process first, else by name. The handle is never closed.
fn open() -> Result<*mut c_void> {
    for flags in [
        libc::RTLD_NOLOAD | libc::RTLD_NOW | libc::RTLD_GLOBAL,
        libc::RTLD_NOW | libc::RTLD_GLOBAL,
    ] {
        for name in LIB_NAMES {
            let c = CString::new(name).expect("no NUL");
            // SAFETY: plain dlopen of a library name.
            let h = unsafe { libc::dlopen(c.as_ptr(), flags) };
            if !h.is_null() {
                return Ok(h);
            }
        }
    }
    Err(Error::new(
        ErrorKind::System,
        format!(
            "cannot load NCCL (libnccl.so.2): {}; load NCCL before calling NCCL EP or put it on LD_LIBRARY_PATH",
            dlerror_text()
        ),
    ))
}

fn sym(h: *mut c_void, name: &str) -> Option<*mut c_void> {
    let c = CString::new(name).expect("no NUL");
    // SAFETY: dlsym on a live handle.
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    (!p.is_null()).then_some(p)
}

/// A required symbol as the function-pointer type `F`.
///
/// # Safety
/// `F` must be the symbol's true C prototype (a function pointer type).
unsafe fn need<F: Copy>(h: *mut c_void, name: &str) -> Result<F> {
    let p =
        sym(h, name).ok_or_else(|| Error::new(ErrorKind::System, format!("the loaded NCCL has no symbol {name}")))?;
    assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: F is a function pointer of the symbol's prototype (caller's promise).
    Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
}

impl Nccl {
    fn load() -> Result<Self> {
        let h = open()?;
        // SAFETY: each symbol gets the prototype nccl.h gives it (all present since NCCL 2.18).
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
            // SAFETY: ncclGetErrorString returns a static string.
            .map(|f| unsafe { CStr::from_ptr(f(r)) }.to_string_lossy().into_owned())
            .unwrap_or_default();
        Err(Error::new(
            ErrorKind::Nccl(r),
            format!("{what} failed with NCCL error {r} ({text})"),
        ))
    }

    /// (rank, number of ranks, CUDA device ordinal) of a communicator.
    ///
    /// # Safety
    /// `comm` is a live communicator of this NCCL.
    pub unsafe fn comm_info(&self, comm: ncclComm_t) -> Result<(u32, u32, i32)> {
        let (mut n, mut r, mut d) = (0, 0, 0);
        // SAFETY: comm is the caller's communicator; outputs are local ints.
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
    /// `send` holds `count` device bytes, `recv` holds `count * nranks`.
    pub unsafe fn all_gather_bytes(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count: usize,
        comm: ncclComm_t,
        stream: cudaStream_t,
    ) -> Result<()> {
        // SAFETY: forwarded contract; ncclUint8 = 1.
        self.check("ncclAllGather", unsafe {
            (self.all_gather)(send, recv, count, 1, comm, stream)
        })
    }

    pub fn runtime_version(&self) -> i32 {
        let mut v = 0;
        // SAFETY: a plain query.
        unsafe { (self.get_version)(&mut v) };
        v
    }
}
