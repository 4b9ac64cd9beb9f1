//! The store's time, as told by the `Date` of its answers.
//!
//! Objects carry the store's times (S3's `LastModified`), and cellar compares them with "now":
//! a collector's grace period and the age of announcements, the day an access record is named
//! after, the age of abandoned uploads. A machine whose clock is off (a board without a
//! battery-backed clock, booted before NTP answered; a VM restored from a snapshot) would then
//! take fresh objects for old ones, or the other way round. S3 also refuses requests signed
//! with a time too far from its own (15 minutes on AWS, a day on Garage).
//!
//! So an S3 store keeps the offset of its clock to this machine's, learnt from each answer's
//! `Date` header, and "now" is this machine's time plus that offset: for comparisons, and for
//! signing cellar's own requests (the SDK corrects the time it signs with itself). A request
//! refused for its time is signed again and retried at once. A `Date` has a resolution of a
//! second and reaches cellar a round trip late, so offsets under [`SLACK`] are taken for none,
//! and the offset moves only when an answer disagrees with it by [`SLACK`] or more.
//!
//! The offset is kept against this machine's time since boot (`CLOCK_BOOTTIME`, which NTP
//! slews as it slews the wall clock, and which counts a suspend): when this machine's clock is
//! set (NTP answering at last, after the start), the store's time does not move with it, and
//! the offset shrinks by the step at once, not at the store's next answer (an access record
//! written meanwhile was filed days off). A virtual machine paused and resumed sees no time
//! pass on any of its clocks: its offset is off by the pause until the store's next answer.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_smithy_types::date_time::{DateTime, Format};

/// Differences between the two clocks smaller than this are noise (the `Date` header's
/// resolution, the time an answer takes to arrive).
pub const SLACK: Duration = Duration::from_secs(2);

/// An offset this large is worth a warning: the store's and this machine's clocks disagree.
const WORTH_SAYING: Duration = Duration::from_secs(60);

/// The store's clock, as an offset to this machine's; clones share it.
#[derive(Debug, Default, Clone)]
pub struct StoreClock {
    /// The offset last learnt, unless it is none.
    learnt: Arc<Mutex<Option<Learnt>>>,
}

/// An offset, and when it was learnt by this machine's wall clock and time since boot.
#[derive(Debug, Clone, Copy)]
struct Learnt {
    /// Milliseconds to add to this machine's time to get the store's, then.
    offset_ms: i64,
    wall: SystemTime,
    booted: Duration,
}

impl Learnt {
    /// The offset at `wall` and `booted` (both read now): less whatever this machine's clock
    /// was set forward by since it was learnt (more, set back).
    fn at(&self, wall: SystemTime, booted: Duration) -> i64 {
        let walked = offset_ms(wall, self.wall);
        let elapsed =
            i64::try_from(booted.saturating_sub(self.booted).as_millis()).unwrap_or(i64::MAX);
        self.offset_ms
            .saturating_sub(walked.saturating_sub(elapsed))
    }
}

/// This machine's time since boot, suspends included (`CLOCK_BOOTTIME`).
fn since_boot() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

impl StoreClock {
    /// The store's time now.
    pub fn now(&self) -> SystemTime {
        self.at(self.offset_ms())
    }

    /// The store's time now by `offset_ms` (one [`Self::offset_ms`] read).
    pub fn at(&self, offset_ms: i64) -> SystemTime {
        shifted(SystemTime::now(), offset_ms)
    }

    /// Milliseconds to add to this machine's time to get the store's.
    pub fn offset_ms(&self) -> i64 {
        self.offset_at(SystemTime::now(), since_boot())
    }

    /// [`Self::offset_ms`] when this machine's clocks read `wall` and `booted`.
    fn offset_at(&self, wall: SystemTime, booted: Duration) -> i64 {
        crate::sync::lock(&self.learnt).map_or(0, |l| l.at(wall, booted))
    }

