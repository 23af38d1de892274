//! Handle-level rules of `ncclEpHandleMemSize` / `ncclEpInitHandle` / `ncclEpUpdateHandle`
//! that need no GPU: which (algorithm, layout, top-k, alignment) combinations are valid, and
//! how the routing tensor must look.

use crate::config::{GroupParams, LL_MAX_ROUTING, LL_MAX_TOPK};
use crate::enums::{Algorithm, Layout, dtype};
use crate::error::Result;
use crate::tensor::{Dim, TensorView};

/// A handle's fixed parameters after validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandleParams {
    pub layout: Layout,
    pub num_topk: u32,
    /// HT expert-major zone alignment in rows (1 = none).
    pub expert_alignment: usize,
}

/// Checks layout, top-k and the handle config against the group (`ncclEpInitHandle`,
/// `ncclEpCreateHandle`), as NCCL EP does (docs/CONFORMANCE.md):
/// - LOW_LATENCY: EXPERT_MAJOR or RANK_MAJOR; 1 <= K <= min(E, 32) (`ncclInvalidArgument`).
/// - HIGH_THROUGHPUT: FLAT or EXPERT_MAJOR; K >= 1 and K <= `config->num_topk` when that is set
///   (`ncclInvalidUsage`, NCCL EP's code for both); K is not bounded by E (extra columns are −1
///   or repeats).
/// - `dispatch_output_per_expert_alignment` is read for HIGH_THROUGHPUT EXPERT_MAJOR only (a power
///   of two, 0 and 1 meaning none); other layouts ignore it, as NCCL EP does.
pub fn check_handle(p: &GroupParams, layout: Option<Layout>, num_topk: i64, alignment: usize) -> Result<HandleParams> {
    let layout = layout.ok_or_else(|| crate::invalid_arg!("layout is NCCL_EP_LAYOUT_UNSET; choose a layout"))?;
    match p.algorithm {
        Algorithm::LowLatency => crate::ensure_usage!(
            matches!(layout, Layout::ExpertMajor | Layout::RankMajor),
            "layout {} is not available in LOW_LATENCY mode (use EXPERT_MAJOR or RANK_MAJOR)",
            layout.name()
        ),
        Algorithm::HighThroughput => crate::ensure_usage!(
            matches!(layout, Layout::ExpertMajor | Layout::Flat),
            "layout {} is not available in HIGH_THROUGHPUT mode (use FLAT or EXPERT_MAJOR)",
            layout.name()
        ),
    }
    let k = match p.algorithm {
        Algorithm::LowLatency => {
            crate::ensure_arg!(num_topk > 0, "num_topk is {num_topk}, must be at least 1");
            crate::ensure_arg!(
                num_topk <= p.num_experts as i64,
                "num_topk ({num_topk}) exceeds the number of experts ({})",
                p.num_experts
            );
            let k = num_topk as u32;
            crate::ensure_arg!(
                k <= LL_MAX_TOPK,
                "num_topk ({k}) exceeds the low-latency limit of {LL_MAX_TOPK}"
            );
            // The dispatch kernel stages the routing [B, K] in shared memory.
            crate::ensure_usage!(
                p.max_tokens as u64 * k as u64 <= LL_MAX_ROUTING,
                "max_dispatch_tokens_per_rank ({}) x num_topk ({k}) exceeds the low-latency limit of {LL_MAX_ROUTING}",
                p.max_tokens
            );
            k
        }
        Algorithm::HighThroughput => {
            crate::ensure_usage!(
                num_topk > 0,
                "num_topk is {num_topk}: HIGH_THROUGHPUT handles need the top-k (at least 1) at ncclEpInitHandle"
            );
            crate::ensure_usage!(
                p.num_topk == 0 || num_topk <= p.num_topk as i64,
                "num_topk ({num_topk}) exceeds the group's config->num_topk ({})",
                p.num_topk
            );
            crate::ensure_arg!(num_topk <= u32::MAX as i64, "num_topk ({num_topk}) is too large");
            num_topk as u32
        }
    };
    let expert_alignment = if p.algorithm == Algorithm::HighThroughput && layout == Layout::ExpertMajor {
        crate::ensure_arg!(
            alignment <= 1 || alignment.is_power_of_two(),
            "config->dispatch_output_per_expert_alignment ({alignment}) must be 0, 1 or a power of two"
        );
        alignment.max(1)
    } else {
        1
    };
    Ok(HandleParams {
        layout,
        num_topk: k,
        expert_alignment,
    })
}

