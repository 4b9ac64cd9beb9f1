//! A pause after a failure, shared by everything that must stop trying for a while: an
//! upstream cache that timed out or failed (skipped instead of making every request wait), and
//! the NAR disk cache once its disk is full (NARs are then served without caching).
//!
//! A pause may wait for several failures in a row ([`Backoff::after`]): an upstream whose one
//! slow answer (a NAR part, a prefetch) was followed by answers proves nothing about the next
//! request, and skipping it turns every path it holds into a miss. Requests that were under way
//! together and fail together (a burst of prefetches all waiting on one slow answer) are one
//! failure, not one each: a holder counting them takes an [`Attempt`] when a request starts and
//! [`Backoff::trip_after`] counts its failure only if no other failure was counted since.
//!
//! Besides the pause, a [`Backoff`] remembers whether the current outage has been reported, so
//! that its holder logs one line when it starts and one when it ends, not one per request:
//! [`Backoff::trip`] and [`Backoff::reset`] say whether they changed that state.
//!
//! Lock-free on purpose: [`Backoff::is_active`] is asked on every upstream request and every
//! NAR cache miss. Time is measured on the monotonic clock, so a wall-clock step neither
//! extends nor cuts a pause.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct Backoff {
    period: Duration,
    /// Failures in a row that start a pause.
    threshold: u32,
    /// Failures since the last success.
    in_a_row: AtomicU32,
    /// The clock `until_ms` counts from.
    origin: Instant,
    /// End of the pause in milliseconds since `origin`; 0 before the first trip.
    until_ms: AtomicU64,
    /// Set by a trip, cleared by a reset: the outage has been reported and not yet its end.
    reported: AtomicBool,
    /// Failures counted by [`Backoff::trip_after`] so far: what an [`Attempt`] remembers.
    counted: AtomicU64,
}

/// When a request started, as far as a [`Backoff`] is concerned: the failures counted before it.
#[derive(Clone, Copy, Debug)]
pub struct Attempt(u64);

impl Backoff {
    /// A back-off that pauses for `period` after each failure.
    pub fn new(period: Duration) -> Self {
        Self::after(1, period)
    }

    /// A back-off that pauses for `period` once `threshold` failures came with no success
    /// between them, and after each failure that follows.
    pub fn after(threshold: u32, period: Duration) -> Self {
        Self {
            period,
            threshold: threshold.max(1),
            in_a_row: AtomicU32::new(0),
            origin: Instant::now(),
            until_ms: AtomicU64::new(0),
            reported: AtomicBool::new(false),
            counted: AtomicU64::new(0),
        }
    }

    /// How long each trip pauses.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Whether a pause is running: the holder should not try now.
    pub fn is_active(&self) -> bool {
        self.now_ms() < self.until_ms.load(Ordering::Relaxed)
    }

    /// Records a failure: (re)starts the pause for one period from now once it is the
    /// threshold's failure in a row. True if this starts an outage (the first pause since
    /// creation or the last [`reset`](Self::reset)): the caller logs it then, and stays quiet
    /// on the trips that follow.
    pub fn trip(&self) -> bool {
        let failures = self
            .in_a_row
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < self.threshold {
            return false;
        }
        let until = self.now_ms().saturating_add(millis(self.period));
        self.until_ms.store(until, Ordering::Relaxed);
        !self.reported.swap(true, Ordering::Relaxed)
    }

    /// Marks the start of a request whose failure [`trip_after`](Self::trip_after) may count.
    pub fn attempt(&self) -> Attempt {
        Attempt(self.counted.load(Ordering::Acquire))
    }

