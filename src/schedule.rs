//! Periodic tasks (SPEC §2 `syncq.schedules`): when a schedule's ticks
//! fall.
//!
//! A schedule is a row. Its ticks come from `cron` (5 fields, or 6 with
//! seconds first, or a macro such as `@hourly`; parsed by
//! [croner](https://docs.rs/croner), which follows the Open Cron Pattern
//! Specification) in an IANA `timezone` (via
//! [chrono-tz](https://docs.rs/chrono-tz)), or from `every` (an interval
//! from the first tick). Daylight saving, as croner does it: a fixed time
//! that falls in a gap runs once at the first valid time after it; one
//! that falls in a repeated hour runs once, at its first occurrence;
//! wildcard fields (`*/15 * * * *`) follow the wall clock, skipping the
//! gap and running in both copies of a repeated hour.
//!
//! The scheduler (`maintenance::scheduler`) takes the due schedules `FOR UPDATE
//! SKIP LOCKED`, enqueues the tick's task — `schedule_id` and
//! `scheduled_for` set, unique together — and moves `next_run_at` on, in
//! one transaction: one task per tick across the fleet, none skipped while
//! any worker runs. Ticks missed while no worker ran (or while a
//! transaction held the row) are coalesced into one catch-up task for the
//! latest of them (or none, with `catch_up` off), the rest counted in
//! `skipped_ticks`; a tick whose previous task is still queued or running
//! is skipped and counted there too, unless `overlap` is on. Ticks fall on
//! whole seconds.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds};
use serde_json::Value;

use crate::error::{Error, Result};

/// When a schedule ticks.
#[derive(Debug, Clone, PartialEq)]
pub enum Timing {
    /// A cron expression, in the schedule's timezone.
    Cron(String),
    /// A fixed interval from the first tick.
    Every(Duration),
}

/// A schedule to create or replace ([`crate::TaskQueueManager::schedule`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Its name, unique: the id of `syncq.schedules`.
    pub schedule_id: String,
    /// The dataset its tasks go to.
    pub dataset_id: String,
    /// The kind of its tasks.
    pub kind: String,
    /// The payload of every task it enqueues.
    pub payload: Value,
    /// When it ticks.
    pub timing: Timing,
    /// An IANA name; `UTC` by default.
    pub timezone: String,
    /// The priority of its tasks (lower runs first).
    pub priority: i16,
    /// `max_attempts` of its tasks.
    pub max_attempts: i32,
    /// Ticks missed while no worker ran: one catch-up task (the default),
    /// or none.
    pub catch_up: bool,
    /// Enqueue a tick even while the previous task is still queued or
    /// running (off by default: the tick is skipped and counted).
    pub overlap: bool,
}

impl Schedule {
    /// A schedule with the defaults: UTC, priority 0, 5 attempts, catch-up
    /// on, no overlap.
    pub fn new(
        schedule_id: impl Into<String>,
        dataset_id: impl Into<String>,
        kind: impl Into<String>,
        timing: Timing,
    ) -> Self {
        Schedule {
            schedule_id: schedule_id.into(),
            dataset_id: dataset_id.into(),
            kind: kind.into(),
            payload: Value::Object(Default::default()),
            timing,
            timezone: "UTC".into(),
            priority: 0,
            max_attempts: 5,
            catch_up: true,
            overlap: false,
        }
    }

    /// Sets the payload of each tick's task.
    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    /// Sets the timezone the cron expression is read in.
    pub fn timezone(mut self, timezone: impl Into<String>) -> Self {
        self.timezone = timezone.into();
        self
    }

    /// Checks every field; the error names the first one that is wrong.
    pub fn validate(&self) -> Result<()> {
        for (field, value) in [
            ("schedule_id", &self.schedule_id),
            ("dataset_id", &self.dataset_id),
            ("kind", &self.kind),
        ] {
            if value.is_empty() {
                return Err(Error::config(field, "must not be empty"));
            }
        }
        if !(1..=10_000).contains(&self.max_attempts) {
            return Err(Error::config("max_attempts", "must be between 1 and 10000"));
        }
        let (cron, every) = match &self.timing {
            Timing::Cron(c) => (Some(c.as_str()), None),
            Timing::Every(d) => (None, Some(*d)),
        };
        Ticks::new(cron, every, &self.timezone)
            .map(|_| ())
            .map_err(|(field, message)| Error::config(field, message))
    }
}