/// The parameters `ncclEpHandleMemSize` sizes a block for. NCCL EP checks only that the layout is
/// set and K >= 1 there (`ncclInvalidArgument`) and returns a size for anything else; so do we:
/// a layout of the other mode is sized as this mode's (LOW_LATENCY: the block does not depend on
/// the layout; HIGH_THROUGHPUT: as FLAT), and K is not bounded (`ncclEpInitHandle` checks it).
/// The alignment counts for HIGH_THROUGHPUT EXPERT_MAJOR only (eager blocks grow with it).
pub fn mem_size_params(
    p: &GroupParams,
    layout: Option<Layout>,
    num_topk: i64,
    alignment: usize,
) -> Result<HandleParams> {
    let layout = layout.ok_or_else(|| crate::invalid_arg!("layout is NCCL_EP_LAYOUT_UNSET; choose a layout"))?;
    crate::ensure_arg!(num_topk > 0, "num_topk is {num_topk}, must be at least 1");
    let k = u32::try_from(num_topk).map_err(|_| crate::invalid_arg!("num_topk ({num_topk}) is too large"))?;
    let layout = match (p.algorithm, layout) {
        (Algorithm::LowLatency, Layout::RankMajor) => Layout::RankMajor,
        (Algorithm::LowLatency, _) => Layout::ExpertMajor,
        (Algorithm::HighThroughput, Layout::ExpertMajor) => Layout::ExpertMajor,
        (Algorithm::HighThroughput, _) => Layout::Flat,
    };
    let expert_alignment = match (p.algorithm, layout) {
        (Algorithm::HighThroughput, Layout::ExpertMajor) => alignment.max(1),
        _ => 1,
    };
    Ok(HandleParams {
        layout,
        num_topk: k,
        expert_alignment,
    })
}

