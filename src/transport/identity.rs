//! Who a peer is: the same host (CUDA IPC works) and the same process (raw pointers work).
//!
//! Host: the hash of the host name followed by the kernel's boot id, as NCCL computes its host
//! hash (two machines or containers that share a host name still differ by boot id; containers
//! of one machine share the boot id but usually not the name), or of `NCCL_HOSTID` alone when
//! set, which overrides both in NCCL too. Process: the pid together with the pid namespace, since
//! processes in different containers of one host can have the same pid.

use ep_core::fnv::fnv1a; // stable across processes (std's hasher is randomly keyed)
use std::sync::OnceLock;

/// The host hash of a host name, boot id and `NCCL_HOSTID` (pure, for tests).
pub fn host_hash(hostname: &str, boot_id: Option<&str>, nccl_hostid: Option<&str>) -> u64 {
    if let Some(id) = nccl_hostid.filter(|s| !s.is_empty()) {
        return fnv1a(id.as_bytes());
    }
    let mut s = hostname.to_string();
    if let Some(b) = boot_id {
        s.push_str(b.trim());
    }
    fnv1a(s.as_bytes())
}

fn hostname() -> String {
    let mut name = [0u8; 256];
    // SAFETY: `name` is a live buffer of `name.len()` bytes and gethostname writes at most that
    // many (a failure or truncation leaves zeros or an unterminated name, both handled below).
    unsafe { libc::gethostname(name.as_mut_ptr().cast(), name.len()) };
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}

/// The kernel's random id of this boot, as NCCL reads it.
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

/// This host's identity (computed once).
pub fn host_id() -> u64 {
    static H: OnceLock<u64> = OnceLock::new();
    *H.get_or_init(|| {
        let boot = std::fs::read_to_string(BOOT_ID).ok();
        let env = std::env::var("NCCL_HOSTID").ok();
        host_hash(&hostname(), boot.as_deref(), env.as_deref())
    })
}

/// The pid namespace of a `/proc/self/ns/pid` link text such as `pid:[4026531836]` (pure).
pub fn pid_namespace(link: Option<&str>) -> u64 {
    link.map_or(0, |l| fnv1a(l.trim().as_bytes()))
}

/// This process on this host: (pid, pid namespace). Compare together with [`host_id`].
pub fn process_id() -> (u32, u64) {
    static NS: OnceLock<u64> = OnceLock::new();
    let ns = *NS.get_or_init(|| {
        let link = std::fs::read_link("/proc/self/ns/pid").ok();
        pid_namespace(link.as_ref().and_then(|p| p.to_str()))
    });
    // Not cached: a forked child is another process.
    (std::process::id(), ns)
}

/// The environment variable that splits the ranks into "nodes" of consecutive ranks
/// (docs/MULTINODE.md).
pub const NODE_SIZE_ENV: &str = "NCCL_EP_NODE_SIZE";

/// `NCCL_EP_NODE_SIZE`'s value: None when unset or empty, else a positive number of ranks.
pub fn parse_node_size(v: Option<&str>) -> ep_core::error::Result<Option<usize>> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    match v.parse::<usize>() {
        Ok(k) if k >= 1 => Ok(Some(k)),
        _ => Err(ep_core::invalid_arg!(
            "{NODE_SIZE_ENV}={v}: must be a positive number of ranks per node (docs/MULTINODE.md)"
        )),
    }
}

/// `NCCL_EP_NODE_SIZE` as set now (read at every group creation and size query).
pub fn node_size_from_env() -> ep_core::error::Result<Option<usize>> {
    parse_node_size(std::env::var(NODE_SIZE_ENV).ok().as_deref())
}

/// The ranks rank `rank` of `nranks` reaches through NCCL point-to-point (bit r), from
/// `NCCL_EP_NODE_SIZE` (unset: none).
pub fn remote_ranks_from_env(rank: usize, nranks: usize) -> ep_core::error::Result<u64> {
    Ok(node_size_from_env()?.map_or(0, |k| ep_core::ll_layout::remote_ranks(rank, nranks, k)))
}

