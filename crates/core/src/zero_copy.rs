//! `config->zero_copy` and window-backed tensors: which payloads go straight into a caller's NCCL
//! window, and what `NCCL_EP_ZERO_COPY_ON` demands (docs/ZERO_COPY.md). The rules only need to
//! know whether a tensor is windowed ([`TensorView::is_windowed`]); the runtime resolves windows
//! into addresses.

use crate::enums::Layout;
use crate::error::Result;
use crate::tensor::TensorView;

/// `ncclEpZeroCopyMode_t`. NCCL EP treats AUTO and OFF alike (OFF disables nothing: a windowed
/// output is still written directly where the path exists) and acts only on ON; any value other
/// than OFF and ON behaves as AUTO (NCCL EP compares with ON only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ZeroCopy {
    #[default]
    Auto,
    Off,
    On,
}

impl ZeroCopy {
    /// Every value is accepted: 1 is OFF, 2 is ON, anything else AUTO.
    pub fn from_raw(v: i32) -> Self {
        match v {
            1 => Self::Off,
            2 => Self::On,
            _ => Self::Auto,
        }
    }
    pub fn is_on(self) -> bool {
        self == Self::On
    }
}

/// `ncclEpDispQuant_t` values that have a direct LOW_LATENCY path (NONE and QUANT_FWD: the
/// payload travels as the caller gave it, so it can land in the caller's output as is).
const QUANT_NONE: i32 = crate::ll_recipes::LlRecipe::None as i32;
const QUANT_FWD: i32 = crate::ll_recipes::LlRecipe::Forward as i32;

/// Whether a dispatch with this `quant_recipe` value can store its payload straight into the
/// receiver's window (NONE and QUANT_FWD).
fn recipe_has_direct_path(quant: i32) -> bool {
    quant == QUANT_NONE || quant == QUANT_FWD
}

/// Whether a LOW_LATENCY dispatch's token payload can go straight into the receivers' windows,
/// the group aside (it must also be NVLink-only): a RANK_MAJOR handle, recipe NONE or QUANT_FWD,
/// `outputs->tokens` windowed.
pub fn ll_tokens_may_go_direct(layout: Layout, quant: i32, out_tokens: &TensorView) -> bool {
    layout == Layout::RankMajor && recipe_has_direct_path(quant) && out_tokens.is_windowed()
}

/// Which LOW_LATENCY dispatch payloads the senders store straight into the receiver's window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LlDirect {
    /// `outputs->tokens`: row `[src_rank][slot]` of every receiver's window.
    pub tokens: bool,
    /// `outputs->scales` (QUANT_FWD only).
    pub scales: bool,
}

impl LlDirect {
    pub fn any(self) -> bool {
        self.tokens || self.scales
    }
}

/// LOW_LATENCY dispatch: a payload goes direct when the group is NVLink-only (every peer's
/// window is mapped here: `nvlink_only`), the handle is RANK_MAJOR, the recipe is NONE or
/// QUANT_FWD and that output is windowed; tokens and scales independently. Under ON at least one
/// payload must qualify (NCCL EP: `ncclInvalidArgument`), under AUTO/OFF nothing is required.
pub fn ll_dispatch_direct(
    mode: ZeroCopy,
    layout: Layout,
    quant: i32,
    out_tokens: &TensorView,
    out_scales: Option<&TensorView>,
    nvlink_only: bool,
) -> Result<LlDirect> {
    let recipe_ok = recipe_has_direct_path(quant);
    let ok = nvlink_only && layout == Layout::RankMajor && recipe_ok;
    let d = LlDirect {
        tokens: nvlink_only && ll_tokens_may_go_direct(layout, quant, out_tokens),
        scales: ok && quant == QUANT_FWD && out_scales.is_some_and(TensorView::is_windowed),
    };
    if mode.is_on() && !d.any() {
        let why = if !nvlink_only {
            "requires every peer to be reachable over NVLink (an NVLink-only group)"
        } else if layout != Layout::RankMajor {
            "requires an NCCL_EP_LAYOUT_RANK_MAJOR handle"
        } else if !recipe_ok {
            "is not available with this quant_recipe (only NONE and QUANT_FWD)"
        } else {
            "requires outputs->tokens or outputs->scales to be backed by an NCCL window \
             (win_hdl from ncclCommWindowRegister)"
        };
        return Err(crate::invalid_arg!(
            "config->zero_copy is NCCL_EP_ZERO_COPY_ON: low-latency dispatch zero-copy {why}; \
             or create the group with zero_copy AUTO"
        ));
    }
    Ok(d)
}

/// HIGH_THROUGHPUT dispatch: ON needs `outputs->tokens` windowed (NCCL EP:
/// `ncclInvalidArgument`). QUANT_FWD's pairing of token and scale outputs (both window-backed or
/// both plain, in every mode) is a recipe rule: `ht_rules::check_dispatch`.
pub fn ht_dispatch(mode: ZeroCopy, out_tokens: &TensorView) -> Result<()> {
    crate::ensure_arg!(
        !mode.is_on() || out_tokens.is_windowed(),
        "config->zero_copy is NCCL_EP_ZERO_COPY_ON: ncclEpDispatch outputs->tokens must be backed by a \
         user-registered NCCL window (win_hdl from ncclCommWindowRegister)"
    );
    Ok(())
}

