//! The on-disk JIT cache: content-addressed CUBIN files, written atomically.
//!
//! * Key: SHA-256 over everything that determines the CUBIN: a format version, the target
//!   architecture, the NVRTC version, the NVRTC options (which hold the `-D` defines and the
//!   architecture; sorted, as their order does not matter) and the SHA-256 of the source, each
//!   field length-prefixed so that no two different inputs are hashed as the same bytes. Two
//!   different compilations share a key only through a SHA-256 collision, so a cache hit never
//!   returns another kernel. The file also stores the key and a readable description of it
//!   ("material"), both compared on load, and the SHA-256 of the CUBIN, so a truncated, corrupt
//!   or foreign file is never used. NVRTC reports only its major.minor version: a patch update
//!   within one minor version reuses the CUBINs of the previous patch level (same architecture,
//!   valid code); empty the directory to recompile them.
//! * Directory: `$NCCL_EP_JIT_CACHE_DIR`, else `${XDG_CACHE_HOME:-$HOME/.cache}/nccl_ep/jit`, else
//!   (when that cannot be created) `/tmp/nccl_ep-$UID/jit`, which must be ours and private.
//!   `NCCL_EP_JIT_CACHE=0` turns the disk cache off.
//! * Writes go to a unique temp file in the same directory and are `rename`d into place, so
//!   concurrent processes never see partial files. Files that are short, corrupt or for another
//!   key are ignored (and overwritten by the next store). Failures never reach the caller: the
//!   JIT just compiles.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

/// Bump when the file layout or anything that affects the produced CUBIN but is not in the key
/// changes.
pub const FORMAT_VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"NCCLEPJ2";
const MAX_FILE: u64 = 1 << 30;

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Identifies one compilation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// SHA-256 of everything that determines the CUBIN (see the module doc).
    pub hash: [u8; 32],
    /// Human-readable description of everything hashed (the source by length and SHA-256).
    pub material: String,
}

impl CacheKey {
    /// The key as 64 hex digits (cache file names carry it).
    pub fn hex(&self) -> String {
        hex(&self.hash)
    }
}

/// The key of compiling `source` with `options` for `arch` with NVRTC `nvrtc_version`. The order
/// of `options` does not matter.
pub fn cache_key(source: &str, options: &[String], arch: &str, nvrtc_version: (i32, i32)) -> CacheKey {
    let mut sorted: Vec<&str> = options.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let source_hash = sha256(source.as_bytes());
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(b"nccl_ep jit");
    field(&FORMAT_VERSION.to_le_bytes());
    field(arch.as_bytes());
    field(&nvrtc_version.0.to_le_bytes());
    field(&nvrtc_version.1.to_le_bytes());
    field(&(sorted.len() as u64).to_le_bytes());
    for o in &sorted {
        field(o.as_bytes());
    }
    field(&source_hash);
    let material = format!(
        "nccl_ep jit v{FORMAT_VERSION}\narch={arch}\nnvrtc={}.{}\nsource={}:{}\noptions={}\n",
        nvrtc_version.0,
        nvrtc_version.1,
        source.len(),
        hex(&source_hash),
        sorted.join("\u{1f}"),
    );
    CacheKey {
        hash: h.finalize().into(),
        material,
    }
}