/// The ranks on another host than rank `rank` (bit r), from every rank's host id (pure). Ranks
/// need not be laid out host by host. Groups have at most 64 ranks (the LL and HT limits).
pub fn remote_ranks_by_host(hosts: &[u64], rank: usize) -> u64 {
    ep_core::rank_set::ranks_where(hosts.len(), |r| hosts[r] != hosts[rank])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_size_values() {
        assert_eq!(parse_node_size(None).unwrap(), None);
        assert_eq!(parse_node_size(Some("")).unwrap(), None);
        assert_eq!(parse_node_size(Some(" 2 ")).unwrap(), Some(2));
        assert_eq!(parse_node_size(Some("8")).unwrap(), Some(8));
        for bad in ["0", "-1", "two", "1.5"] {
            let e = parse_node_size(Some(bad)).unwrap_err();
            assert_eq!(e.kind, ep_core::error::ErrorKind::InvalidArgument);
            assert!(e.msg.starts_with(&format!("NCCL_EP_NODE_SIZE={bad}: ")), "{}", e.msg);
        }
    }

    #[test]
    fn remote_by_host_any_layout() {
        assert_eq!(remote_ranks_by_host(&[7], 0), 0);
        assert_eq!(remote_ranks_by_host(&[7, 7, 7, 7], 2), 0);
        // Host by host: the other block.
        assert_eq!(remote_ranks_by_host(&[1, 1, 2, 2], 0), 0b1100);
        assert_eq!(remote_ranks_by_host(&[1, 1, 2, 2], 3), 0b0011);
        // Interleaved (round-robin placement): what NCCL_EP_NODE_SIZE cannot say.
        assert_eq!(remote_ranks_by_host(&[1, 2, 1, 2, 3], 1), 0b10101);
        assert_eq!(remote_ranks_by_host(&[1, 2, 1, 2, 3], 4), 0b01111);
        // Matches the node-size rule when the hosts are blocks of k.
        for (n, k) in [(8usize, 4usize), (6, 4), (5, 1)] {
            let hosts: Vec<u64> = (0..n).map(|r| (r / k) as u64 + 100).collect();
            for r in 0..n {
                assert_eq!(
                    remote_ranks_by_host(&hosts, r),
                    ep_core::ll_layout::remote_ranks(r, n, k)
                );
            }
        }
    }

    #[test]
    fn boot_id_and_hostid_decide() {
        let a = host_hash("node1", Some("0d6f-aa\n"), None);
        assert_eq!(a, host_hash("node1", Some("0d6f-aa"), None), "trailing newline ignored");
        assert_ne!(a, host_hash("node1", Some("77e1-bb"), None), "same name, other boot");
        assert_ne!(a, host_hash("node2", Some("0d6f-aa"), None), "other name, same boot");
        assert_ne!(a, host_hash("node1", None, None), "the boot id counts when readable");
        // NCCL_HOSTID replaces name and boot id.
        assert_eq!(
            host_hash("node1", Some("x"), Some("rack7")),
            host_hash("node9", Some("y"), Some("rack7"))
        );
        assert_eq!(host_hash("n", Some("b"), Some("")), host_hash("n", Some("b"), None));
    }

    /// `host_id` hashes this machine's name, its boot id (where readable) and `NCCL_HOSTID`.
    #[test]
    fn host_id_includes_the_boot_id() {
        let boot = std::fs::read_to_string(BOOT_ID).ok();
        let env = std::env::var("NCCL_HOSTID").ok();
        assert_eq!(host_id(), host_hash(&hostname(), boot.as_deref(), env.as_deref()));
        if env.as_deref().is_none_or(str::is_empty) && boot.is_some() {
            assert_ne!(host_id(), host_hash(&hostname(), None, None), "the boot id counts");
        }
    }

    #[test]
    fn pid_namespaces_differ() {
        assert_eq!(pid_namespace(None), 0);
        assert_ne!(
            pid_namespace(Some("pid:[4026531836]")),
            pid_namespace(Some("pid:[4026532451]"))
        );
        let (pid, ns) = process_id();
        assert_eq!(pid, std::process::id());
        assert_eq!(process_id().1, ns);
        assert_eq!(host_id(), host_id());
    }
}