    /// Whether the offset moved by [`SKEW_RETRY`] or more from `offset_ms` (read before a
    /// request): that request was signed with a time the store may have refused.
    pub fn moved_since(&self, offset_ms: i64) -> bool {
        let moved = self.offset_ms().abs_diff(offset_ms);
        u128::from(moved) >= SKEW_RETRY.as_millis()
    }

    /// Takes note of an answer's `Date` header, received now. Returns whether the offset moved.
    pub fn observe(&self, date: &str) -> bool {
        self.observe_at(date, SystemTime::now())
    }

    /// [`Self::observe`] of an answer received at `received` (by this machine's clock).
    pub fn observe_at(&self, date: &str, received: SystemTime) -> bool {
        self.observe_when(date, received, SystemTime::now(), since_boot())
    }

    /// [`Self::observe_at`] when this machine's clocks read `wall` and `booted`.
    fn observe_when(
        &self,
        date: &str,
        received: SystemTime,
        wall: SystemTime,
        booted: Duration,
    ) -> bool {
        let Some(told) = DateTime::from_str(date.trim(), Format::HttpDate)
            .ok()
            .and_then(|d| SystemTime::try_from(d).ok())
        else {
            return false;
        };
        let measured = offset_ms(told, received);
        let slack = SLACK.as_millis() as i64;
        let mut learnt = crate::sync::lock(&self.learnt);
        let was = learnt.map_or(0, |l| l.offset_ms);
        let held = learnt.map_or(0, |l| l.at(wall, booted));
        let worth = WORTH_SAYING.as_millis() as i64;
        if measured.abs_diff(held) < slack.unsigned_abs() {
            // This machine's clock set since the offset was learnt: the offset as it is now
            // is learnt afresh (none, if the clock was set right), and said.
            if learnt.is_some() && was.abs_diff(held) >= slack.unsigned_abs() {
                *learnt = (held.unsigned_abs() >= slack.unsigned_abs()).then_some(Learnt {
                    offset_ms: held,
                    wall,
                    booted,
                });
                drop(learnt);
                let now = if held.unsigned_abs() >= slack.unsigned_abs() {
                    held
                } else {
                    0
                };
                crate::metrics::get().store_clock_offset.set(now / 1000);
                if was.abs() >= worth && now.abs() < worth {
                    tracing::info!(
                        offset_secs = now / 1000,
                        "the store's clock and this machine's agree again (this machine's was set)"
                    );
                }
            }
            return false;
        }
        // Within the slack of no offset at all: none (the noise of a clock in sync).
        let new = if measured.abs() < slack { 0 } else { measured };
        *learnt = (new != 0).then_some(Learnt {
            offset_ms: new,
            wall,
            booted,
        });
        drop(learnt);
        crate::metrics::get().store_clock_offset.set(new / 1000);
        if new.abs() >= worth {
            tracing::warn!(
                offset_secs = new / 1000,
                "the store's clock and this machine's disagree; cellar goes by the store's (keep this machine's clock in sync: NTP)"
            );
        } else if held.abs() >= worth {
            tracing::info!(
                offset_secs = new / 1000,
                "the store's clock and this machine's agree again"
            );
        }
        true
    }
}

/// `a - b` in milliseconds, negative if `a` is earlier.
fn offset_ms(a: SystemTime, b: SystemTime) -> i64 {
    match a.duration_since(b) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_millis()).map_or(i64::MIN, |m| -m),
    }
}

/// `t` moved by `ms` milliseconds (saturating at what the clock holds).
fn shifted(t: SystemTime, ms: i64) -> SystemTime {
    let d = Duration::from_millis(ms.unsigned_abs());
    let moved = if ms >= 0 {
        t.checked_add(d)
    } else {
        t.checked_sub(d)
    };
    moved.unwrap_or(t)
}

/// A refusal (4xx) whose `Date` is [`SKEW_RETRY`] or more from the time the request was
/// signed with is tried again, signed anew with the store's time now known: the store may
/// have refused the signature's time (AWS beyond 15 minutes, Garage beyond a day).
pub const SKEW_RETRY: Duration = Duration::from_secs(60);

