//! Group configuration: every rule of `ncclEpCreateGroup` that needs no GPU, and the
//! resolution of AUTO fields, as one pure function.

use crate::enums::{Algorithm, OverflowPolicy};
use crate::error::Result;

/// Largest LL top-k (upstream v2's bound; our kernels are specialised on K up to this).
pub const LL_MAX_TOPK: u32 = 32;
/// The LL dispatch kernel keeps one counter per expert in shared memory (32 KiB at this bound).
pub const LL_MAX_EXPERTS: u32 = 8192;
/// Most routing entries (tokens x top-k) of one LL call: the dispatch kernel stages them in
/// shared memory (128 KiB at this bound).
pub const LL_MAX_ROUTING: u64 = 32768;
/// Bytes of one LL token slot for a group's `max_token_bytes`: the bound rounded up to the 16-byte
/// vectors rows move in (NCCL EP does not require LL's bound to be a multiple of 16; every row a
/// call may send is a multiple of 16 and at most the bound, so it fits the rounded slot).
pub fn ll_slot_bytes(max_token_bytes: u32) -> u32 {
    max_token_bytes.checked_next_multiple_of(16).unwrap_or(0xFFFF_FFF0)
}

/// Default GPU wait bound when neither the config nor the environment sets one.
pub const DEFAULT_TIMEOUT_NS: u64 = 100_000_000_000;

/// The fields of `ncclEpGroupConfig_t` as the caller set them: decoded from C, not yet checked
/// (enumerations stay integers here because NCCL EP accepts unknown values in some of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupConfig {
    pub algorithm: i32,
    pub num_experts: u32,
    pub max_dispatch_tokens_per_rank: u32,
    pub max_recv_tokens_per_rank: u32,
    pub max_token_bytes: u32,
    pub rdma_buffer_size: u64,
    pub max_num_sms: u32,
    /// `alloc.alloc_fn` is set.
    pub has_alloc_fn: bool,
    /// `alloc.free_fn` is set.
    pub has_free_fn: bool,
    pub enable_mask: i32,
    pub timeout_ns: u64,
    /// API v2 (0 = AUTO for a v1 caller).
    pub zero_copy: i32,
    pub overflow_policy: i32,
    pub num_topk: u32,
}

/// A group's validated parameters with AUTO fields resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupParams {
    pub algorithm: Algorithm,
    pub nranks: u32,
    pub rank: u32,
    pub num_experts: u32,
    pub local_experts: u32,
    /// B: most tokens one rank dispatches in one call.
    pub max_tokens: u32,
    /// S: HT receive budget (LL: N·B).
    pub max_recv_tokens: u32,
    /// Hb: bytes of the largest token row.
    pub max_token_bytes: u32,
    /// 0 = AUTO (sized at the first handle).
    pub rdma_buffer_size: u64,
    pub max_num_sms: u32,
    pub enable_mask: bool,
    pub timeout_ns: u64,
    pub overflow: OverflowPolicy,
    /// `config->zero_copy` (any value; only ON acts, crate::zero_copy).
    pub zero_copy: crate::zero_copy::ZeroCopy,
    /// 0 = unset.
    pub num_topk: u32,
    pub custom_alloc: bool,
}

/// The environment's say in the configuration (read by the caller, passed in for testability).
#[derive(Clone, Debug, Default)]
pub struct EnvOverrides {
    /// `NCCL_EP_TIMEOUT_MS` when set to a positive number.
    pub timeout_ms: Option<u64>,
}

impl EnvOverrides {
    pub fn from_env() -> Self {
        let timeout_ms = std::env::var("NCCL_EP_TIMEOUT_MS")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|&v| v > 0);
        Self { timeout_ms }
    }
}

/// The shape rules every buffer planner shares: N, E, B and K positive, E a multiple of N.
pub fn check_geometry(nranks: u32, num_experts: u32, max_tokens: u32, topk: u32) -> Result<()> {
    crate::ensure_arg!(nranks > 0, "the number of ranks is 0");
    crate::ensure_arg!(num_experts > 0, "num_experts is 0");
    crate::ensure_arg!(max_tokens > 0, "max_dispatch_tokens_per_rank is 0");
    crate::ensure_arg!(topk > 0, "num_topk is 0");
    crate::ensure_usage!(
        num_experts.is_multiple_of(nranks),
        "num_experts ({num_experts}) must be a multiple of the number of ranks ({nranks})"
    );
    Ok(())
}

