//! A validated, owned copy of a caller's tensor descriptor, and shape/dtype checks on it.

use crate::abi::enums::dtype;
use crate::core::error::Result;

/// What the library knows of one caller tensor after its descriptor was checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorView {
    pub dtype: i32,
    pub sizes: Vec<usize>,
    /// Device address of element 0 (0 for an empty tensor without data).
    pub data: u64,
}

/// A data type for a message; descriptors may carry any value (they are checked where used).
fn type_name(dt: i32) -> String {
    match dtype::elem_bytes(dt) {
        Some(_) => dtype::name(dt).to_string(),
        None => format!("datatype {dt}, which is not an ncclDataType_t"),
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
    pub fn ndim(&self) -> usize {
        self.sizes.len()
    }
    pub fn numel(&self) -> usize {
        self.sizes.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.sizes.contains(&0)
    }
    pub fn elem_bytes(&self) -> usize {
        dtype::elem_bytes(self.dtype).unwrap_or(1)
    }
    pub fn nbytes(&self) -> usize {
        self.numel() * self.elem_bytes()
    }
    pub fn dim(&self, i: usize) -> usize {
        self.sizes.get(i).copied().unwrap_or(0)
    }

    /// Checks rank, extents and data type; the message names the argument and both shapes.
    pub fn expect(&self, name: &str, dims: &[Dim], dtypes: &[i32]) -> Result<()> {
        let want = dims
            .iter()
            .map(|d| match d {
                Dim::Eq(n) => n.to_string(),
                Dim::AtLeast(n) => format!(">={n}"),
                Dim::Any => "*".into(),
            })
            .collect::<Vec<_>>()
            .join(", ");
        crate::ensure_arg!(
            self.ndim() == dims.len(),
            "{name} must be {}-D [{want}], got {}-D {:?}",
            dims.len(),
            self.ndim(),
            self.sizes
        );
        for (i, (d, &got)) in dims.iter().zip(&self.sizes).enumerate() {
            let ok = match *d {
                Dim::Eq(n) => got == n,
                Dim::AtLeast(n) => got >= n,
                Dim::Any => true,
            };
            crate::ensure_arg!(
                ok,
                "{name} must have shape [{want}], got {:?} (dimension {i})",
                self.sizes
            );
        }
        if !dtypes.is_empty() {
            crate::ensure_arg!(
                dtypes.contains(&self.dtype),
                "{name} must be {}, got {}",
                dtypes.iter().map(|&d| dtype::name(d)).collect::<Vec<_>>().join(" or "),
                type_name(self.dtype)
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

    fn t(sizes: &[usize], dt: i32) -> TensorView {
        TensorView {
            dtype: dt,
            sizes: sizes.to_vec(),
            data: 0x1000,
        }
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
        x.sizes = vec![1, 128];
        assert!(x.expect("x", &[Dim::Any, Dim::Eq(128)], &[]).is_err());
    }
}
