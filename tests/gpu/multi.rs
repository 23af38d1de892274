//! Multi-process / multi-GPU plumbing for the GPU tests, with no MPI library: who this process
//! is (rank, world size, local rank) from the launcher's environment, the NCCL unique id handed
//! from rank 0 to the others through a file in a shared directory, and the NCCL host functions a
//! test needs (looked up with dlopen/dlsym, like the library itself does).
//!
//! Environment read here:
//! - rank / world: `EP_RANK`/`EP_WORLD`, else `OMPI_COMM_WORLD_RANK`/`OMPI_COMM_WORLD_SIZE`
//!   (Open MPI), else `PMI_RANK`/`PMI_SIZE` (MPICH, Hydra, Slurm's PMI);
//! - local rank (device = local rank % visible devices): `EP_LOCAL_RANK`,
//!   `OMPI_COMM_WORLD_LOCAL_RANK`, `MPI_LOCALRANKID`, `PMI_LOCAL_RANK`, else the rank;
//! - `EP_BOOTSTRAP_DIR`: the directory the unique id goes through (every rank must see it; the
//!   launcher should make a fresh one per run); `EP_BOOTSTRAP_TAG` (else `PMIX_NAMESPACE`) is
//!   added to the file name; `EP_BOOTSTRAP_TIMEOUT_S` (default 120) bounds the wait for it;
//! - `EP_NCCL_LIB`: path of the libnccl.so.2 to load (else the loader's search for libnccl.so.2).

#![allow(dead_code)]

use nccl_ep::abi::types::{cudaStream_t, ncclComm_t};
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `ncclUniqueId` (128 opaque bytes, passed by value).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId(pub [u8; 128]);

/// Where this process sits in a multi-process run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// Which variables said so (for the log).
    pub source: &'static str,
}

fn parse_usize(get: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>, String> {
    match get(name) {
        Some(v) if !v.trim().is_empty() => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| format!("{name}={v:?} is not a non-negative integer")),
        _ => Ok(None),
    }
}

fn env_usize(name: &str) -> Result<Option<usize>, String> {
    parse_usize(&|n| std::env::var(n).ok(), name)
}

/// The rank and world size the launcher gave this process, or None when none did (then the
/// test runs every rank itself, one thread per GPU).
pub fn launch_from_env() -> Result<Option<Launch>, String> {
    launch_from(&|n| std::env::var(n).ok())
}