/// A schedule's tick times.
#[derive(Debug, Clone)]
pub(crate) enum Ticks {
    Cron(Box<Cron>, Tz),
    Every(chrono::Duration),
}

impl Ticks {
    /// From a row's `cron` or `every` and `timezone`. The error names the
    /// field: `("cron", "…")`.
    pub(crate) fn new(
        cron: Option<&str>,
        every: Option<Duration>,
        timezone: &str,
    ) -> std::result::Result<Ticks, (&'static str, String)> {
        let tz = Tz::from_str(timezone).map_err(|_| {
            (
                "timezone",
                format!("{timezone:?} is not an IANA time zone name"),
            )
        })?;
        match (cron, every) {
            (Some(expr), None) => {
                let parsed = CronParser::builder()
                    .seconds(Seconds::Optional)
                    .build()
                    .parse(expr.trim())
                    .map_err(|e| ("cron", format!("{expr:?} is not a cron expression: {e}")))?;
                Ok(Ticks::Cron(Box::new(parsed), tz))
            }
            (None, Some(d)) if !d.is_zero() => chrono::Duration::from_std(d)
                .map(Ticks::Every)
                .map_err(|_| ("every", "is too long".to_string())),
            (None, Some(_)) => Err(("every", "must be longer than zero".into())),
            _ => Err(("cron", "exactly one of cron and every must be set".into())),
        }
    }

    /// The first tick strictly after `t`, on a whole second: a cron tick
    /// is at the second its expression names (the search from `now` once
    /// carried now's fraction: `23:00:00.255`), and an interval's first
    /// tick, counted from now, starts on a whole second too.
    pub(crate) fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        use chrono::SubsecRound;
        let whole = t.trunc_subsecs(0);
        match self {
            // Strictly after `t` even for an interval under a second.
            Ticks::Every(d) => whole
                .checked_add_signed(*d)
                .filter(|n| *n > t)
                .or_else(|| t.checked_add_signed(*d)),
            Ticks::Cron(cron, tz) => cron
                .find_next_occurrence(&whole.with_timezone(tz), false)
                .ok()
                .map(|n| n.with_timezone(&Utc).trunc_subsecs(0)),
        }
    }
}

/// What a due schedule does now: the ticks to enqueue, how many it skips,
/// and its next tick.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Due {
    pub enqueue: Vec<DateTime<Utc>>,
    pub missed: u64,
    pub latest: DateTime<Utc>,
    pub next: Option<DateTime<Utc>>,
}

/// Ticks at most this late are each enqueued (a busy or briefly slow
/// fleet); later ones were missed while no worker ran and are coalesced.
const ON_TIME: chrono::TimeDelta = chrono::TimeDelta::seconds(10);
/// At most this many on-time ticks are enqueued one by one in a pass.
const ON_TIME_TICKS: usize = 3;

