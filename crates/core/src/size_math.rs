//! Checked size arithmetic for the buffer planners: an overflow is an `ncclInvalidArgument`
//! naming the buffer, never a wrapped size.

use crate::error::Result;

pub fn mul(a: usize, b: usize, buffer: &str) -> Result<usize> {
    a.checked_mul(b)
        .ok_or_else(|| crate::invalid_arg!("the {buffer} buffer size overflows ({a} x {b})"))
}

pub fn add(a: usize, b: usize, buffer: &str) -> Result<usize> {
    a.checked_add(b)
        .ok_or_else(|| crate::invalid_arg!("the {buffer} buffer size overflows ({a} + {b})"))
}

/// `x` rounded up to a multiple of `a` (a > 0).
pub fn align_up(x: usize, a: usize, buffer: &str) -> Result<usize> {
    Ok(add(x, a - 1, buffer)? / a * a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_is_an_error_naming_the_buffer() {
        assert_eq!(mul(3, 4, "x").unwrap(), 12);
        assert_eq!(align_up(257, 256, "x").unwrap(), 512);
        let e = mul(usize::MAX, 2, "low-latency").unwrap_err();
        assert!(e.msg.contains("low-latency buffer size overflows"), "{}", e.msg);
        assert!(add(usize::MAX, 1, "x").is_err());
        assert!(align_up(usize::MAX, 256, "x").is_err());
    }
}