/// HIGH_THROUGHPUT combine: ON needs `inputs->tokens` windowed. (LOW_LATENCY combine is never
/// zero-copy, whatever the mode: NCCL EP forces its kernel's flag off.)
pub fn ht_combine(mode: ZeroCopy, in_tokens: &TensorView) -> Result<()> {
    crate::ensure_arg!(
        !mode.is_on() || in_tokens.is_windowed(),
        "config->zero_copy is NCCL_EP_ZERO_COPY_ON: ncclEpCombine inputs->tokens must be backed by a \
         user-registered NCCL window (win_hdl from ncclCommWindowRegister)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enums::dtype;

    fn plain() -> TensorView {
        TensorView::new(dtype::BFLOAT16.raw(), vec![8, 128], 0x1000).unwrap()
    }
    fn win() -> TensorView {
        plain().with_window(0xABC0, 4096)
    }

    #[test]
    fn modes_decode_like_nccl_ep() {
        assert_eq!(ZeroCopy::from_raw(0), ZeroCopy::Auto);
        assert_eq!(ZeroCopy::from_raw(1), ZeroCopy::Off);
        assert_eq!(ZeroCopy::from_raw(2), ZeroCopy::On);
        for v in [-1, 3, 7, i32::MIN, i32::MAX] {
            assert_eq!(ZeroCopy::from_raw(v), ZeroCopy::Auto, "{v}");
        }
        assert!(!win().with_window(0, 5).is_windowed(), "win_hdl NULL is no window");
        assert_eq!(win().window.unwrap().offset, 4096);
    }

    #[test]
    fn ll_direct_needs_nvlink_rank_major_and_a_plain_recipe() {
        use Layout::{ExpertMajor as Em, RankMajor as Rm};
        for mode in [ZeroCopy::Auto, ZeroCopy::Off, ZeroCopy::On] {
            let d = ll_dispatch_direct(mode, Rm, 0, &win(), None, true).unwrap();
            assert_eq!(
                d,
                LlDirect {
                    tokens: true,
                    scales: false
                },
                "{mode:?}"
            );
            // QUANT_FWD: tokens and scales independently
            let d = ll_dispatch_direct(mode, Rm, 1, &plain(), Some(&win()), true).unwrap();
            assert_eq!(
                d,
                LlDirect {
                    tokens: false,
                    scales: true
                }
            );
            let d = ll_dispatch_direct(mode, Rm, 1, &win(), Some(&win()), true).unwrap();
            assert_eq!(
                d,
                LlDirect {
                    tokens: true,
                    scales: true
                }
            );
        }
        // AUTO and OFF: never an error, direct only where eligible
        for mode in [ZeroCopy::Auto, ZeroCopy::Off] {
            assert!(!ll_dispatch_direct(mode, Em, 0, &win(), None, true).unwrap().any());
            assert!(!ll_dispatch_direct(mode, Rm, 2, &win(), None, true).unwrap().any());
            assert!(!ll_dispatch_direct(mode, Rm, 0, &win(), None, false).unwrap().any());
            assert!(!ll_dispatch_direct(mode, Rm, 0, &plain(), None, true).unwrap().any());
            // NONE never forwards scales
            assert!(
                !ll_dispatch_direct(mode, Rm, 0, &plain(), Some(&win()), true)
                    .unwrap()
                    .any()
            );
        }
        // ON: each missing condition is ncclInvalidArgument naming it
        for (layout, quant, out, nv, needle) in [
            (Em, 0, win(), true, "RANK_MAJOR"),
            (Rm, 2, win(), true, "quant_recipe"),
            (Rm, 0, win(), false, "NVLink"),
            (Rm, 0, plain(), true, "NCCL window"),
        ] {
            let e = ll_dispatch_direct(ZeroCopy::On, layout, quant, &out, None, nv).unwrap_err();
            assert_eq!(e.code(), 4, "{}", e.msg);
            assert!(e.msg.contains(needle) && e.msg.contains("ZERO_COPY_ON"), "{}", e.msg);
        }
    }

    #[test]
    fn ht_on_needs_windows() {
        for mode in [ZeroCopy::Auto, ZeroCopy::Off, ZeroCopy::On] {
            assert!(ht_dispatch(mode, &win()).is_ok());
            assert!(ht_combine(mode, &win()).is_ok());
        }
        for mode in [ZeroCopy::Auto, ZeroCopy::Off] {
            assert!(ht_dispatch(mode, &plain()).is_ok());
            assert!(ht_combine(mode, &plain()).is_ok());
        }
        let e = ht_dispatch(ZeroCopy::On, &plain()).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e.msg.contains("outputs->tokens"), "{}", e.msg);
        let e = ht_combine(ZeroCopy::On, &plain()).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e.msg.contains("inputs->tokens"), "{}", e.msg);
    }
}
