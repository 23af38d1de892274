//! Watchdog over the exchanges with remote ranks (docs/MULTINODE.md, "Masks and dead peers").
//!
//! NCCL point-to-point with a remote rank that died, or that skipped an operation, never
//! completes: NCCL's kernel spins on the caller's stream, our receive kernel never starts, and
//! none of the GPU timeouts of docs/LL.md can fire. So the host watches instead: every exchange
//! queued outside a graph capture is framed by two events, and a thread per group checks the
//! oldest outstanding exchange against the group's timeout, counted from when its first event
//! was seen done (the exchange had started on the GPU; work queued ahead never counts). Past it, the group's
//! asynchronous error is raised (`ncclEpGetAsyncError`), the remote ranks are named in the log,
//! and, only when the caller opted in with `NCCL_EP_REVOKE_ON_REMOTE_TIMEOUT=1`, the caller's
//! communicator is revoked (`ncclCommRevoke`, NCCL 2.28.7+), which stops NCCL's kernel so that
//! the stream moves on; the communicator then serves only for the application's recovery
//! (`ncclCommShrink` without the dead rank, or destroy), which stays the application's, as in
//! NCCL EP's own documentation. (Not `ncclCommAbort`: it frees the caller's communicator under
//! the caller's feet.) Exchanges captured into a CUDA graph are not watched (their replays are the
//! caller's launches, invisible here).

use crate::cuda::context::CtxGuard;
use crate::cuda::memory::{Event, Stream, stream_is_capturing};
use crate::sys::ncclComm_t;
use crate::transport::nccl::Nccl;
use ep_core::error::Result;
use parking_lot::{Condvar, Mutex};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The environment variable that lets the watchdog revoke the caller's communicator.
pub const REVOKE_ENV: &str = "NCCL_EP_REVOKE_ON_REMOTE_TIMEOUT";

/// Something queued on a stream that completes at some point (an event; a stand-in in tests).
pub trait Completion {
    /// True once the work before it has finished; an error counts as finished (the stream is
    /// broken anyway, and the operation's own calls report it).
    fn done(&self) -> bool;
}

impl Completion for Event {
    fn done(&self) -> bool {
        self.query().unwrap_or(true)
    }
}

/// What [`Watch::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing outstanding.
    Idle,
    /// Outstanding, the oldest for less than the limit.
    Waiting,
    /// The oldest outstanding exchange is older than the limit: reported once.
    Expired(Duration),
}

/// One watched exchange: completions recorded before and after it on the stream, and when the
/// watch first saw the one before it done (the exchange had started on the GPU by then).
struct Entry<C> {
    start: C,
    end: C,
    started: Option<Instant>,
}

/// The outstanding exchanges, oldest first (pure bookkeeping; the clock is the caller's). An
/// exchange's age counts from when it started on the GPU (seen at a check), not from when the
/// host queued it: work queued ahead of it on the stream, however long, never counts.
pub struct Watch<C> {
    pending: VecDeque<Entry<C>>,
    /// Completed entries' completions, kept for reuse (events are created once, recorded many
    /// times).
    free: Vec<C>,
    /// The front entry was reported as expired (cleared when it leaves).
    expired: bool,
}

impl<C: Completion> Default for Watch<C> {
    fn default() -> Self {
        Self {
            pending: VecDeque::new(),
            free: Vec::new(),
            expired: false,
        }
    }
}

impl<C: Completion> Watch<C> {
    /// A completion to record again, if one finished earlier.
    pub fn reuse(&mut self) -> Option<C> {
        self.free.pop()
    }

    /// Gives back a completion that was not used (its exchange failed to queue).
    pub fn give_back(&mut self, c: C) {
        self.free.push(c);
    }

    /// An exchange queued between the completions `start` and `end`.
    pub fn push(&mut self, start: C, end: C) {
        self.pending.push_back(Entry {
            start,
            end,
            started: None,
        });
    }

