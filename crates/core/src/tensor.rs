//! A validated, owned copy of a caller's tensor descriptor, and shape/dtype checks on it.

use crate::enums::DType;
use crate::error::Result;

/// What the library knows of one caller tensor after its descriptor was checked. Built only by
/// [`TensorView::new`], so its element count is known not to overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorView {
    /// The descriptor's `datatype` as the caller wrote it: a descriptor may carry any value
    /// (NCCL EP checks a type only where a call uses the tensor), so it is decoded on use
    /// ([`TensorView::dtype`]), which refuses values that are no data type.
    raw_dtype: i32,
    /// The extents, inline (no allocation per descriptor on the call path: issue 15's host
    /// time); entries past `ndim` are 0.
    sizes: [usize; MAX_DIMS],
    ndim: u8,
    numel: usize,
    /// Device address of element 0 (0 for an empty tensor without data, and for a window-backed
    /// tensor until the runtime resolved its window).
    pub data: u64,
    /// The NCCL window the tensor lives in (`win_hdl`, `win_offset`), when the caller gave one.
    /// The rules only ask whether there is one ([`TensorView::is_windowed`]); the runtime turns
    /// it into `data` and into peers' addresses.
    pub window: Option<Window>,
}

/// A tensor's place in a registered NCCL window: the opaque `ncclWindow_t` as an address and the
/// byte offset of element 0 in it. Every rank must use the same offset in its own copy of a
/// symmetric window: peers' addresses are computed with the caller's own offset, as NCCL EP does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub hdl: u64,
    pub offset: u64,
}

/// The most extents a descriptor may have (the ABI's `ndim` limit).
pub const MAX_DIMS: usize = 8;

/// A data type for a message; descriptors may carry any value (they are checked where used).
fn type_name(raw: i32) -> String {
    match DType::from_raw(raw) {
        Some(d) => d.name().to_string(),
        None => format!("datatype {raw}, which is not an ncclDataType_t"),
    }
}

/// One expected extent in a shape check.
#[derive(Clone, Copy, Debug)]
pub enum Dim {
    /// Exactly this many.
    Eq(usize),
    /// At least this many.
    AtLeast(usize),
    /// Anything.
    Any,
}

impl TensorView {
    /// A view of `sizes` (outermost first) of type `raw_dtype` at `data`. Fails when the element
    /// count, or the byte count for a known type, does not fit in `usize`.
    pub fn new(raw_dtype: i32, sizes: impl AsRef<[usize]>, data: u64) -> Result<Self> {
        let sizes = sizes.as_ref();
        crate::ensure_arg!(sizes.len() <= MAX_DIMS, "{} extents, at most {MAX_DIMS}", sizes.len());
        let numel = sizes
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .ok_or_else(|| crate::invalid_arg!("extents {sizes:?} overflow the element count"))?;
        if let Some(d) = DType::from_raw(raw_dtype) {
            crate::ensure_arg!(
                numel.checked_mul(d.elem_bytes()).is_some(),
                "extents {sizes:?} of {} overflow the byte count",
                d.name()
            );
        }
        let mut inline = [0usize; MAX_DIMS];
        inline[..sizes.len()].copy_from_slice(sizes);
        Ok(Self {
            raw_dtype,
            sizes: inline,
            ndim: sizes.len() as u8,
            numel,
            data,
            window: None,
        })
    }
    /// The same view, backed by `window` (a `win_hdl` of 0 means none).
    pub fn with_window(mut self, hdl: u64, offset: u64) -> Self {
        self.window = (hdl != 0).then_some(Window { hdl, offset });
        self
    }
    /// Whether the caller put the tensor in an NCCL window (`win_hdl` set, `data` set or not).
    pub fn is_windowed(&self) -> bool {
        self.window.is_some()
    }
    /// The descriptor's `datatype` value as the caller wrote it.
    pub fn raw_dtype(&self) -> i32 {
        self.raw_dtype
    }
    /// The data type; an error for a value that is no `ncclDataType_t`.
    pub fn dtype(&self) -> Result<DType> {
        DType::from_raw(self.raw_dtype).ok_or_else(|| crate::invalid_arg!("a tensor has {}", type_name(self.raw_dtype)))
    }
    /// The data type's name for a message, or "datatype N, which is not an ncclDataType_t".
    pub fn type_name(&self) -> String {
        type_name(self.raw_dtype)
    }
    /// Whether the data type is `d`.
    pub fn is(&self, d: DType) -> bool {
        self.raw_dtype == d.raw()
    }
    pub fn sizes(&self) -> &[usize] {
        &self.sizes[..self.ndim as usize]
    }
    pub fn ndim(&self) -> usize {
        self.ndim as usize
    }
    pub fn numel(&self) -> usize {
        self.numel
    }
    pub fn is_empty(&self) -> bool {
        self.numel == 0
    }
    /// Bytes per element; an error for a value that is no data type.
    pub fn elem_bytes(&self) -> Result<usize> {
        Ok(self.dtype()?.elem_bytes())
    }
    /// Bytes of the whole tensor (cannot overflow: checked by [`TensorView::new`]).
    pub fn nbytes(&self) -> Result<usize> {
        Ok(self.numel * self.elem_bytes()?)
    }
    pub fn dim(&self, i: usize) -> usize {
        self.sizes().get(i).copied().unwrap_or(0)
    }