/// `launch_from_env` over any variable lookup (tests pass a map).
pub fn launch_from(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>, String> {
    const PAIRS: [(&str, &str, &str); 3] = [
        ("EP_RANK", "EP_WORLD", "EP_RANK/EP_WORLD"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI"),
        ("PMI_RANK", "PMI_SIZE", "PMI"),
    ];
    for (r, w, source) in PAIRS {
        let (rank, world) = (parse_usize(get, r)?, parse_usize(get, w)?);
        match (rank, world) {
            (None, None) => continue,
            (Some(rank), Some(world)) => {
                if world == 0 || rank >= world {
                    return Err(format!("{r}={rank} and {w}={world}: need 0 <= rank < world"));
                }
                let mut local_rank = rank;
                for l in [
                    "EP_LOCAL_RANK",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                    "MPI_LOCALRANKID",
                    "PMI_LOCAL_RANK",
                ] {
                    if let Some(v) = parse_usize(get, l)? {
                        local_rank = v;
                        break;
                    }
                }
                return Ok(Some(Launch {
                    rank,
                    world,
                    local_rank,
                    source,
                }));
            }
            _ => return Err(format!("set both {r} and {w}, or neither")),
        }
    }
    Ok(None)
}

/// The unique-id file of this run in `dir` (`EP_BOOTSTRAP_TAG`, else `PMIX_NAMESPACE`, in its
/// name).
pub fn id_path(dir: &Path, name: &str) -> PathBuf {
    let tag = std::env::var("EP_BOOTSTRAP_TAG")
        .or_else(|_| std::env::var("PMIX_NAMESPACE"))
        .unwrap_or_default();
    id_path_tagged(dir, name, &tag)
}

pub fn id_path_tagged(dir: &Path, name: &str, tag: &str) -> PathBuf {
    let tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(if tag.is_empty() {
        format!("{name}.id")
    } else {
        format!("{name}.{tag}.id")
    })
}

/// Rank 0: writes the id atomically (a temporary file renamed into place).
pub fn publish_id(path: &Path, id: &UniqueId) -> Result<(), String> {
    use std::io::Write;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
    f.write_all(&id.0)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("write {}: {e}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| format!("rename {} -> {}: {e}", tmp.display(), path.display()))
}

/// Every rank (rank 0 too, to prove the path): waits for the id file and reads it.
pub fn read_id(path: &Path, timeout: Duration) -> Result<UniqueId, String> {
    let start = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(b) if b.len() == 128 => {
                let mut id = UniqueId([0; 128]);
                id.0.copy_from_slice(&b);
                return Ok(id);
            }
            Ok(b) => {
                return Err(format!(
                    "{} holds {} bytes, not a 128-byte ncclUniqueId",
                    path.display(),
                    b.len()
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("read {}: {e}", path.display())),
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "no NCCL unique id in {} after {} s: is rank 0 running, and does every rank see EP_BOOTSTRAP_DIR?",
                path.display(),
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn bootstrap_timeout() -> Duration {
    Duration::from_secs(env_usize("EP_BOOTSTRAP_TIMEOUT_S").ok().flatten().unwrap_or(120) as u64)
}

/// The bootstrap directory: `EP_BOOTSTRAP_DIR`, or (one process only) a fresh temporary one.
pub fn bootstrap_dir(world: usize) -> Result<PathBuf, String> {
    match std::env::var("EP_BOOTSTRAP_DIR") {
        Ok(d) if !d.is_empty() => {
            std::fs::create_dir_all(&d).map_err(|e| format!("EP_BOOTSTRAP_DIR={d}: {e}"))?;
            Ok(PathBuf::from(d))
        }
        _ if world == 1 => {
            let d = std::env::temp_dir().join(format!("gpu_multi-{}", std::process::id()));
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            Ok(d)
        }
        _ => Err("set EP_BOOTSTRAP_DIR to a directory every rank sees (the NCCL unique id goes through it)".into()),
    }
}

type GetUniqueIdFn = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRankFn = unsafe extern "C" fn(*mut ncclComm_t, c_int, UniqueId, c_int) -> c_int;
type CommInitAllFn = unsafe extern "C" fn(*mut ncclComm_t, c_int, *const c_int) -> c_int;
type CommDestroyFn = unsafe extern "C" fn(ncclComm_t) -> c_int;
type AllReduceFn =
    unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, ncclComm_t, cudaStream_t) -> c_int;
type ErrStrFn = unsafe extern "C" fn(c_int) -> *const c_char;
type GetVersionFn = unsafe extern "C" fn(*mut c_int) -> c_int;
type MemAllocFn = unsafe extern "C" fn(*mut *mut c_void, usize) -> c_int;
type MemFreeFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type WinRegisterFn = unsafe extern "C" fn(ncclComm_t, *mut c_void, usize, *mut *mut c_void, c_int) -> c_int;
type WinDeregisterFn = unsafe extern "C" fn(ncclComm_t, *mut c_void) -> c_int;

/// `NCCL_WIN_COLL_SYMMETRIC` (nccl.h): every rank registers the same size, collectively.
pub const NCCL_WIN_COLL_SYMMETRIC: c_int = 1;

/// The window functions (NCCL 2.27+ for registration; the library's resolution needs 2.29).
#[derive(Clone, Copy)]
pub struct NcclWindowApi {
    pub mem_alloc: MemAllocFn,
    pub mem_free: MemFreeFn,
    pub register: WinRegisterFn,
    pub deregister: WinDeregisterFn,
}

/// The NCCL host functions the multi-GPU tests call. Send and Sync by itself (a String, an int
/// and function pointers), as the threads mode needs; the function pointers stay valid because
/// the library is never closed.
pub struct NcclLib {
    pub path: String,
    pub version: i32,
    get_unique_id: GetUniqueIdFn,
    comm_init_rank: CommInitRankFn,
    comm_init_all: CommInitAllFn,
    comm_destroy: CommDestroyFn,
    all_reduce: AllReduceFn,
    error_string: ErrStrFn,
    /// None when this NCCL has no window registration.
    pub windows: Option<NcclWindowApi>,
}

const NCCL_INT64: c_int = 4;
const NCCL_SUM: c_int = 0;

impl NcclLib {
    /// Loads `EP_NCCL_LIB` or `libnccl.so.2` with RTLD_GLOBAL (so the library under test finds
    /// the same NCCL) and resolves the functions.
    pub fn open() -> Result<NcclLib, String> {
        let path = std::env::var("EP_NCCL_LIB").unwrap_or_else(|_| "libnccl.so.2".into());
        let c = CString::new(path.clone()).map_err(|_| "EP_NCCL_LIB has a NUL byte".to_string())?;
        // SAFETY: `c` is a NUL-terminated string alive for the call.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if h.is_null() {
            // SAFETY: dlerror takes no arguments; it returns NULL or a C string.
            let why = unsafe { libc::dlerror() };
            let why = if why.is_null() {
                String::new()
            } else {
                // SAFETY: non-NULL, so a NUL-terminated string from dlerror, valid until the next
                // dl* call on this thread; it is copied out at once.
                unsafe { CStr::from_ptr(why) }.to_string_lossy().into_owned()
            };
            return Err(format!("{path} not found ({why})"));
        }
        let sym = |n: &str| -> Result<*mut c_void, String> {
            let cn = CString::new(n).unwrap();
            // SAFETY: `h` is a live handle (non-NULL, never closed); `cn` is a NUL-terminated
            // string alive for the call.
            let p = unsafe { libc::dlsym(h, cn.as_ptr()) };
            if p.is_null() {
                Err(format!("{path} has no {n}"))
            } else {
                Ok(p)
            }
        };
        // SAFETY: every symbol is non-NULL (`sym` checks) and gets its nccl.h prototype
        // (`ncclResult_t` and `ncclDataType_t`/`ncclRedOp_t` are int-sized C enums, `UniqueId`
        // the 128-byte C struct); the library is never closed, so the pointers stay valid;
        // `ncclGetVersion` writes one int to the live local `version`.
        unsafe {
            let get_version: GetVersionFn = std::mem::transmute(sym("ncclGetVersion")?);
            let mut version = 0;
            get_version(&mut version);
            Ok(NcclLib {
                version,
                get_unique_id: std::mem::transmute::<*mut c_void, GetUniqueIdFn>(sym("ncclGetUniqueId")?),
                comm_init_rank: std::mem::transmute::<*mut c_void, CommInitRankFn>(sym("ncclCommInitRank")?),
                comm_init_all: std::mem::transmute::<*mut c_void, CommInitAllFn>(sym("ncclCommInitAll")?),
                comm_destroy: std::mem::transmute::<*mut c_void, CommDestroyFn>(sym("ncclCommDestroy")?),
                all_reduce: std::mem::transmute::<*mut c_void, AllReduceFn>(sym("ncclAllReduce")?),
                error_string: std::mem::transmute::<*mut c_void, ErrStrFn>(sym("ncclGetErrorString")?),
                windows: match (
                    sym("ncclMemAlloc"),
                    sym("ncclMemFree"),
                    sym("ncclCommWindowRegister"),
                    sym("ncclCommWindowDeregister"),
                ) {
                    (Ok(a), Ok(f), Ok(r), Ok(d)) => Some(NcclWindowApi {
                        mem_alloc: std::mem::transmute::<*mut c_void, MemAllocFn>(a),
                        mem_free: std::mem::transmute::<*mut c_void, MemFreeFn>(f),
                        register: std::mem::transmute::<*mut c_void, WinRegisterFn>(r),
                        deregister: std::mem::transmute::<*mut c_void, WinDeregisterFn>(d),
                    }),
                    _ => None,
                },
                path,
            })
        }
    }

    pub fn check(&self, what: &str, r: c_int) -> Result<(), String> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: `error_string` is ncclGetErrorString, which takes any code and returns a static
        // NUL-terminated string.
        let text = unsafe { CStr::from_ptr((self.error_string)(r)) }.to_string_lossy();
        Err(format!("{what} failed: NCCL error {r} ({text})"))
    }

    pub fn unique_id(&self) -> Result<UniqueId, String> {
        let mut id = UniqueId([0; 128]);
        // SAFETY: ncclGetUniqueId writes one 128-byte ncclUniqueId to the live local `id`.
        self.check("ncclGetUniqueId", unsafe { (self.get_unique_id)(&mut id) })?;
        Ok(id)
    }

    /// `ncclCommInitRank` on `device` (made current for the call).
    pub fn init_rank(&self, world: usize, id: UniqueId, rank: usize, device: i32) -> Result<ncclComm_t, String> {
        let _g = nccl_ep::cuda::context::CtxGuard::enter(device).map_err(|e| e.msg)?;
        let mut comm = std::ptr::null_mut();
        // SAFETY: ncclCommInitRank takes the id by value and writes one handle to the live local
        // `comm`; `device`'s context is current (the guard above).
        self.check("ncclCommInitRank", unsafe {
            (self.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int)
        })?;
        Ok(comm)
    }

    /// `ncclCommInitAll` over devices `0..n` (rank r on device r).
    pub fn init_all(&self, n: usize) -> Result<Vec<ncclComm_t>, String> {
        let devs: Vec<c_int> = (0..n as c_int).collect();
        let mut comms = vec![std::ptr::null_mut(); n];
        // SAFETY: ncclCommInitAll writes `n` handles to `comms` (n slots) and reads `n` device
        // numbers from `devs` (n entries); both live for the call.
        self.check("ncclCommInitAll", unsafe {
            (self.comm_init_all)(comms.as_mut_ptr(), n as c_int, devs.as_ptr())
        })?;
        Ok(comms)
    }

    pub fn destroy(&self, comm: ncclComm_t, device: i32) -> Result<(), String> {
        let _g = nccl_ep::cuda::context::CtxGuard::enter(device).map_err(|e| e.msg)?;
        // SAFETY: `comm` is the caller's live communicator, destroyed once (by this call); its
        // device's context is current (the guard above).
        self.check("ncclCommDestroy", unsafe { (self.comm_destroy)(comm) })
    }

    /// Sum of `v` over the communicator's ranks (collective; also a barrier), on a stream of
    /// its own.
    pub fn sum_i64(&self, comm: ncclComm_t, device: i32, v: &[i64]) -> Result<Vec<i64>, String> {
        use cudarc::driver::sys;
        use nccl_ep::cuda::memory::{self, DeviceMem};
        let _g = nccl_ep::cuda::context::CtxGuard::enter(device).map_err(|e| e.msg)?;
        let buf = DeviceMem::alloc(device, (v.len() * 8).max(8)).map_err(|e| e.msg)?;
        let mut out = vec![0i64; v.len()];
        let mut s: sys::CUstream = std::ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32;
        // SAFETY: entering the context loaded the driver and made `device`'s context current;
        // the call writes one handle to the live local `s`.
        if unsafe { sys::cuStreamCreate(&mut s, flags) } != sys::CUresult::CUDA_SUCCESS {
            return Err("cuStreamCreate failed".into());
        }
        // SAFETY: `buf` holds `v.len()` i64 (at least 8 bytes), the extent of both copies and of
        // the in-place all-reduce; `s` is the stream created above and `comm` the caller's live
        // communicator on this device, whose context is current; the stream is synchronised
        // before the copy back, and `buf` outlives it.
        let res = unsafe {
            memory::memcpy_htod(buf.ptr(), v)
                // A copy from pageable memory may return before the data lands, and the
                // all-reduce runs on a non-blocking stream: wait for the copy first.
                .and_then(|_| memory::stream_synchronize(memory::Stream::LEGACY_DEFAULT))
                .map_err(|e| e.msg)
                .and_then(|_| {
                    self.check(
                        "ncclAllReduce",
                        (self.all_reduce)(
                            buf.ptr() as *const c_void,
                            buf.ptr() as *mut c_void,
                            v.len(),
                            NCCL_INT64,
                            NCCL_SUM,
                            comm,
                            s.cast(),
                        ),
                    )?;
                    memory::stream_synchronize(memory::Stream::from_raw(s.cast())).map_err(|e| e.msg)?;
                    memory::memcpy_dtoh(&mut out, buf.ptr()).map_err(|e| e.msg)
                })
        };
        // SAFETY: `s` was created above and is destroyed once, here; the driver lets queued work
        // finish before it releases the stream.
        unsafe { sys::cuStreamDestroy_v2(s) };
        res.map(|_| out)
    }
}

/// Ends the process (exit status 124) if it is still running after `secs` seconds: a rank whose
/// peer died would otherwise wait in NCCL for ever.
pub fn start_watchdog(secs: u64, who: String) {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(secs));
        println!("{who}: TIMEOUT: still running after {secs} s (EP_MULTI_TIMEOUT_S); a peer failed or hangs");
        eprintln!("{who}: TIMEOUT after {secs} s");
        std::process::exit(124);
    });
}
