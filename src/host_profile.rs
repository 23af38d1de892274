//! `NCCL_EP_HOST_PROFILE=1`: where the host time of a call goes (issue 15 asks ≤ 5 µs per
//! `ncclEpDispatch`). The ABI boundary starts a record per call, every layer marks the points it
//! passes (`mark("locked")`, ...), and each 1000 calls of a thread print one line on stderr with
//! the median time of each segment (from the previous mark to this one) and of the whole call.
//! A leaf module like `log`: every layer may mark, none through another. Off, a mark is one
//! load of a cached flag.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Instant;

const REPORT_EVERY: usize = 1000;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("NCCL_EP_HOST_PROFILE").is_ok_and(|v| v == "1"))
}

#[derive(Default)]
struct Calls {
    /// The marks' labels in the order of the first call (later calls must pass the same ones).
    labels: Vec<&'static str>,
    /// Per call: the segments' microseconds, then the total.
    samples: Vec<Vec<f64>>,
}

#[derive(Default)]
struct State {
    op: Option<&'static str>,
    start: Option<Instant>,
    marks: Vec<(&'static str, Instant)>,
    calls: Vec<(&'static str, Calls)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// Starts the record of one call of `op` (at the ABI boundary).
pub fn start(op: &'static str) {
    if !enabled() {
        return;
    }
    STATE.with_borrow_mut(|s| {
        s.op = Some(op);
        s.marks.clear();
        s.start = Some(Instant::now());
    });
}

/// Marks that the current call reached `label`.
pub fn mark(label: &'static str) {
    if !enabled() {
        return;
    }
    let now = Instant::now();
    STATE.with_borrow_mut(|s| {
        if s.start.is_some() {
            s.marks.push((label, now));
        }
    });
}

/// Ends the current call's record; every REPORT_EVERY calls of an op, prints its medians.
pub fn finish() {
    if !enabled() {
        return;
    }
    let end = Instant::now();
    STATE.with_borrow_mut(|s| {
        let (Some(op), Some(t0)) = (s.op.take(), s.start.take()) else {
            return;
        };
        let labels: Vec<&'static str> = s.marks.iter().map(|m| m.0).collect();
        let mut prev = t0;
        let mut row: Vec<f64> = s
            .marks
            .iter()
            .map(|&(_, t)| {
                let d = t.duration_since(prev).as_secs_f64() * 1e6;
                prev = t;
                d
            })
            .collect();
        row.push(end.duration_since(prev).as_secs_f64() * 1e6);
        row.push(end.duration_since(t0).as_secs_f64() * 1e6);
        let idx = match s.calls.iter().position(|c| c.0 == op) {
            Some(i) => i,
            None => {
                s.calls.push((op, Calls::default()));
                s.calls.len() - 1
            }
        };
        let c = &mut s.calls[idx].1;
        if c.labels.is_empty() {
            c.labels = labels.clone();
        }
        if c.labels != labels {
            return; // another path through the call (an error, say): not this profile's
        }
        c.samples.push(row);
        if c.samples.len() == REPORT_EVERY {
            eprintln!("{}", report(op, &c.labels, &c.samples));
            c.samples.clear();
        }
    });
}

/// One line: the median of each segment and of the total (pure).
fn report(op: &str, labels: &[&str], samples: &[Vec<f64>]) -> String {
    let median = |i: usize| {
        let mut v: Vec<f64> = samples.iter().map(|r| r[i]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut line = format!("NCCL EP HOST PROFILE {op} ({} calls, median µs):", samples.len());
    for (i, l) in labels.iter().enumerate() {
        line += &format!(" {l} {:.2}", median(i));
    }
    line += &format!(
        " | return {:.2} | total {:.2}",
        median(labels.len()),
        median(labels.len() + 1)
    );
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_takes_each_segments_median() {
        let rows = vec![
            vec![1.0, 2.0, 0.5, 3.5],
            vec![3.0, 4.0, 0.5, 7.5],
            vec![2.0, 3.0, 0.5, 5.5],
        ];
        assert_eq!(
            report("ncclEpDispatch", &["read", "launched"], &rows),
            "NCCL EP HOST PROFILE ncclEpDispatch (3 calls, median µs): read 2.00 launched 3.00 | return 0.50 | total 5.50"
        );
    }
}