/// A cache directory.
#[derive(Clone, Debug)]
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// Uses (and creates) `dir`.
    pub fn at(dir: impl Into<PathBuf>) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The cache the environment asks for, or `None` when it is off or no directory is usable.
    pub fn from_env() -> Option<Self> {
        let get = |k: &str| std::env::var_os(k);
        if get("NCCL_EP_JIT_CACHE").is_some_and(|v| v == "0") {
            return None;
        }
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let (primary, fallback) = default_dirs(get, uid);
        if let Some(d) = primary
            && let Ok(c) = Self::at(d)
        {
            return Some(c);
        }
        Self::private_under_tmp(&fallback, uid).ok()
    }

    /// `/tmp/nccl_ep-$UID/jit`: the parent is created 0700 and must be owned by us and not
    /// writable by others, since anyone can create names in /tmp.
    fn private_under_tmp(dir: &Path, uid: u32) -> io::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        let parent = dir.parent().unwrap_or(dir);
        match fs::DirBuilder::new().mode(0o700).create(parent) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let m = fs::symlink_metadata(parent)?;
        if !m.is_dir() || m.uid() != uid || m.mode() & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "cache directory is not private",
            ));
        }
        Self::at(dir)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/<name>-<64 hex digits of the key>.cubin`, `name` reduced to `[A-Za-z0-9_.-]`.
    pub fn path_for(&self, name: &str, key: &CacheKey) -> PathBuf {
        let stem: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{stem}-{}.cubin", key.hex()))
    }

    /// The stored CUBIN, or `None` when absent or not valid for `key`.
    pub fn load(&self, name: &str, key: &CacheKey) -> Option<Vec<u8>> {
        let path = self.path_for(name, key);
        let len = fs::metadata(&path).ok()?.len();
        if len > MAX_FILE {
            return None;
        }
        decode(&fs::read(&path).ok()?, key)
    }

    /// Stores atomically; returns the final path.
    pub fn store(&self, name: &str, key: &CacheKey, cubin: &[u8]) -> io::Result<PathBuf> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = self.path_for(name, key);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let tmp = self.dir.join(format!(
            ".{}.{}.{}.{nanos}.tmp",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(&encode(key, cubin))?;
            f.sync_data()?;
            drop(f);
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| path)
    }
}

/// `(primary, fallback)` cache directories for an environment.
fn default_dirs(get: impl Fn(&str) -> Option<OsString>, uid: u32) -> (Option<PathBuf>, PathBuf) {
    let nonempty = |k: &str| get(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let primary = nonempty("NCCL_EP_JIT_CACHE_DIR").or_else(|| {
        nonempty("XDG_CACHE_HOME")
            .filter(|p| p.is_absolute())
            .or_else(|| nonempty("HOME").map(|h| h.join(".cache")))
            .map(|c| c.join("nccl_ep").join("jit"))
    });
    (primary, PathBuf::from(format!("/tmp/nccl_ep-{uid}/jit")))
}

/// `MAGIC | key (32) | material length (u32 LE) | material | CUBIN length (u64 LE) |
/// SHA-256 of the CUBIN (32) | CUBIN`.
fn encode(key: &CacheKey, cubin: &[u8]) -> Vec<u8> {
    let m = key.material.as_bytes();
    let mut out = Vec::with_capacity(8 + 32 + 4 + m.len() + 8 + 32 + cubin.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&key.hash);
    out.extend_from_slice(&(m.len() as u32).to_le_bytes());
    out.extend_from_slice(m);
    out.extend_from_slice(&(cubin.len() as u64).to_le_bytes());
    out.extend_from_slice(&sha256(cubin));
    out.extend_from_slice(cubin);
    out
}

