//! One source for what the host and the kernels share: the argument blocks the kernels take by
//! value, the device structs the host sizes or reads, and the constants both sides use.
//!
//! The Rust definitions are the source (`ll_params.rs`, `ht_params.rs`, the layout constants);
//! [`c_header`] writes them as C, committed as `kernels/ep_params.cuh` and prepended to every LL
//! and HT kernel source (NVRTC gets no include path). `tests/kernel_params.rs` fails while the
//! committed file differs from what [`c_header`] writes; `make header` rewrites it. Each struct
//! comes with static_asserts of its size, its alignment and every field's offset, all taken from
//! the Rust layout (`offset_of!`), so NVRTC rejects a C struct that lays out differently.

use crate::core::ht_layout::{HT_HDR_BYTES, HT_MAX_RANKS, HT_MAX_TOPK, HT_PIECES, HT_PTR_SLOTS};
use crate::runtime::ht_kernels::HT_THREADS;
use crate::runtime::ht_params::{HtHdr, HtParams};
use crate::runtime::kernels::LL_CLEAN_THREADS;
use crate::runtime::ll::LL_THREADS;
use crate::runtime::ll_params::{
    EP_STATE_BYTES, ERR_BLOCK_BYTES, EpState, LL_MAX_RANKS, LlParams, MASK_BLOCK_BYTES, MASK_DECIDE_OFF, PHASE_RECV,
    PHASE_SEND,
};
use std::fmt::Write;

/// The C spelling of a field type (ep_device.cuh's typedefs). Arrays are one level deep.
pub trait CType {
    const NAME: &'static str;
    /// Elements of an array field, None for a scalar.
    const LEN: Option<usize> = None;
}

impl CType for u64 {
    const NAME: &'static str = "u64";
}
impl CType for i64 {
    const NAME: &'static str = "i64";
}
impl CType for u32 {
    const NAME: &'static str = "u32";
}
impl CType for i32 {
    const NAME: &'static str = "int";
}
impl<T: CType, const N: usize> CType for [T; N] {
    const NAME: &'static str = T::NAME;
    const LEN: Option<usize> = Some(N);
}

/// One field as the Rust compiler laid it out.
#[derive(Clone, Copy, Debug)]
pub struct CField {
    pub name: &'static str,
    pub c_type: &'static str,
    pub len: Option<usize>,
    pub offset: usize,
    pub size: usize,
    /// The field's doc comment, one entry per line.
    pub doc: &'static [&'static str],
}

/// A `#[repr(C)]` struct the kernels see too (implemented by [`c_struct!`]).
pub trait CStruct {
    const NAME: &'static str;
    /// The Rust file that defines it (named in the generated C).
    const FILE: &'static str;
    const FIELDS: &'static [CField];
}

/// Defines a `#[repr(C)]` struct of `pub` fields of [`CType`] types and describes it for
/// [`c_header`]: the same tokens give the Rust struct and the C one.
macro_rules! c_struct {
    (
        $(#[$attr:meta])*
        pub struct $name:ident {
            $( $(#[doc = $doc:literal])* pub $field:ident : $ty:ty, )*
        }
    ) => {
        $(#[$attr])*
        #[repr(C)]
        pub struct $name {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl $crate::runtime::kernel_abi::CStruct for $name {
            const NAME: &'static str = stringify!($name);
            const FILE: &'static str = file!();
            const FIELDS: &'static [$crate::runtime::kernel_abi::CField] = &[
                $( $crate::runtime::kernel_abi::CField {
                    name: stringify!($field),
                    c_type: <$ty as $crate::runtime::kernel_abi::CType>::NAME,
                    len: <$ty as $crate::runtime::kernel_abi::CType>::LEN,
                    offset: ::std::mem::offset_of!($name, $field),
                    size: ::std::mem::size_of::<$ty>(),
                    doc: &[$($doc),*],
                }, )*
            ];
        }
    };
}
pub(crate) use c_struct;

/// Writes `T` as a C struct followed by its layout asserts. `pad_to`: the C struct is longer
/// than the Rust one (the host reads a prefix); an `int pad[]` fills it to that many bytes.
fn emit_struct<T: CStruct>(out: &mut String, pad_to: Option<usize>) {
    let (size, align) = (std::mem::size_of::<T>(), std::mem::align_of::<T>());
    let name = T::NAME;
    let file = T::FILE;
    let c_size = pad_to.unwrap_or(size);
    assert!(
        c_size >= size && (c_size - size).is_multiple_of(4),
        "{name}: pad_to {c_size}"
    );
    writeln!(out, "// {file}").unwrap();
    writeln!(out, "struct {name} {{").unwrap();
    for f in T::FIELDS {
        for line in f.doc {
            let line = line.strip_prefix(' ').unwrap_or(line);
            writeln!(out, "  //{}{line}", if line.is_empty() { "" } else { " " }).unwrap();
        }
        match f.len {
            Some(n) => writeln!(out, "  {} {}[{n}];", f.c_type, f.name).unwrap(),
            None => writeln!(out, "  {} {};", f.c_type, f.name).unwrap(),
        }
    }
    if c_size > size {
        writeln!(out, "  // the rest of the {c_size} bytes (not read by the host)").unwrap();
        writeln!(out, "  int pad[{}];", (c_size - size) / 4).unwrap();
    }
    writeln!(out, "}};").unwrap();
    let what = if c_size > size {
        format!("{c_size} bytes, the {size} of {file} padded")
    } else {
        format!("size of {file}")
    };
    writeln!(out, "static_assert(sizeof({name}) == {c_size}, \"{name}: {what}\");").unwrap();
    writeln!(
        out,
        "static_assert(alignof({name}) == {align}, \"{name}: alignment of {file}\");"
    )
    .unwrap();
    for f in T::FIELDS {
        writeln!(
            out,
            "static_assert(__builtin_offsetof({name}, {0}) == {1} && sizeof((({name}*)0)->{0}) == {2}, \"{name}.{0}: offset and size in {file}\");",
            f.name, f.offset, f.size
        )
        .unwrap();
    }
    out.push('\n');
}

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
        "// Generated from the Rust definitions by src/runtime/kernel_abi.rs (`make header`); do not edit:\n\
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
        (
            "src/runtime/ll.rs, src/runtime/kernels.rs",
            &c_consts![LL_THREADS, LL_CLEAN_THREADS],
        ),
        (
            "src/core/ht_layout.rs",
            &c_consts![HT_MAX_RANKS, HT_MAX_TOPK, HT_PIECES, HT_PTR_SLOTS, HT_HDR_BYTES],
        ),
        ("src/runtime/ht_kernels.rs", &c_consts![HT_THREADS]),
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
        assert!(h.contains("static_assert(sizeof(LlParams) == 728,"));
        assert!(h.contains("static_assert(sizeof(HtParams) == 784,"));
        assert!(h.contains("static_assert(sizeof(HtHdr) == 256,"));
        assert!(h.contains("static_assert(sizeof(EpState) == 64,"));
        assert!(h.contains("  u64 peers[64];\n"));
        assert!(h.contains("#define HT_PIECES 32\n"));
    }
}