/// Whether an answer dated `told` to a request signed at `signed` is [`SKEW_RETRY`] or more
/// away from it.
fn off_by_skew_retry(told: SystemTime, signed: SystemTime) -> bool {
    offset_ms(told, signed).unsigned_abs() >= SKEW_RETRY.as_millis() as u64
}

/// Whether an answer dated `told` to a request signed at `signed` that took `took` shows the
/// signature's time off the store's by [`SKEW_RETRY`] or more: a request that took long (a
/// large body on a slow link) was not signed with a time off by what it took.
fn signed_off_clock(told: SystemTime, signed: SystemTime, took: Duration) -> bool {
    off_by_skew_retry(told, signed + took)
}

/// The time a SigV4 request was signed with (its `x-amz-date`, `20261130T005320Z`).
pub(crate) fn signing_time(amz_date: &str) -> Option<SystemTime> {
    let b = amz_date.as_bytes();
    if !amz_date.is_ascii() || b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let (d, t) = (&amz_date[..8], &amz_date[9..15]);
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &d[..4],
        &d[4..6],
        &d[6..],
        &t[..2],
        &t[2..4],
        &t[4..]
    );
    let parsed = DateTime::from_str(&rfc3339, Format::DateTime).ok()?;
    SystemTime::try_from(parsed).ok()
}

fn http_date(text: &str) -> Option<SystemTime> {
    let parsed = DateTime::from_str(text.trim(), Format::HttpDate).ok()?;
    SystemTime::try_from(parsed).ok()
}

/// When the request of an SDK call was signed (its time, and this machine's monotonic clock
/// when it was sent), kept between its hooks.
#[derive(Debug, Clone, Copy)]
struct SignedAt(SystemTime, std::time::Instant);

impl aws_smithy_types::config_bag::Storable for SignedAt {
    type Storer = aws_smithy_types::config_bag::StoreReplace<Self>;
}

/// Marks an answer that refused a request signed [`SKEW_RETRY`] or more away from its `Date`.
#[derive(Debug, Clone, Copy)]
struct SignedOffClock;

/// Shows the store's clock each answer the SDK receives, and marks the refusals of requests
/// signed with a time off the store's, for [`RetrySkewed`].
#[derive(Debug)]
pub(super) struct ObserveDates(pub StoreClock);

impl aws_sdk_s3::config::Intercept for ObserveDates {
    fn name(&self) -> &'static str {
        "cellar::ObserveDates"
    }

    fn read_before_transmit(
        &self,
        ctx: &aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        if let Some(at) = ctx
            .request()
            .headers()
            .get("x-amz-date")
            .and_then(signing_time)
        {
            cfg.interceptor_state()
                .store_put(SignedAt(at, std::time::Instant::now()));
        }
        Ok(())
    }

    fn modify_before_deserialization(
        &self,
        ctx: &mut aws_sdk_s3::config::interceptors::BeforeDeserializationInterceptorContextMut<'_>,
        _: &aws_sdk_s3::config::RuntimeComponents,
        cfg: &mut aws_sdk_s3::config::ConfigBag,
    ) -> Result<(), aws_sdk_s3::error::BoxError> {
        let res = ctx.response();
        // An answer from a cache carries the time it was first made.
        if res.headers().get("age").is_some() {
            return Ok(());
        }
        let Some(date) = res.headers().get("date").map(str::to_owned) else {
            return Ok(());
        };
        self.0.observe(&date);
        let refused = res.status().is_client_error();
        let signed = cfg.load::<SignedAt>().map(|s| (s.0, s.1.elapsed()));
        if let (true, Some(told), Some((signed, took))) = (refused, http_date(&date), signed) {
            if signed_off_clock(told, signed, took) {
                ctx.response_mut().add_extension(SignedOffClock);
            }
        }
        Ok(())
    }
}

/// Has the SDK try again a request that [`ObserveDates`] found refused for its time (its
/// standard retries, signed anew with the store's time).
#[derive(Debug)]
pub(super) struct RetrySkewed;