/// Checks the routing tensor `topk_idx` [T, K] (int32 or int64, T <= B).
pub fn check_topk_idx(p: &GroupParams, h: &HandleParams, t: &TensorView) -> Result<()> {
    t.expect(
        "topk_idx",
        &[Dim::Any, Dim::Eq(h.num_topk as usize)],
        &[dtype::INT64, dtype::INT32],
    )?;
    crate::ensure_arg!(
        t.dim(0) <= p.max_tokens as usize,
        "topk_idx has {} rows, more than max_dispatch_tokens_per_rank ({})",
        t.dim(0),
        p.max_tokens
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;
    use crate::enums::OverflowPolicy;

    pub fn params(algo: Algorithm) -> GroupParams {
        GroupParams {
            algorithm: algo,
            nranks: 8,
            rank: 0,
            num_experts: 256,
            local_experts: 32,
            max_tokens: 128,
            max_recv_tokens: 1024,
            max_token_bytes: 14336,
            rdma_buffer_size: 0,
            max_num_sms: 0,
            enable_mask: false,
            timeout_ns: 1,
            overflow: OverflowPolicy::Trap,
            zero_copy: Default::default(),
            num_topk: 0,
            custom_alloc: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::params;
    use super::*;
    use crate::enums::DType;

    #[test]
    fn layout_and_topk_rules() {
        let ll = params(Algorithm::LowLatency);
        assert_eq!(check_handle(&ll, None, 8, 0).unwrap_err().code(), 4);
        assert_eq!(check_handle(&ll, Some(Layout::Flat), 8, 0).unwrap_err().code(), 5);
        assert_eq!(check_handle(&ll, Some(Layout::RankMajor), 0, 0).unwrap_err().code(), 4);
        assert_eq!(check_handle(&ll, Some(Layout::RankMajor), 33, 0).unwrap_err().code(), 4);
        assert!(check_handle(&ll, Some(Layout::ExpertMajor), 32, 0).is_ok());
        let mut ht = params(Algorithm::HighThroughput);
        assert_eq!(check_handle(&ht, Some(Layout::RankMajor), 8, 0).unwrap_err().code(), 5);
        // The alignment is an EXPERT_MAJOR field: checked and kept there only.
        assert_eq!(
            check_handle(&ht, Some(Layout::ExpertMajor), 8, 3).unwrap_err().code(),
            4
        );
        assert_eq!(
            check_handle(&ht, Some(Layout::ExpertMajor), 8, 64)
                .unwrap()
                .expert_alignment,
            64
        );
        ht.num_topk = 4;
        assert_eq!(check_handle(&ht, Some(Layout::Flat), 8, 0).unwrap_err().code(), 5);
    }

    /// What NCCL EP accepts at ncclEpInitHandle and this library used to refuse.
    #[test]
    fn accepts_what_nccl_ep_accepts() {
        // The alignment is ignored outside HIGH_THROUGHPUT EXPERT_MAJOR (was: ncclInvalidArgument
        // for a non-power of two in any layout, and FLAT kept it).
        let ht = params(Algorithm::HighThroughput);
        for a in [0, 1, 3, 64, 100] {
            assert_eq!(check_handle(&ht, Some(Layout::Flat), 8, a).unwrap().expert_alignment, 1);
        }
        let ll = params(Algorithm::LowLatency);
        for l in [Layout::ExpertMajor, Layout::RankMajor] {
            assert_eq!(check_handle(&ll, Some(l), 8, 3).unwrap().expert_alignment, 1);
        }
        assert_eq!(
            check_handle(&ht, Some(Layout::ExpertMajor), 8, 0)
                .unwrap()
                .expert_alignment,
            1
        );
        // HIGH_THROUGHPUT top-k is not bounded by the number of experts (unused columns are -1).
        let mut small = params(Algorithm::HighThroughput);
        small.num_experts = 8;
        small.local_experts = 1;
        assert_eq!(check_handle(&small, Some(Layout::Flat), 9, 0).unwrap().num_topk, 9);
        // ... but LOW_LATENCY's is, as NCCL EP's (ncclInvalidArgument).
        let mut small_ll = small.clone();
        small_ll.algorithm = Algorithm::LowLatency;
        assert_eq!(
            check_handle(&small_ll, Some(Layout::ExpertMajor), 9, 0)
                .unwrap_err()
                .code(),
            4
        );
        // HIGH_THROUGHPUT K <= 0 is NCCL EP's ncclInvalidUsage; LOW_LATENCY's ncclInvalidArgument.
        assert_eq!(check_handle(&ht, Some(Layout::Flat), 0, 0).unwrap_err().code(), 5);
        assert_eq!(check_handle(&ht, Some(Layout::Flat), -1, 0).unwrap_err().code(), 5);
        assert_eq!(check_handle(&ll, Some(Layout::RankMajor), -1, 0).unwrap_err().code(), 4);
    }

    #[test]
    fn mem_size_params_are_lenient() {
        let ll = params(Algorithm::LowLatency);
        let ht = params(Algorithm::HighThroughput);
        assert_eq!(mem_size_params(&ll, None, 8, 0).unwrap_err().code(), 4);
        assert_eq!(
            mem_size_params(&ll, Some(Layout::ExpertMajor), 0, 0)
                .unwrap_err()
                .code(),
            4
        );
        assert_eq!(mem_size_params(&ht, Some(Layout::Flat), -1, 0).unwrap_err().code(), 4);
        // A layout of the other mode, K past the mode's limits, any alignment: a size.
        let h = mem_size_params(&ll, Some(Layout::Flat), 300, 3).unwrap();
        assert_eq!(
            (h.layout, h.num_topk, h.expert_alignment),
            (Layout::ExpertMajor, 300, 1)
        );
        let h = mem_size_params(&ht, Some(Layout::RankMajor), 300, 3).unwrap();
        assert_eq!((h.layout, h.expert_alignment), (Layout::Flat, 1));
        let h = mem_size_params(&ht, Some(Layout::ExpertMajor), 8, 3).unwrap();
        assert_eq!(h.expert_alignment, 3);
        // Where InitHandle would accept, the size is InitHandle's.
        for (p, l, k, a) in [
            (&ll, Layout::ExpertMajor, 8, 0),
            (&ll, Layout::RankMajor, 32, 0),
            (&ht, Layout::Flat, 8, 0),
            (&ht, Layout::ExpertMajor, 8, 64),
        ] {
            assert_eq!(
                handle_mem_bytes(p, &mem_size_params(p, Some(l), k, a).unwrap()),
                handle_mem_bytes(p, &check_handle(p, Some(l), k, a).unwrap())
            );
        }
    }

    #[test]
    fn topk_tensor_rules() {
        let p = params(Algorithm::LowLatency);
        let h = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        let mk = |s: &[usize], dt: DType| TensorView::new(dt.raw(), s, 1).unwrap();
        assert!(check_topk_idx(&p, &h, &mk(&[128, 8], dtype::INT64)).is_ok());
        assert!(check_topk_idx(&p, &h, &mk(&[3, 8], dtype::INT32)).is_ok());
        assert!(check_topk_idx(&p, &h, &mk(&[129, 8], dtype::INT64)).is_err());
        assert!(check_topk_idx(&p, &h, &mk(&[4, 7], dtype::INT64)).is_err());
        assert!(check_topk_idx(&p, &h, &mk(&[4, 8], dtype::FLOAT32)).is_err());
        assert!(check_topk_idx(&p, &h, &mk(&[4, 8, 1], dtype::INT64)).is_err());
    }
}

/// The bytes `ncclEpInitHandle` needs for a handle's block, or why the handle cannot be made
/// (an HT block past the kernels' 32-bit indices: `ncclInvalidUsage`).
pub fn handle_mem_need(p: &GroupParams, h: &HandleParams) -> Result<usize> {
    match p.algorithm {
        Algorithm::LowLatency => Ok(handle_mem_bytes(p, h)),
        Algorithm::HighThroughput => Ok(crate::ht_layout::HtHandleLayout::new(p, h)?.total_bytes),
    }
}

/// Bytes of the per-handle metadata block (`ncclEpHandleMemSize`): LL keeps two counts per
/// source rank and, per received (source rank, slot), the source token id and K destination rows;
/// HT a header, a receive table, a send table and a backward table (core::ht_layout).
/// `usize::MAX` when the HT block would not fit in memory at all.
pub fn handle_mem_bytes(p: &GroupParams, h: &HandleParams) -> usize {
    match p.algorithm {
        Algorithm::LowLatency => crate::ll_layout::handle_mem_bytes(p.nranks, p.max_tokens, h.num_topk),
        Algorithm::HighThroughput => crate::ht_layout::HtHandleLayout::new(p, h).map_or(usize::MAX, |l| l.total_bytes),
    }
}

#[cfg(test)]
mod mem_tests {
    use super::tests_support::params;
    use super::*;

    #[test]
    fn ll_handle_mem_matches_formula() {
        let p = params(Algorithm::LowLatency);
        let h = check_handle(&p, Some(Layout::ExpertMajor), 8, 0).unwrap();
        // 4 * (2·8 + 8·128·9 + 128·8) = 41024 -> 41216 after 256-alignment (docs/LL.md).
        assert_eq!(handle_mem_bytes(&p, &h), 41216);
    }
}