/// The ticks due from `from` (the stored `next_run_at`) to `now`.
pub(crate) fn due(ticks: &Ticks, from: DateTime<Utc>, now: DateTime<Utc>, catch_up: bool) -> Due {
    let mut due = Vec::new();
    let mut t = Some(from);
    while let Some(tick) = t.filter(|tick| *tick <= now) {
        if due.len() > 10_000 {
            // Years of missed seconds: the rest are coalesced all the same.
            t = ticks.next_after(now);
            break;
        }
        due.push(tick);
        t = ticks.next_after(tick);
    }
    let latest = due.last().copied().unwrap_or(from);
    let on_time = due.len() <= ON_TIME_TICKS && due.first().is_some_and(|f| now - *f <= ON_TIME);
    let enqueue = if on_time {
        due.clone()
    } else if catch_up {
        vec![latest]
    } else {
        Vec::new()
    };
    // Every due tick not enqueued: coalesced into the catch-up task, or
    // dropped with catch-up off (a schedule row held locked for 15 s by an
    // operator's transaction coalesced 14 ticks and counted none).
    let missed = due.len().saturating_sub(enqueue.len()) as u64;
    Due {
        enqueue,
        missed,
        latest,
        next: t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn a_fixed_time_in_the_spring_gap_runs_once_at_the_first_valid_time() {
        // Europe/Berlin, 2026-03-29: 02:00 local jumps to 03:00.
        let ticks = Ticks::new(Some("30 2 * * *"), None, "Europe/Berlin").unwrap();
        let before = utc("2026-03-28T12:00:00Z");
        let first = ticks.next_after(before).unwrap();
        // 2026-03-28 02:30 has passed; the next is the 29th, in the gap.
        let next = ticks.next_after(first).unwrap();
        assert_eq!(
            first,
            utc("2026-03-29T01:00:00Z"),
            "03:00 CEST, right after the gap"
        );
        assert_eq!(
            next,
            utc("2026-03-30T00:30:00Z"),
            "02:30 CEST the day after"
        );
    }

    #[test]
    fn a_fixed_time_in_the_autumn_overlap_runs_once() {
        // Europe/Berlin, 2026-10-25: 03:00 CEST falls back to 02:00 CET.
        let ticks = Ticks::new(Some("30 2 * * *"), None, "Europe/Berlin").unwrap();
        let first = ticks.next_after(utc("2026-10-24T12:00:00Z")).unwrap();
        let second = ticks.next_after(first).unwrap();
        assert_eq!(
            first,
            utc("2026-10-25T00:30:00Z"),
            "02:30 CEST, the first of the two"
        );
        assert_eq!(
            second,
            utc("2026-10-26T01:30:00Z"),
            "not 02:30 CET the same night"
        );
    }

    #[test]
    fn seconds_first_and_macros_and_every() {
        let six = Ticks::new(Some("*/10 * * * * *"), None, "UTC").unwrap();
        let t = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 3).unwrap();
        assert_eq!(
            six.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 10).unwrap()
        );
        let hourly = Ticks::new(Some("@hourly"), None, "UTC").unwrap();
        assert_eq!(
            hourly.next_after(t).unwrap(),
            Utc.with_ymd_and_hms(2026, 1, 1, 1, 0, 0).unwrap()
        );
        let every = Ticks::new(None, Some(Duration::from_secs(900)), "UTC").unwrap();
        assert_eq!(
            every.next_after(t).unwrap(),
            t + chrono::Duration::minutes(15)
        );
    }

    #[test]
    fn bad_expressions_and_zones_name_their_field() {
        assert_eq!(
            Ticks::new(Some("61 * * * *"), None, "UTC").unwrap_err().0,
            "cron"
        );
        assert_eq!(
            Ticks::new(Some("* * *"), None, "UTC").unwrap_err().0,
            "cron"
        );
        assert_eq!(
            Ticks::new(Some("* * * * *"), None, "Mars/Olympus")
                .unwrap_err()
                .0,
            "timezone"
        );
        assert_eq!(
            Ticks::new(None, Some(Duration::ZERO), "UTC").unwrap_err().0,
            "every"
        );
    }

    #[test]
    fn on_time_ticks_are_each_enqueued_and_missed_ones_coalesced() {
        let every = Ticks::new(None, Some(Duration::from_secs(1)), "UTC").unwrap();
        let from = utc("2026-01-01T00:00:00Z");
        let late = due(&every, from, utc("2026-01-01T00:00:01.5Z"), true);
        assert_eq!(late.enqueue, vec![from, utc("2026-01-01T00:00:01Z")]);
        assert_eq!(late.next, Some(utc("2026-01-01T00:00:02Z")));
        let missed = due(&every, from, utc("2026-01-01T00:00:30.2Z"), true);
        assert_eq!(
            missed.enqueue,
            vec![utc("2026-01-01T00:00:30Z")],
            "one catch-up task"
        );
        assert_eq!(missed.next, Some(utc("2026-01-01T00:00:31Z")));
        let skipped = due(&every, from, utc("2026-01-01T00:00:30.2Z"), false);
        assert!(skipped.enqueue.is_empty());
        assert_eq!(skipped.missed, 31);
        assert_eq!(missed.missed, 30, "coalesced ticks are counted as skipped");
        assert_eq!(late.missed, 0);
    }

    #[test]
    fn ticks_fall_on_whole_seconds() {
        let cron = Ticks::new(Some("0 23 * * *"), None, "UTC").unwrap();
        assert_eq!(
            cron.next_after(utc("2026-01-01T12:00:00.255Z")),
            Some(utc("2026-01-01T23:00:00Z"))
        );
        let every = Ticks::new(None, Some(Duration::from_secs(60)), "UTC").unwrap();
        assert_eq!(
            every.next_after(utc("2026-01-01T12:00:00.255Z")),
            Some(utc("2026-01-01T12:01:00Z"))
        );
    }
}