    /// Checks rank, extents and data type; the message names the argument and both shapes.
    pub fn expect(&self, name: &str, dims: &[Dim], dtypes: &[DType]) -> Result<()> {
        // The expected shape as text, built only for a message (this runs on every call).
        let want = || {
            dims.iter()
                .map(|d| match d {
                    Dim::Eq(n) => n.to_string(),
                    Dim::AtLeast(n) => format!(">={n}"),
                    Dim::Any => "*".into(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        crate::ensure_arg!(
            self.ndim() == dims.len(),
            "{name} must be {}-D [{}], got {}-D {:?}",
            dims.len(),
            want(),
            self.ndim(),
            self.sizes()
        );
        for (i, (d, &got)) in dims.iter().zip(self.sizes()).enumerate() {
            let ok = match *d {
                Dim::Eq(n) => got == n,
                Dim::AtLeast(n) => got >= n,
                Dim::Any => true,
            };
            crate::ensure_arg!(
                ok,
                "{name} must have shape [{}], got {:?} (dimension {i})",
                want(),
                self.sizes()
            );
        }
        if !dtypes.is_empty() {
            crate::ensure_arg!(
                dtypes.iter().any(|&d| self.is(d)),
                "{name} must be {}, got {}",
                dtypes.iter().map(|d| d.name()).collect::<Vec<_>>().join(" or "),
                type_name(self.raw_dtype)
            );
        }
        crate::ensure_arg!(
            self.data != 0 || self.is_empty(),
            "{name} has no data pointer but is not empty"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::enums::dtype;

    fn t(sizes: &[usize], dt: impl Into<i32>) -> TensorView {
        TensorView::new(dt.into(), sizes, 0x1000).unwrap()
    }

    #[test]
    fn extents_are_kept_inline_up_to_max_dims() {
        let x = t(&[2, 3, 4], dtype::FLOAT32);
        assert_eq!(
            (x.sizes(), x.ndim(), x.numel(), x.dim(2), x.dim(3)),
            (&[2, 3, 4][..], 3, 24, 4, 0)
        );
        assert_eq!(t(&[1; MAX_DIMS], dtype::FLOAT32).ndim(), MAX_DIMS);
        let e = TensorView::new(dtype::FLOAT32.into(), [1; MAX_DIMS + 1], 0x1000).unwrap_err();
        assert!(e.msg.contains("at most 8"), "{}", e.msg);
        // The shape message still names both shapes (built only on failure).
        let e = x
            .expect("x", &[Dim::Eq(2), Dim::AtLeast(4), Dim::Any], &[])
            .unwrap_err();
        assert!(
            e.msg.contains("[2, >=4, *]") && e.msg.contains("[2, 3, 4]"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn expect_checks_rank_extent_and_dtype() {
        let x = t(&[4, 128], dtype::BFLOAT16);
        assert!(x.expect("x", &[Dim::Eq(4), Dim::Eq(128)], &[dtype::BFLOAT16]).is_ok());
        assert!(x.expect("x", &[Dim::AtLeast(3), Dim::Any], &[]).is_ok());
        let e = x.expect("x", &[Dim::Eq(4)], &[]).unwrap_err();
        assert!(e.msg.contains("1-D"), "{}", e.msg);
        let e = x.expect("x", &[Dim::Eq(5), Dim::Eq(128)], &[]).unwrap_err();
        assert!(e.msg.contains("dimension 0"), "{}", e.msg);
        let e = x
            .expect("x", &[Dim::Eq(4), Dim::Eq(128)], &[dtype::FLOAT32])
            .unwrap_err();
        assert!(
            e.msg.contains("ncclFloat32") && e.msg.contains("ncclBfloat16"),
            "{}",
            e.msg
        );
        assert_eq!(e.code(), 4);
    }

    #[test]
    fn unknown_types_are_named_by_value() {
        let e = t(&[4], 13).expect("x", &[Dim::Eq(4)], &[dtype::UINT8]).unwrap_err();
        assert!(e.msg.contains("must be ncclUint8, got datatype 13"), "{}", e.msg);
        assert!(t(&[4], -1).expect("x", &[Dim::Eq(4)], &[]).is_ok());
    }

    #[test]
    fn empty_tensors_may_lack_data() {
        let mut x = t(&[0, 128], dtype::BFLOAT16);
        x.data = 0;
        assert!(x.expect("x", &[Dim::Any, Dim::Eq(128)], &[]).is_ok());
        let mut x = t(&[1, 128], dtype::BFLOAT16);
        x.data = 0;
        assert!(x.expect("x", &[Dim::Any, Dim::Eq(128)], &[]).is_err());
    }

    /// Extents whose product (or byte count) wraps are refused when the view is built, so no
    /// rule ever sees a wrapped element count (`[2^40, 2^40]` used to have numel 0 in release).
    #[test]
    fn overflowing_extents_are_refused() {
        let big = 1usize << 40;
        let e = TensorView::new(dtype::BFLOAT16.raw(), vec![big, big], 0x1000).unwrap_err();
        assert_eq!(e.code(), 4);
        assert!(e.msg.contains("overflow"), "{}", e.msg);
        assert!(TensorView::new(dtype::BFLOAT16.raw(), vec![usize::MAX / 2 + 1], 0x1000).is_err());
        assert!(TensorView::new(dtype::UINT8.raw(), vec![usize::MAX / 2 + 1], 0x1000).is_ok());
        assert!(TensorView::new(-1, vec![usize::MAX, 2], 0x1000).is_err());
        let ok = TensorView::new(dtype::FLOAT32.raw(), vec![0, usize::MAX], 0).unwrap();
        assert_eq!((ok.numel(), ok.nbytes().unwrap()), (0, 0));
    }

    #[test]
    fn unknown_types_have_no_size() {
        let x = t(&[4], 13);
        assert_eq!(x.elem_bytes().unwrap_err().code(), 4);
        assert!(x.dtype().unwrap_err().msg.contains("datatype 13"));
        assert_eq!(t(&[4], dtype::FLOAT8E4M3).elem_bytes().unwrap(), 1);
    }
}
