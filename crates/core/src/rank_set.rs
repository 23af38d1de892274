//! Sets of ranks as bit masks, the form the kernels take (`u64`, bit r: rank r; LL and HT
//! groups have at most 64 ranks, so ranks from 64 on are never members).

/// The ranks below `nranks` (and below 64) for which `pred` holds.
pub fn ranks_where(nranks: usize, pred: impl Fn(usize) -> bool) -> u64 {
    (0..nranks.min(64)).filter(|&r| pred(r)).fold(0, |m, r| m | 1u64 << r)
}

/// Whether rank `r` is in `set` (false from 64 on).
pub fn contains(set: u64, r: usize) -> bool {
    r < 64 && set >> r & 1 == 1
}

/// The members of `set` below `nranks`, in rank order.
pub fn members(set: u64, nranks: usize) -> impl Iterator<Item = usize> {
    (0..nranks.min(64)).filter(move |&r| contains(set, r))
}

/// The members of `set` as "0, 5, 7", for messages.
pub fn list(set: u64) -> String {
    members(set, 64).map(|r| r.to_string()).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_of_ranks() {
        assert_eq!(ranks_where(6, |r| r % 2 == 1), 0b101010);
        assert_eq!(ranks_where(70, |r| r == 63 || r == 65), 1u64 << 63, "no bit from 64 on");
        assert_eq!(ranks_where(0, |_| true), 0);
        assert!(contains(0b100, 2) && !contains(0b100, 1) && !contains(u64::MAX, 64));
        assert_eq!(members(0b1011_0000, 8).collect::<Vec<_>>(), vec![4, 5, 7]);
        assert_eq!(
            members(0b1_0000_0010, 4).collect::<Vec<_>>(),
            vec![1],
            "bits past nranks ignored"
        );
        assert_eq!(list(0b1010_0001), "0, 5, 7");
        assert_eq!(list(0), "");
    }
}