    /// Records the failure of a request started at `started`, as [`trip`](Self::trip) does,
    /// unless a failure was counted since it started: requests under way at once that fail at
    /// once (each waited for the same slow upstream) are one failure in a row, not many.
    pub fn trip_after(&self, started: Attempt) -> bool {
        let next = started.0.wrapping_add(1);
        if self
            .counted
            .compare_exchange(started.0, next, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        self.trip()
    }

    /// Records a success: the outage is over. True if an outage had been reported, so the
    /// caller logs its end once. A pause already running is left to run out: a request that
    /// was in flight when another one failed proves little about the next one.
    pub fn reset(&self) -> bool {
        self.in_a_row.store(0, Ordering::Relaxed);
        self.reported.swap(false, Ordering::Relaxed)
    }

    /// Ends the running pause as if its period had passed (tests).
    #[cfg(test)]
    pub fn expire(&self) {
        self.until_ms.store(0, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        millis(self.origin.elapsed())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inactive_until_tripped() {
        let b = Backoff::new(Duration::from_secs(3600));
        assert!(!b.is_active());
        assert!(b.trip());
        assert!(b.is_active());
        assert_eq!(b.period(), Duration::from_secs(3600));
    }

    #[test]
    fn the_pause_runs_out() {
        let b = Backoff::new(Duration::ZERO);
        assert!(b.trip());
        assert!(!b.is_active());
    }

    #[test]
    fn an_outage_is_reported_once_and_its_end_once() {
        let b = Backoff::new(Duration::from_secs(3600));
        assert!(b.trip(), "the first failure starts an outage");
        assert!(!b.trip(), "later failures extend it quietly");
        assert!(b.reset(), "the first success ends it");
        assert!(!b.reset(), "later successes change nothing");
        assert!(b.trip(), "a failure after that is a new outage");
    }

    #[test]
    fn a_threshold_counts_failures_in_a_row_only() {
        let b = Backoff::after(3, Duration::from_secs(3600));
        assert!(!b.trip());
        assert!(!b.trip());
        assert!(!b.is_active(), "two failures in a row of three");
        assert!(!b.reset(), "no outage was reported");
        assert!(!b.trip());
        assert!(!b.trip());
        assert!(
            !b.is_active(),
            "a success between failures starts the count again"
        );
        assert!(b.trip(), "the third in a row starts the outage");
        assert!(b.is_active());
        b.reset();
        assert!(
            !b.trip(),
            "after a success, one failure does not start another"
        );
    }

    #[test]
    fn failures_of_requests_under_way_together_count_once() {
        let b = Backoff::after(3, Duration::from_secs(3600));
        // A burst: every request started before any of them failed.
        let burst: Vec<Attempt> = (0..64).map(|_| b.attempt()).collect();
        for a in &burst {
            assert!(!b.trip_after(*a));
        }
        assert!(
            !b.is_active(),
            "64 failures at once are one failure in a row"
        );
        // Two more, each started after the previous failure was counted.
        let second = b.attempt();
        assert!(!b.trip_after(second));
        assert!(!b.is_active(), "two failures in a row of three");
        let third = b.attempt();
        assert!(
            b.trip_after(third),
            "the third failure in a row, each seen after the one before, starts the outage"
        );
        assert!(b.is_active());
        assert!(
            !b.trip_after(third),
            "a request started with the third counts nothing more"
        );
    }

    /// A pause of a real length ends by itself once its period has passed on the clock: the
    /// holder tries again without any success having been seen.
    #[test]
    fn a_pause_ends_when_its_period_has_passed() {
        let period = Duration::from_millis(20);
        let b = Backoff::new(period);
        let tripped = Instant::now();
        assert!(b.trip());
        let deadline = tripped + Duration::from_secs(10);
        while b.is_active() {
            assert!(
                Instant::now() < deadline,
                "a pause of {period:?} still runs after 10 s"
            );
            std::thread::yield_now();
        }
        // The clock counts whole milliseconds: the end may come up to one early.
        assert!(
            tripped.elapsed() + Duration::from_millis(1) >= period,
            "the pause ended before its period"
        );
    }

    #[test]
    fn a_reset_leaves_a_running_pause_alone() {
        let b = Backoff::new(Duration::from_secs(3600));
        b.trip();
        b.reset();
        assert!(b.is_active());
    }
}