    /// Drops the finished exchanges from the front (stream order: a later one cannot finish
    /// first) and judges the oldest left by the time since it started. `Expired` is returned
    /// once per oldest exchange: while it stays outstanding the watch answers `Waiting`; once it
    /// finishes (a slow peer, not a dead one) the next oldest is judged afresh.
    pub fn check(&mut self, now: Instant, limit: Duration) -> Verdict {
        while self.pending.front().is_some_and(|e| e.end.done()) {
            let e = self.pending.pop_front().expect("front exists");
            self.free.extend([e.start, e.end]);
            self.expired = false;
        }
        let Some(front) = self.pending.front_mut() else {
            return Verdict::Idle;
        };
        if front.started.is_none() && front.start.done() {
            front.started = Some(now);
        }
        let Some(since) = front.started else {
            return Verdict::Waiting;
        };
        let age = now.saturating_duration_since(since);
        if age > limit && !self.expired {
            self.expired = true;
            return Verdict::Expired(age);
        }
        Verdict::Waiting
    }

    /// Outstanding exchanges (for the tests: the thread only needs the verdict).
    #[cfg(test)]
    fn outstanding(&self) -> usize {
        self.pending.len()
    }
}

/// The caller's communicator, handed to the watchdog thread for `ncclCommRevoke`.
struct Comm(ncclComm_t);
// SAFETY: an opaque NCCL handle; ncclCommRevoke may be called from any thread, which is what it
// is for (stopping operations that hang on other threads' streams).
unsafe impl Send for Comm {}

struct Shared {
    watch: Mutex<Watch<Event>>,
    wake: Condvar,
    stop: AtomicBool,
    /// The async error this watchdog raised (cleared by `ncclEpErrorClear`).
    fired: AtomicBool,
    /// It fired at least once: the stream may never drain (release must not wait for it).
    ever_fired: AtomicBool,
}

/// One group's watchdog: a thread while the group has remote ranks and a timeout.
pub struct ExchangeWatchdog {
    shared: Arc<Shared>,
    device: i32,
    thread: Option<JoinHandle<()>>,
}

