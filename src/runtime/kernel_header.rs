//! The text of `kernels/ep_params.cuh`: every struct and constant the kernels share with the
//! host, written as C by `runtime::kernel_abi` from the Rust definitions (see that module).

use crate::runtime::ht_params::{HT_THREADS, HtHdr, HtParams};
use crate::runtime::kernel_abi::emit_struct;
use crate::runtime::ll_params::{
    EP_STATE_BYTES, ERR_BLOCK_BYTES, EpState, LL_CLEAN_THREADS, LL_MAX_RANKS, LL_THREADS, LlParams, MASK_BLOCK_BYTES,
    MASK_DECIDE_OFF, PHASE_RECV, PHASE_SEND,
};
use ep_core::ht_layout::{HT_HDR_BYTES, HT_MAX_RANKS, HT_MAX_TOPK, HT_PIECES, HT_PTR_SLOTS};
use std::fmt::Write;

/// `(name, value)` of every constant the kernels share with the host, C name = Rust name.
macro_rules! c_consts {
    ($($c:ident),* $(,)?) => {
        [$((stringify!($c), $c.to_string())),*]
    };
}

/// The text of `kernels/ep_params.cuh`.
pub fn c_header() -> String {
    let mut out = String::new();
    out.push_str(
        "// Generated from the Rust definitions by src/runtime/kernel_header.rs (`make header`); do not edit:\n\
         // change the Rust side and regenerate (tests/kernel_params.rs fails while this file is stale).\n\
         // The runtime prepends it to every LL and HT kernel source, after kernels/ep_device.cuh (u64,\n\
         // i64, u32). Header-free on purpose: NVRTC compiles the kernels with no include path.\n\
         #pragma once\n\n",
    );
    let groups: [(&str, &[(&str, String)]); 4] = [
        (
            "src/runtime/ll_params.rs",
            &c_consts![
                LL_MAX_RANKS,
                EP_STATE_BYTES,
                MASK_BLOCK_BYTES,
                MASK_DECIDE_OFF,
                ERR_BLOCK_BYTES,
                PHASE_SEND,
                PHASE_RECV
            ],
        ),
        ("src/runtime/ll_params.rs", &c_consts![LL_THREADS, LL_CLEAN_THREADS]),
        (
            "crates/core/src/ht_layout.rs",
            &c_consts![HT_MAX_RANKS, HT_MAX_TOPK, HT_PIECES, HT_PTR_SLOTS, HT_HDR_BYTES],
        ),
        ("src/runtime/ht_params.rs", &c_consts![HT_THREADS]),
    ];
    for (file, consts) in groups {
        writeln!(out, "// {file}").unwrap();
        for (name, value) in consts {
            writeln!(out, "#define {name} {value}").unwrap();
        }
        out.push('\n');
    }
    emit_struct::<EpState>(&mut out, None);
    emit_struct::<LlParams>(&mut out, None);
    emit_struct::<HtParams>(&mut out, None);
    emit_struct::<HtHdr>(&mut out, Some(HT_HDR_BYTES));
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::kernel_abi::CStruct;

    /// Fields are listed in declaration order and tile the struct: a field the macro missed or
    /// described at the wrong offset shows up as a gap or an overlap.
    fn tiles<T: CStruct>() {
        let mut end = 0usize;
        for f in T::FIELDS {
            let align = f.size / f.len.unwrap_or(1);
            assert_eq!(f.offset, end.next_multiple_of(align), "{}.{}", T::NAME, f.name);
            end = f.offset + f.size;
        }
        assert_eq!(
            end.next_multiple_of(std::mem::align_of::<T>()),
            std::mem::size_of::<T>(),
            "{}",
            T::NAME
        );
    }

    #[test]
    fn described_fields_tile_each_struct() {
        tiles::<EpState>();
        tiles::<LlParams>();
        tiles::<HtParams>();
        tiles::<HtHdr>();
    }

    #[test]
    fn header_asserts_every_field() {
        let h = c_header();
        for (name, n) in [
            ("EpState", EpState::FIELDS.len()),
            ("LlParams", LlParams::FIELDS.len()),
            ("HtParams", HtParams::FIELDS.len()),
            ("HtHdr", HtHdr::FIELDS.len()),
        ] {
            assert_eq!(h.matches(&format!("__builtin_offsetof({name}, ")).count(), n, "{name}");
        }
        assert!(h.contains("static_assert(sizeof(LlParams) == 1312,"));
        assert!(h.contains("static_assert(sizeof(HtParams) == 824,"));
        assert!(h.contains("static_assert(sizeof(HtHdr) == 256,"));
        assert!(h.contains("static_assert(sizeof(EpState) == 64,"));
        assert!(h.contains("  u64 peers[64];\n"));
        assert!(h.contains("#define HT_PIECES 32\n"));
    }
}