impl aws_sdk_s3::config::retry::ClassifyRetry for RetrySkewed {
    fn classify_retry(
        &self,
        ctx: &aws_sdk_s3::config::interceptors::InterceptorContext,
    ) -> aws_sdk_s3::config::retry::RetryAction {
        use aws_sdk_s3::config::retry::RetryAction;
        match ctx.response().and_then(|r| r.extension::<SignedOffClock>()) {
            Some(_) => {
                RetryAction::retryable_error(aws_smithy_types::retry::ErrorKind::TransientError)
            }
            None => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "cellar::RetrySkewed"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// 1_796_000_000 s after the epoch.
    const DATE: &str = "Mon, 30 Nov 2026 00:53:20 GMT";

    #[test]
    fn the_offset_follows_the_dates_and_ignores_noise() {
        let c = StoreClock::default();
        // In sync within a second or so: no offset.
        assert!(!c.observe_at(DATE, at(1_796_000_001)));
        assert!(!c.observe_at(DATE, at(1_795_999_999)));
        assert_eq!(c.offset_ms(), 0);
        // This machine two days behind: the store is 172800 s ahead.
        assert!(c.observe_at(DATE, at(1_796_000_000 - 172_800)));
        assert_eq!(c.offset_ms(), 172_800_000);
        // A later answer a second off that does not move it.
        assert!(!c.observe_at(DATE, at(1_796_000_000 - 172_801)));
        assert_eq!(c.offset_ms(), 172_800_000);
        // This machine an hour ahead.
        assert!(c.observe_at(DATE, at(1_796_003_600)));
        assert_eq!(c.offset_ms(), -3_600_000);
        // Back in sync (within the slack): none.
        assert!(c.observe_at(DATE, at(1_796_000_001)));
        assert_eq!(c.offset_ms(), 0);
        // What is not a date changes nothing.
        assert!(!c.observe_at("yesterday", at(1)));
        assert_eq!(c.offset_ms(), 0);
    }

    /// A request signed with an offset the clock no longer holds, by a minute or more either
    /// way, may have been refused for its time; one signed with the offset held now, or one
    /// a few seconds off, was not.
    #[test]
    fn a_move_of_a_minute_or_more_since_signing_is_told() {
        let c = StoreClock::default();
        let signed_with = c.offset_ms();
        assert!(!c.moved_since(signed_with));
        // The store two days ahead: a request signed before is suspect, one signed now not.
        assert!(c.observe_at(DATE, at(1_796_000_000 - 172_800)));
        assert!(c.moved_since(signed_with));
        assert!(!c.moved_since(c.offset_ms()));
        // Signed with an offset 59 s off the one held now: not enough; 60 s: enough.
        assert!(!c.moved_since(c.offset_ms() - 59_000));
        assert!(c.moved_since(c.offset_ms() + 60_000));
    }

    /// Two seconds (the slack) is a difference: the offset moves by it, and is kept.
    #[test]
    fn the_slack_is_the_least_difference_taken() {
        let c = StoreClock::default();
        assert!(c.observe_at(DATE, at(1_796_000_000 - 2)));
        assert_eq!(c.offset_ms(), 2000);
        assert!(c.observe_at(DATE, at(1_796_000_000 - 4)));
        assert_eq!(c.offset_ms(), 4000);
    }

    /// An offset of a minute or more is logged as a warning, and its end when the clocks
    /// agree again; smaller ones are not.
    #[test]
    fn a_large_offset_is_said_and_so_is_its_end() {
        let logs = crate::test_logs::capture();
        let c = StoreClock::default();
        c.observe_at(DATE, at(1_796_000_000 - 59));
        c.observe_at(DATE, at(1_796_000_000));
        assert_eq!(logs.text(), "", "under a minute: nothing said");
        c.observe_at(DATE, at(1_796_000_000 - 60));
        assert_eq!(
            logs.text().matches("disagree").count(),
            1,
            "{}",
            logs.text()
        );
        c.observe_at(DATE, at(1_796_000_000 - 30));
        assert_eq!(
            logs.text().matches("agree again").count(),
            1,
            "{}",
            logs.text()
        );
    }

    /// This machine's clock set forward by the offset learnt (NTP answering after the start):
    /// the store's time does not move, so the offset is gone at once; set back, it grows by
    /// as much. The store's next answer then forgets it, and says so.
    #[test]
    fn a_step_of_this_machines_clock_leaves_the_stores_time_alone() {
        let logs = crate::test_logs::capture();
        let c = StoreClock::default();
        // This machine three days behind.
        assert!(c.observe_at(DATE, at(1_796_000_000 - 259_200)));
        let l = crate::sync::lock(&c.learnt).unwrap();
        let (ten, days) = (Duration::from_secs(10), Duration::from_secs(259_200));
        assert_eq!(c.offset_at(l.wall + ten, l.booted + ten), 259_200_000);
        assert_eq!(c.offset_at(l.wall + ten + days, l.booted + ten), 0);
        let hour = Duration::from_secs(3600);
        assert_eq!(
            c.offset_at(l.wall + ten - hour, l.booted + ten),
            259_200_000 + 3_600_000
        );
        // An answer in agreement with this machine's clock set right.
        let (wall, booted) = (l.wall + ten + days, l.booted + ten);
        assert!(!c.observe_when(DATE, at(1_796_000_000), wall, booted));
        assert!(crate::sync::lock(&c.learnt).is_none());
        assert_eq!(c.offset_ms(), 0);
        assert_eq!(
            logs.text().matches("agree again").count(),
            1,
            "{}",
            logs.text()
        );

        // Set to ten seconds ahead of the store instead: the answer that agrees with that
        // has it learnt afresh (and so the metric says it).
        assert!(c.observe_at(DATE, at(1_796_000_000 - 259_200)));
        let l = crate::sync::lock(&c.learnt).unwrap();
        let (wall, booted) = (l.wall + days + ten + ten, l.booted + ten);
        assert_eq!(c.offset_at(wall, booted), -10_000);
        assert!(!c.observe_when(DATE, at(1_796_000_010), wall, booted));
        let now = crate::sync::lock(&c.learnt).unwrap();
        assert_eq!(
            (now.offset_ms, now.wall, now.booted),
            (-10_000, wall, booted)
        );
    }

    #[test]
    fn signing_times_and_dates_are_read() {
        assert_eq!(signing_time("20261130T005320Z"), Some(at(1_796_000_000)));
        assert_eq!(http_date(DATE), Some(at(1_796_000_000)));
        for bad in [
            "20261130T005320",
            "2026-11-30T00:53:20Z",
            "20261130X005320Z",
            "",
        ] {
            assert_eq!(signing_time(bad), None, "{bad}");
        }
        assert!(off_by_skew_retry(at(1000), at(1060)));
        // Answered 90 s after signing: off if the request was quick, not if it took 89 s.
        assert!(signed_off_clock(at(1090), at(1000), Duration::ZERO));
        assert!(!signed_off_clock(
            at(1090),
            at(1000),
            Duration::from_secs(89)
        ));
        assert!(off_by_skew_retry(at(1060), at(1000)));
        assert!(!off_by_skew_retry(at(1000), at(1059)));
    }

    #[test]
    fn now_is_this_machines_time_moved_by_the_offset() {
        let c = StoreClock::default();
        c.observe_at(DATE, at(1_796_000_000 - 3600));
        let mine = SystemTime::now();
        let theirs = c.now();
        let ahead = theirs.duration_since(mine).unwrap();
        assert!(ahead >= Duration::from_secs(3600) && ahead < Duration::from_secs(3601));
        c.observe_at(DATE, at(1_796_000_000 + 3600));
        let behind = SystemTime::now().duration_since(c.now()).unwrap();
        assert!(behind >= Duration::from_secs(3599) && behind <= Duration::from_secs(3600));
        assert_eq!(shifted(at(10), -20_000), at(10) - Duration::from_secs(20));
        // Beyond what the clock holds: unmoved, not a panic.
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(i64::MAX as u64);
        assert_eq!(shifted(far, i64::MAX), far);
    }
}