impl ExchangeWatchdog {
    /// Starts the thread for rank `rank`'s exchanges with the ranks in `remote` (bit r) on
    /// `device`, bounded by `limit`.
    pub fn start(comm: ncclComm_t, rank: usize, remote: u64, device: i32, limit: Duration) -> Result<Self> {
        let shared = Arc::new(Shared {
            watch: Mutex::new(Watch::default()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            fired: AtomicBool::new(false),
            ever_fired: AtomicBool::new(false),
        });
        let revoke = std::env::var(REVOKE_ENV).is_ok_and(|v| v.trim() == "1");
        let s = shared.clone();
        let comm = Comm(comm);
        let thread = std::thread::Builder::new()
            .name(format!("nccl-ep-watch-{rank}"))
            .spawn(move || watch_loop(&s, comm, rank, remote, device, limit, revoke))
            .map_err(|e| ep_core::invalid_usage!("cannot start the remote-exchange watchdog thread: {e}"))?;
        Ok(Self {
            shared,
            device,
            thread: Some(thread),
        })
    }

    /// Queues an exchange on `stream` with `queue` and watches it (only queues it while the
    /// stream is captured).
    pub fn watch(&self, stream: Stream, queue: impl FnOnce() -> Result<()>) -> Result<()> {
        // The events live in the device's primary context, as the caller's stream does.
        let _ctx = CtxGuard::enter(self.device)?;
        if stream_is_capturing(stream)? {
            return queue();
        }
        let (start, end) = {
            let mut w = self.shared.watch.lock();
            let mut event = || w.reuse().map_or_else(|| Event::new(false), Ok);
            (event()?, event()?)
        };
        // Not under the lock: NCCL's group end may block for a while (connections are set up
        // at first use), and the watchdog thread must not wait for it.
        let queued = start
            .record(stream)
            .and_then(|_| queue())
            .and_then(|_| end.record(stream));
        let mut w = self.shared.watch.lock();
        if let Err(e) = queued {
            w.give_back(start);
            w.give_back(end);
            return Err(e);
        }
        w.push(start, end);
        drop(w);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The asynchronous error this watchdog raised since the last [`ExchangeWatchdog::clear`].
    pub fn fired(&self) -> bool {
        self.shared.fired.load(Ordering::Acquire)
    }

    pub fn clear(&self) {
        self.shared.fired.store(false, Ordering::Release);
    }

    /// An exchange ever stayed outstanding past the limit: the stream may never drain.
    pub fn ever_fired(&self) -> bool {
        self.shared.ever_fired.load(Ordering::Acquire)
    }
}

impl Drop for ExchangeWatchdog {
    fn drop(&mut self) {
        {
            // Under the lock: the thread holds it from its stop check until its wait releases
            // it, so the notification cannot fall between the two and be lost.
            let _w = self.shared.watch.lock();
            self.shared.stop.store(true, Ordering::Release);
        }
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // The events are destroyed in their context (a finished or a hung record alike: the
        // driver allows destroying an event with a record outstanding).
        let _g = CtxGuard::enter(self.device);
        let mut w = self.shared.watch.lock();
        *w = Watch::default();
    }
}

/// The poll period: a fraction of the limit, between 1 ms and 50 ms.
pub fn poll_period(limit: Duration) -> Duration {
    (limit / 8).clamp(Duration::from_millis(1), Duration::from_millis(50))
}

fn watch_loop(s: &Shared, comm: Comm, rank: usize, remote: u64, device: i32, limit: Duration, revoke: bool) {
    // Event queries need the events' context current on this thread.
    let Ok(_g) = CtxGuard::enter(device) else {
        crate::log::log_warn(format_args!(
            "rank {rank}: the remote-exchange watchdog has no CUDA context: exchanges are not watched"
        ));
        return;
    };
    let period = poll_period(limit);
    let mut w = s.watch.lock();
    while !s.stop.load(Ordering::Acquire) {
        match w.check(Instant::now(), limit) {
            Verdict::Idle => {
                // Sleep until the next exchange (or the stop).
                s.wake.wait(&mut w);
                continue;
            }
            Verdict::Waiting => {}
            Verdict::Expired(age) => {
                s.fired.store(true, Ordering::Release);
                s.ever_fired.store(true, Ordering::Release);
                crate::log::log_error(format_args!(
                    "rank {rank}: an exchange with the remote rank(s) {} has not completed after {:.1} ms (the \
                     group's timeout): one of them died or skipped the operation; the group's async error is \
                     raised{}",
                    ep_core::rank_set::list(remote),
                    age.as_secs_f64() * 1e3,
                    if revoke {
                        "; revoking the communicator (NCCL_EP_REVOKE_ON_REMOTE_TIMEOUT=1)"
                    } else {
                        "; NCCL's kernel keeps the stream waiting until the application revokes or aborts the \
                         communicator (or sets NCCL_EP_REVOKE_ON_REMOTE_TIMEOUT=1)"
                    }
                ));
                if revoke {
                    // Not under the lock: NCCL may take its time.
                    drop(w);
                    if let Err(e) = Nccl::get().and_then(|n| {
                        // SAFETY: the caller's communicator, live while its group is (the group
                        // owns this watchdog and stops it before it goes away).
                        unsafe { n.comm_revoke(comm.0) }
                    }) {
                        crate::log::log_error(format_args!("rank {rank}: {}", e.msg));
                    }
                    w = s.watch.lock();
                }
            }
        }
        s.wake.wait_for(&mut w, period);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    /// A completion the test finishes by hand.
    struct Flag(Rc<Cell<bool>>);
    impl Completion for Flag {
        fn done(&self) -> bool {
            self.0.get()
        }
    }

    fn flag() -> (Flag, Rc<Cell<bool>>) {
        let c = Rc::new(Cell::new(false));
        (Flag(c.clone()), c)
    }

    /// An exchange whose start (the work queued before it) is already done.
    fn started(w: &mut Watch<Flag>) -> Rc<Cell<bool>> {
        let (s, ds) = flag();
        ds.set(true);
        let (e, de) = flag();
        w.push(s, e);
        de
    }

    #[test]
    fn finished_exchanges_leave_in_stream_order_and_are_reused() {
        let t0 = Instant::now();
        let limit = Duration::from_millis(100);
        let mut w = Watch::default();
        assert_eq!(w.check(t0, limit), Verdict::Idle);
        let da = started(&mut w);
        let db = started(&mut w);
        assert_eq!(w.check(t0, limit), Verdict::Waiting);
        // The second finishing first does not retire it: the first still holds the front.
        db.set(true);
        assert_eq!(w.check(t0 + Duration::from_millis(60), limit), Verdict::Waiting);
        assert_eq!(w.outstanding(), 2);
        da.set(true);
        assert_eq!(w.check(t0 + Duration::from_millis(70), limit), Verdict::Idle);
        assert_eq!(w.outstanding(), 0);
        for _ in 0..4 {
            assert!(w.reuse().is_some());
        }
        assert!(w.reuse().is_none());
    }

    #[test]
    fn expires_once_when_the_oldest_outlives_the_limit() {
        let t0 = Instant::now();
        let limit = Duration::from_millis(100);
        let mut w = Watch::default();
        let da = started(&mut w);
        assert_eq!(w.check(t0, limit), Verdict::Waiting, "seen started at t0");
        assert_eq!(w.check(t0 + limit, limit), Verdict::Waiting, "at the limit: not yet");
        assert_eq!(
            w.check(t0 + Duration::from_millis(150), limit),
            Verdict::Expired(Duration::from_millis(150))
        );
        assert_eq!(w.check(t0 + Duration::from_millis(300), limit), Verdict::Waiting);
        // An exchange behind the stuck one is not judged while the stuck one holds the front.
        let _db = started(&mut w);
        assert_eq!(w.check(t0 + Duration::from_millis(350), limit), Verdict::Waiting);
        // The stuck one finishes late (a slow peer): the next is judged from when it is seen
        // started, here at 360 ms.
        da.set(true);
        assert_eq!(w.check(t0 + Duration::from_millis(360), limit), Verdict::Waiting);
        assert_eq!(w.outstanding(), 1);
        assert_eq!(w.check(t0 + Duration::from_millis(450), limit), Verdict::Waiting);
        assert_eq!(
            w.check(t0 + Duration::from_millis(470), limit),
            Verdict::Expired(Duration::from_millis(110))
        );
    }

    #[test]
    fn work_queued_ahead_never_counts() {
        let t0 = Instant::now();
        let limit = Duration::from_millis(100);
        let mut w = Watch::default();
        let (s, ds) = flag();
        let (e, de) = flag();
        w.push(s, e);
        // The stream is busy with earlier work for 10 s: the exchange has not started.
        assert_eq!(w.check(t0 + Duration::from_secs(10), limit), Verdict::Waiting);
        ds.set(true);
        assert_eq!(w.check(t0 + Duration::from_secs(11), limit), Verdict::Waiting);
        assert_eq!(
            w.check(t0 + Duration::from_millis(11_200), limit),
            Verdict::Expired(Duration::from_millis(200))
        );
        de.set(true);
        assert_eq!(w.check(t0 + Duration::from_secs(12), limit), Verdict::Idle);
    }

    #[test]
    fn poll_period_bounds() {
        assert_eq!(poll_period(Duration::from_millis(2)), Duration::from_millis(1));
        assert_eq!(poll_period(Duration::from_millis(80)), Duration::from_millis(10));
        assert_eq!(poll_period(Duration::from_secs(10)), Duration::from_millis(50));
    }
}