/// Checks a decoded config for a group of `nranks` ranks on a device with `device_sms` SMs.
/// `rank` and `nranks` come from the communicator; `device_sms` may be 0 when unknown.
pub fn validate_group_config(
    c: &GroupConfig,
    rank: u32,
    nranks: u32,
    device_sms: u32,
    env: &EnvOverrides,
) -> Result<GroupParams> {
    let algorithm = Algorithm::from_raw(c.algorithm).ok_or_else(|| {
        crate::invalid_arg!(
            "config->algorithm is {}, expected NCCL_EP_ALGO_LOW_LATENCY (0) or NCCL_EP_ALGO_HIGH_THROUGHPUT (1)",
            c.algorithm
        )
    })?;
    crate::ensure_arg!(nranks >= 1, "the communicator has {nranks} ranks");
    crate::ensure_arg!(
        rank < nranks,
        "rank {rank} is outside the communicator of {nranks} ranks"
    );
    crate::ensure_arg!(c.num_experts > 0, "config->num_experts is 0");
    crate::ensure_arg!(c.max_token_bytes > 0, "config->max_token_bytes is 0");
    crate::ensure_arg!(
        c.max_dispatch_tokens_per_rank > 0,
        "config->max_dispatch_tokens_per_rank is 0 (NCCL_EP_AUTO is not supported for it)"
    );
    // NCCL EP checks this in HIGH_THROUGHPUT only; LOW_LATENCY takes any bound (rows are checked
    // per call, and the LL buffer rounds its slots up: see `ll_slot_bytes`).
    if algorithm == Algorithm::HighThroughput {
        crate::ensure_arg!(
            c.max_token_bytes.is_multiple_of(16),
            "config->max_token_bytes is {}, must be a multiple of 16 in HIGH_THROUGHPUT mode (rows move as 16-byte vectors)",
            c.max_token_bytes
        );
    }
    crate::ensure_usage!(
        c.num_experts.is_multiple_of(nranks),
        "config->num_experts ({}) must be a multiple of the number of ranks ({nranks})",
        c.num_experts
    );
    crate::ensure_usage!(
        c.has_alloc_fn == c.has_free_fn,
        "config->alloc: set both alloc_fn and free_fn, or neither"
    );
    if c.max_num_sms != 0 && device_sms != 0 {
        crate::ensure_usage!(
            c.max_num_sms <= device_sms,
            "config->max_num_sms ({}) exceeds the device's {device_sms} SMs",
            c.max_num_sms
        );
    }
    // zero_copy is not checked: NCCL EP acts only on ON (2), which asks for window-backed
    // dispatch outputs and combine inputs at each call; every other value behaves as AUTO
    // (crate::zero_copy, docs/ZERO_COPY.md).
    // overflow_policy: NCCL EP drops only on DROP (2); every other value traps (AUTO = TRAP), and
    // LOW_LATENCY ignores the field.
    let overflow = OverflowPolicy::from_raw(c.overflow_policy).unwrap_or(OverflowPolicy::Trap);
    crate::ensure_arg!(
        c.num_topk <= c.num_experts,
        "config->num_topk ({}) exceeds config->num_experts ({})",
        c.num_topk,
        c.num_experts
    );
    let b = c.max_dispatch_tokens_per_rank;
    let max_recv_tokens = match algorithm {
        Algorithm::LowLatency => {
            crate::ensure_arg!(
                c.num_experts <= LL_MAX_EXPERTS,
                "config->num_experts ({}) exceeds the low-latency limit of {LL_MAX_EXPERTS}",
                c.num_experts
            );
            let n = (nranks as u64) * (b as u64);
            crate::ensure_arg!(n <= u32::MAX as u64, "ranks x max_dispatch_tokens_per_rank overflows");
            n as u32
        }
        Algorithm::HighThroughput => {
            crate::ensure_arg!(
                c.max_recv_tokens_per_rank == 0 || c.max_recv_tokens_per_rank >= b,
                "config->max_recv_tokens_per_rank ({}) is below max_dispatch_tokens_per_rank ({b})",
                c.max_recv_tokens_per_rank
            );
            crate::ensure_usage!(
                !(c.max_recv_tokens_per_rank == 0 && overflow == OverflowPolicy::Drop),
                "config->overflow_policy DROP needs an explicit max_recv_tokens_per_rank"
            );
            c.max_recv_tokens_per_rank
        }
    };
    let timeout_ns = match (env.timeout_ms, c.timeout_ns) {
        (Some(ms), _) => ms.saturating_mul(1_000_000),
        (None, 0) => DEFAULT_TIMEOUT_NS,
        (None, t) => t,
    };
    Ok(GroupParams {
        algorithm,
        nranks,
        rank,
        num_experts: c.num_experts,
        local_experts: c.num_experts / nranks,
        max_tokens: b,
        max_recv_tokens,
        max_token_bytes: c.max_token_bytes,
        rdma_buffer_size: c.rdma_buffer_size,
        max_num_sms: c.max_num_sms,
        enable_mask: c.enable_mask != 0,
        timeout_ns,
        overflow,
        zero_copy: crate::zero_copy::ZeroCopy::from_raw(c.zero_copy),
        num_topk: c.num_topk,
        custom_alloc: c.has_alloc_fn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ll() -> GroupConfig {
        GroupConfig {
            algorithm: 0,
            num_experts: 256,
            max_dispatch_tokens_per_rank: 128,
            max_token_bytes: 14336,
            ..Default::default()
        }
    }

    fn err(c: &GroupConfig, n: u32) -> (i32, String) {
        let e = validate_group_config(c, 0, n, 132, &EnvOverrides::default()).unwrap_err();
        (e.code(), e.msg)
    }

    #[test]
    fn accepts_the_anchor_config_and_resolves_auto() {
        let p = validate_group_config(&ll(), 3, 8, 132, &EnvOverrides::default()).unwrap();
        assert_eq!(p.local_experts, 32);
        assert_eq!(p.max_recv_tokens, 8 * 128);
        assert_eq!(p.timeout_ns, DEFAULT_TIMEOUT_NS);
        assert_eq!(p.rank, 3);
    }

    #[test]
    fn rejects_each_bad_field_with_its_code() {
        let mut c = ll();
        c.algorithm = 7;
        assert_eq!(err(&c, 8).0, 4);
        let mut c = ll();
        c.num_experts = 0;
        assert_eq!(err(&c, 8).0, 4);
        let mut c = ll();
        c.max_token_bytes = 0;
        assert_eq!(err(&c, 8).0, 4);
        let mut c = ll();
        c.max_token_bytes = 100;
        c.algorithm = 1;
        assert!(err(&c, 8).1.contains("multiple of 16"));
        assert_eq!(err(&c, 8).0, 4);
        let mut c = ll();
        c.max_dispatch_tokens_per_rank = 0;
        assert_eq!(err(&c, 8).0, 4);
        let mut c = ll();
        c.num_experts = 100;
        assert_eq!(err(&c, 8).0, 5);
        let mut c = ll();
        c.max_num_sms = 200;
        assert_eq!(err(&c, 8).0, 5);
        let mut c = ll();
        c.num_topk = 300;
        assert_eq!(err(&c, 8).0, 4);
        let mut c = ll();
        c.has_alloc_fn = true;
        assert_eq!(err(&c, 8).0, 5);
    }

    /// Fields NCCL EP reads without a range check (docs/CONFORMANCE.md): LL `max_token_bytes` need
    /// not be a multiple of 16; `zero_copy` and `overflow_policy` take any value (only ON and DROP
    /// act; everything else behaves as AUTO / TRAP).
    #[test]
    fn accepts_what_nccl_ep_accepts() {
        let ok = |c: &GroupConfig| validate_group_config(c, 0, 8, 132, &EnvOverrides::default());
        let mut c = ll();
        c.max_token_bytes = 100;
        assert_eq!(ok(&c).unwrap().max_token_bytes, 100);
        assert_eq!(ll_slot_bytes(100), 112);
        assert_eq!(ll_slot_bytes(14336), 14336);
        assert_eq!(ll_slot_bytes(1), 16);
        assert_eq!(ll_slot_bytes(u32::MAX), 0xFFFF_FFF0);
        for z in [0, 1, 2, 3, -1, 1000] {
            let mut c = ll();
            c.zero_copy = z;
            assert!(ok(&c).is_ok(), "zero_copy {z}");
        }
        for (algo, v, want) in [
            (0, -1, OverflowPolicy::Trap),
            (0, 2, OverflowPolicy::Drop),
            (1, 3, OverflowPolicy::Trap),
            (1, -7, OverflowPolicy::Trap),
        ] {
            let mut c = ll();
            c.algorithm = algo;
            c.max_recv_tokens_per_rank = 4096;
            c.overflow_policy = v;
            assert_eq!(ok(&c).unwrap().overflow, want, "algorithm {algo}, policy {v}");
        }
        // LL ignores DROP's need for a fixed budget (it has no receive budget).
        let mut c = ll();
        c.overflow_policy = 2;
        assert!(ok(&c).is_ok());
    }

    #[test]
    fn ht_receive_budget_rules() {
        let mut c = ll();
        c.algorithm = 1;
        c.max_recv_tokens_per_rank = 64;
        assert_eq!(err(&c, 8).0, 4);
        c.max_recv_tokens_per_rank = 0;
        c.overflow_policy = 2;
        assert_eq!(err(&c, 8).0, 5);
        c.max_recv_tokens_per_rank = 4096;
        assert!(validate_group_config(&c, 0, 8, 132, &EnvOverrides::default()).is_ok());
    }

    #[test]
    fn timeout_env_overrides_config() {
        let mut c = ll();
        c.timeout_ns = 5_000;
        let p = validate_group_config(&c, 0, 2, 0, &EnvOverrides::default()).unwrap();
        assert_eq!(p.timeout_ns, 5_000);
        let p = validate_group_config(&c, 0, 2, 0, &EnvOverrides { timeout_ms: Some(7) }).unwrap();
        assert_eq!(p.timeout_ns, 7_000_000);
    }
}