fn decode(bytes: &[u8], key: &CacheKey) -> Option<Vec<u8>> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if b.len() < n {
            return None;
        }
        let (h, t) = b.split_at(n);
        *b = t;
        Some(h)
    }
    let mut b = bytes;
    if take(&mut b, 8)? != MAGIC || take(&mut b, 32)? != key.hash {
        return None;
    }
    let mlen = u32::from_le_bytes(take(&mut b, 4)?.try_into().ok()?) as usize;
    if take(&mut b, mlen)? != key.material.as_bytes() {
        return None;
    }
    let len = u64::from_le_bytes(take(&mut b, 8)?.try_into().ok()?);
    let sum = take(&mut b, 32)?;
    if len == 0 || b.len() as u64 != len || sha256(b) != sum {
        return None;
    }
    Some(b.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nccl_ep-cache-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn opts(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn sha256_reference_values() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn key_is_stable_and_order_free() {
        let a = cache_key(
            "src",
            &opts(&["-DA=1", "-DB=2", "--gpu-architecture=sm_90a"]),
            "sm_90a",
            (13, 0),
        );
        let b = cache_key(
            "src",
            &opts(&["--gpu-architecture=sm_90a", "-DB=2", "-DA=1"]),
            "sm_90a",
            (13, 0),
        );
        assert_eq!(a, b);
        // Pinned so that an accidental change of the key scheme (which orphans every cache) shows.
        assert_eq!(
            a.hash,
            cache_key(
                "src",
                &opts(&["-DB=2", "--gpu-architecture=sm_90a", "-DA=1"]),
                "sm_90a",
                (13, 0)
            )
            .hash
        );
        assert_eq!(a.hex(), GOLDEN);
        for other in [
            cache_key(
                "src ",
                &opts(&["-DA=1", "-DB=2", "--gpu-architecture=sm_90a"]),
                "sm_90a",
                (13, 0),
            ),
            cache_key(
                "src",
                &opts(&["-DA=2", "-DB=2", "--gpu-architecture=sm_90a"]),
                "sm_90a",
                (13, 0),
            ),
            cache_key(
                "src",
                &opts(&["-DA=1", "-DB=2", "--gpu-architecture=sm_90a"]),
                "sm_100a",
                (13, 0),
            ),
            cache_key(
                "src",
                &opts(&["-DA=1", "-DB=2", "--gpu-architecture=sm_90a"]),
                "sm_90a",
                (13, 1),
            ),
        ] {
            assert_ne!(a.hash, other.hash);
            assert_ne!(a.material, other.material);
        }
    }
    // Computed independently (Python hashlib) from the layout the module doc describes.
    const GOLDEN: &str = "f36e8575f27a20edf351c989bf24c36fb4a93badbd13e641eb9a5e9f00a7904e";

    /// Length prefixes keep differently split inputs apart (a joined description would not).
    #[test]
    fn keys_do_not_alias() {
        let a = cache_key("s", &opts(&["-DA=1\u{1f}-DB=2"]), "sm_90", (13, 0));
        let b = cache_key("s", &opts(&["-DA=1", "-DB=2"]), "sm_90", (13, 0));
        assert_eq!(a.material, b.material, "the readable description alone is ambiguous");
        assert_ne!(a.hash, b.hash);
        // A file with the right description but another key is not this key's.
        let dir = scratch("alias");
        let c = DiskCache::at(&dir).unwrap();
        fs::write(c.path_for("s.cu", &b), encode(&a, b"\x7fELF-a")).unwrap();
        assert_eq!(c.load("s.cu", &b), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn store_then_load_and_no_temp_files_left() {
        let dir = scratch("roundtrip");
        let c = DiskCache::at(&dir).unwrap();
        let k = cache_key("x", &[], "sm_90", (13, 0));
        assert_eq!(c.load("k.cu", &k), None);
        let p = c.store("k.cu", &k, b"\x7fELFdata").unwrap();
        assert_eq!(p, c.path_for("k.cu", &k));
        assert_eq!(c.load("k.cu", &k).as_deref(), Some(&b"\x7fELFdata"[..]));
        // Overwriting is fine.
        c.store("k.cu", &k, b"\x7fELFnew").unwrap();
        assert_eq!(c.load("k.cu", &k).as_deref(), Some(&b"\x7fELFnew"[..]));
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_writers_leave_a_valid_file() {
        let dir = scratch("concurrent");
        let c = DiskCache::at(&dir).unwrap();
        let k = cache_key("y", &[], "sm_90", (13, 0));
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..5 {
                        c.store("y.cu", &k, &payload).unwrap();
                        // A reader never sees a partial file: either absent or whole.
                        if let Some(v) = c.load("y.cu", &k) {
                            assert_eq!(v, payload);
                        }
                    }
                });
            }
        });
        assert_eq!(c.load("y.cu", &k).unwrap(), payload);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_short_or_foreign_files_are_ignored() {
        let dir = scratch("corrupt");
        let c = DiskCache::at(&dir).unwrap();
        let k = cache_key("z", &[], "sm_90", (13, 0));
        let path = c.store("z.cu", &k, b"\x7fELF-payload").unwrap();
        let good = fs::read(&path).unwrap();
        for n in [0, 3, 8, 12, good.len() - 1] {
            fs::write(&path, &good[..n]).unwrap();
            assert_eq!(c.load("z.cu", &k), None, "truncated to {n}");
        }
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        fs::write(&path, &flipped).unwrap();
        assert_eq!(c.load("z.cu", &k), None, "payload bit flip");
        let mut longer = good.clone();
        longer.push(0);
        fs::write(&path, &longer).unwrap();
        assert_eq!(c.load("z.cu", &k), None, "trailing garbage");
        fs::write(&path, b"garbage garbage garbage").unwrap();
        assert_eq!(c.load("z.cu", &k), None);
        // Another key's file under this key's name (a hash collision) is rejected by its material.
        let other = cache_key("w", &[], "sm_90", (13, 0));
        fs::write(&path, encode(&other, b"\x7fELF-other")).unwrap();
        assert_eq!(c.load("z.cu", &k), None);
        // And a store repairs it.
        c.store("z.cu", &k, b"\x7fELF-payload").unwrap();
        assert_eq!(c.load("z.cu", &k).as_deref(), Some(&b"\x7fELF-payload"[..]));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directory_resolution() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| OsString::from(v))
        };
        let (p, f) = default_dirs(env(&[("NCCL_EP_JIT_CACHE_DIR", "/x/y"), ("HOME", "/h")]), 7);
        assert_eq!(p, Some(PathBuf::from("/x/y")));
        assert_eq!(f, PathBuf::from("/tmp/nccl_ep-7/jit"));
        let (p, _) = default_dirs(env(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/h")]), 7);
        assert_eq!(p, Some(PathBuf::from("/xdg/nccl_ep/jit")));
        let (p, _) = default_dirs(env(&[("XDG_CACHE_HOME", "rel"), ("HOME", "/h")]), 7);
        assert_eq!(p, Some(PathBuf::from("/h/.cache/nccl_ep/jit")));
        let (p, _) = default_dirs(env(&[("NCCL_EP_JIT_CACHE_DIR", ""), ("HOME", "/h")]), 7);
        assert_eq!(p, Some(PathBuf::from("/h/.cache/nccl_ep/jit")));
        let (p, _) = default_dirs(env(&[]), 7);
        assert_eq!(p, None);
    }

    #[test]
    fn tmp_fallback_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: getuid has no preconditions and cannot fail.
        let uid = unsafe { libc::getuid() };
        let base = scratch("private");
        let c = DiskCache::private_under_tmp(&base.join("jit"), uid).unwrap();
        assert!(c.dir().is_dir());
        assert_eq!(fs::metadata(&base).unwrap().permissions().mode() & 0o777, 0o700);
        fs::set_permissions(&base, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(DiskCache::private_under_tmp(&base.join("jit"), uid).is_err());
        assert!(DiskCache::private_under_tmp(&base.join("jit"), uid + 1).is_err());
        fs::remove_dir_all(&base).unwrap();
    }
}
