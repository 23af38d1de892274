//! One source for what the host and the kernels share: the argument blocks the kernels take by
//! value, the device structs the host sizes or reads, and the constants both sides use.
//!
//! The Rust definitions are the source (`ll_params.rs`, `ht_params.rs`, the layout constants);
//! this module is the machinery (`c_struct!` records each struct's fields with their offsets,
//! [`emit_struct`] writes one as C); `runtime::kernel_header::c_header` lists what is shared and
//! writes it as C, committed as `kernels/ep_params.cuh` and prepended to every LL
//! and HT kernel source (NVRTC gets no include path). `tests/kernel_params.rs` fails while the
//! committed file differs from what `c_header` writes; `make header` rewrites it. Each struct
//! comes with static_asserts of its size, its alignment and every field's offset, all taken from
//! the Rust layout (`offset_of!`), so NVRTC rejects a C struct that lays out differently.

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
pub fn emit_struct<T: CStruct>(out: &mut String, pad_to: Option<usize>) {
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
    // Field offsets need `__builtin_offsetof`, which NVRTC 13.0 does not have (an H200 with
    // CUDA 13.0 refused every kernel over it) and 13.5 has: the kernels compile them only under
    // EP_LAYOUT_CHECKS, which tests/kernel_params.rs sets (sizes and alignment are always checked).
    writeln!(out, "#ifdef EP_LAYOUT_CHECKS").unwrap();
    for f in T::FIELDS {
        writeln!(
            out,
            "static_assert(__builtin_offsetof({name}, {0}) == {1} && sizeof((({name}*)0)->{0}) == {2}, \"{name}.{0}: offset and size in {file}\");",
            f.name, f.offset, f.size
        )
        .unwrap();
    }
    writeln!(out, "#endif").unwrap();
    out.push('\n');
}
