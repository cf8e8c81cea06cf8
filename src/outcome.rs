//! What an attempt ends in, in one place: the handler's word
//! ([`TaskError`] in a [`TaskResult`]), the decision taken from it
//! (`Outcome`, SPEC §3 in one `match`), what it did ([`OutcomeKind`]), and
//! what is written (`End`, through the one writer of outcomes).
//!
//!
//! What each outcome does to the task is decided in one place,
//! [`crate::pool`]'s `Outcome::of`, and follows SPEC §3:
//!
//! | handler returns | the task |
//! | --- | --- |
//! | `Ok(value)` | `succeeded`, `result` stored |
//! | `Retryable` (or any `?`-propagated error, or a panic) | `queued` with backoff until `max_attempts`, then `failed` |
//! | `Invalid` | `failed` at once |
//! | `RateLimited { retry_after: Some(d) }` | `queued`, attempt not counted, dataset and its shared limits throttled for `d` |
//! | `RateLimited { retry_after: None }` | the same, but adaptive limits lower their rate instead of a throttle |
//! | `Snooze(d)` | `queued` at now + d, attempt not counted, nothing throttled (at most [`TaskError::MAX_SNOOZES`] times) |
//! | `Cancelled` | `cancelled` |
//! | `Fatal` | `queued` with its checkpoint, attempt not counted; the pool checkpoints and stops |
//! | `Interrupted` | `queued` with its checkpoint, attempt not counted |
//! | `LeaseLost` | nothing is written: another holder owns the task |
//!
//! A handler hears why it should stop as a [`Stop`]; returning it (`?` or
//! `.into()`) gives the matching error.

use crate::config::PoolConfig;
use crate::control::Stop;
use crate::db::Db;
use crate::store;
use crate::store::tasks::{End, Fence};
use serde_json::Value;
use std::fmt;
use std::time::Duration;
use tokio::task::JoinError;

/// What a handler returns: a JSON result, stored in `syncq.tasks.result`.
pub type TaskResult = Result<Value, TaskError>;

/// Why an attempt did not succeed. See the module docs for what each does.
///
/// Any `std::error::Error` converts into `TaskError::Retryable`, so `?` on an
/// unclassified error retries the task.
#[non_exhaustive]
pub enum TaskError {
    /// A transient failure: retry with backoff until `max_attempts`.
    Retryable(String),
    /// The request itself is wrong; retrying cannot help.
    Invalid(String),
    /// The upstream said "rate limit exceeded": throttle the whole dataset,
    /// and every shared limit it uses, until `retry_after`; the attempt is
    /// not counted. Without a `retry_after`, an adaptive limit lowers its
    /// rate instead, and one that is not adaptive waits the pool's
    /// default. [`TaskError::too_many_requests`] builds it from an HTTP
    /// `Retry-After` header.
    RateLimited {
        /// How long the upstream asked to wait.
        retry_after: Option<Duration>,
    },
    /// "Not yet": run this task again after this long — its item is not
    /// ready upstream, a lock is held elsewhere. Back to `queued` then, the
    /// attempt not counted, nothing throttled, the checkpoint kept (as
    /// River's `JobSnooze`, Oban's `{:snooze, n}`). A task snoozes at most
    /// [`TaskError::MAX_SNOOZES`] times; past that every snooze counts as
    /// a failed attempt, so a handler that snoozes in a loop ends as
    /// `max_attempts` says. Longer than [`TaskError::MAX_RETRY_AFTER`] is
    /// taken as that.
    Snooze(Duration),
    /// The task was cancelled (the handler heard `Stop::Cancel`).
    Cancelled,
    /// Unrecoverable for this process: release the task with its checkpoint
    /// and stop the pool.
    Fatal(String),
    /// The handler stopped because of a checkpoint command, after saving its
    /// progress; the attempt is not counted.
    Interrupted,
    /// The worker no longer holds the task (its lease expired and another
    /// worker took it); nothing the handler does can be recorded.
    LeaseLost,
}

impl TaskError {
    /// Longest error message stored (`last_error`, `syncq.task_errors`), in
    /// bytes; a longer one is cut at a character boundary and ends with
    /// `… [truncated from N bytes]`.
    pub const MAX_MESSAGE_BYTES: usize = store::MAX_MESSAGE_BYTES;

    /// Longest throttle a `RateLimited { retry_after }` sets: an upstream
    /// asking for longer is taken to mean this long (an operator can still
    /// pause the dataset).
    pub const MAX_RETRY_AFTER: Duration = store::tasks::MAX_THROTTLE;

    /// How many times one task may snooze (`syncq.max_snoozes()`); see
    /// [`TaskError::Snooze`]. `syncq retry` starts the count again.
    pub const MAX_SNOOZES: i32 = 100;

    /// A retryable error with this message.
    pub fn retryable(message: impl fmt::Display) -> Self {
        TaskError::Retryable(message.to_string())
    }

    /// An invalid-request error with this message.
    pub fn invalid(message: impl fmt::Display) -> Self {
        TaskError::Invalid(message.to_string())
    }

    /// A fatal error with this message.
    pub fn fatal(message: impl fmt::Display) -> Self {
        TaskError::Fatal(message.to_string())
    }

    /// The answer to an HTTP 429 (or 503) from the value of its
    /// `Retry-After` header, if any: seconds (`120`) or an HTTP date
    /// (`Wed, 21 Oct 2026 07:28:00 GMT`, counted from this host's clock).
    /// A header that is missing or cannot be read is a 429 without
    /// Retry-After: adaptive limits slow down (SPEC §6).
    ///
    /// ```
    /// use std::time::Duration;
    /// use syncq::TaskError;
    ///
    /// // In a handler: `if status == 429 { return Err(TaskError::too_many_requests(
    /// //     response.headers().get("retry-after").and_then(|v| v.to_str().ok()))); }`
    /// assert!(matches!(
    ///     TaskError::too_many_requests(Some("30")),
    ///     TaskError::RateLimited { retry_after: Some(d) } if d == Duration::from_secs(30)
    /// ));
    /// assert!(matches!(
    ///     TaskError::too_many_requests(None),
    ///     TaskError::RateLimited { retry_after: None }
    /// ));
    /// ```
    pub fn too_many_requests(retry_after: Option<&str>) -> Self {
        TaskError::RateLimited {
            retry_after: retry_after.and_then(parse_retry_after),
        }
    }
}

/// Reads an HTTP `Retry-After` value: delay-seconds (a decimal fraction is
/// taken too) or an HTTP date, as a wait from now (zero for a date past).
/// `None` when it is neither.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

impl fmt::Display for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TaskError::Retryable(m) => write!(f, "{m}"),
            TaskError::Invalid(m) => write!(f, "invalid: {m}"),
            TaskError::RateLimited {
                retry_after: Some(d),
            } => write!(f, "rate limited: retry after {} ms", d.as_millis()),
            TaskError::RateLimited { retry_after: None } => write!(f, "rate limited"),
            TaskError::Snooze(d) => write!(f, "snoozed for {} ms", d.as_millis()),
            TaskError::Cancelled => write!(f, "cancelled"),
            TaskError::Fatal(m) => write!(f, "fatal: {m}"),
            TaskError::Interrupted => write!(f, "interrupted by a checkpoint"),
            TaskError::LeaseLost => write!(f, "lease lost"),
        }
    }
}

impl fmt::Debug for TaskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskError({self})")
    }
}

/// Any error converts into a retryable one, so `?` works in handlers.
///
/// `TaskError` deliberately does not implement `std::error::Error`, which is
/// what makes this blanket conversion possible.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for TaskError {
    fn from(error: E) -> Self {
        TaskError::Retryable(error.to_string())
    }
}

impl From<Stop> for TaskError {
    fn from(stop: Stop) -> Self {
        match stop {
            Stop::Checkpoint => TaskError::Interrupted,
            Stop::Cancel => TaskError::Cancelled,
            Stop::LeaseLost => TaskError::LeaseLost,
        }
    }
}

/// What an attempt's outcome did to its task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeKind {
    /// `succeeded`.
    Succeeded,
    /// A counted failure: back to `queued` with backoff, or `failed` if none left.
    Retried,
    /// `failed` at once (invalid request).
    Failed,
    /// Back to `queued`, not counted; dataset throttled (or, without a
    /// Retry-After, its adaptive limits slowed down).
    Throttled,
    /// Back to `queued` later, not counted, nothing throttled.
    Snoozed,
    /// `cancelled`.
    Cancelled,
    /// Back to `queued`, not counted, checkpoint kept (checkpoint, abort, fatal).
    Released,
    /// Nothing written: another worker holds the task.
    LeaseLost,
}

/// The decision for one finished attempt: SPEC §3 in one `match`.
#[derive(Debug)]
pub(crate) enum Outcome {
    Succeed(Value),
    Retry(String),
    Fail(String),
    Throttle(String, Option<Duration>),
    Snooze(Duration),
    Cancel,
    Release(Option<String>),
    Fatal(String),
    Abandon,
}

impl Outcome {
    /// Maps a handler's result. `checkpointing`: the pool is shutting down,
    /// so a retryable error is taken as the interruption it most likely is.
    pub(crate) fn of(joined: Result<TaskResult, JoinError>, checkpointing: bool) -> Outcome {
        match joined {
            Ok(Ok(value)) => Outcome::Succeed(value),
            Ok(Err(error)) => match error {
                TaskError::Retryable(_) if checkpointing => Outcome::Release(None),
                TaskError::Retryable(m) => Outcome::Retry(m),
                TaskError::Invalid(m) => Outcome::Fail(format!("invalid: {m}")),
                e @ TaskError::RateLimited { retry_after } => {
                    Outcome::Throttle(e.to_string(), retry_after)
                }
                TaskError::Snooze(d) => Outcome::Snooze(d),
                TaskError::Cancelled => Outcome::Cancel,
                TaskError::Fatal(m) => Outcome::Fatal(m),
                TaskError::Interrupted => Outcome::Release(None),
                TaskError::LeaseLost => Outcome::Abandon,
            },
            Err(e) if e.is_panic() => Outcome::Retry(format!(
                "handler panicked: {}",
                panic_message(e.into_panic())
            )),
            // Aborted after the grace period.
            Err(_) => Outcome::Release(None),
        }
    }

    /// What it does to `task` (its counted attempts include this one), as
    /// the row ends: a counted failure with no attempt left is `Failed`; a
    /// snooze past the bound is a counted failure.
    pub(crate) fn kind(&self, task: &crate::task::ClaimedTask) -> OutcomeKind {
        let last = task.attempts >= task.max_attempts;
        match self {
            Outcome::Succeed(_) => OutcomeKind::Succeeded,
            Outcome::Retry(_) if last => OutcomeKind::Failed,
            Outcome::Retry(_) => OutcomeKind::Retried,
            Outcome::Snooze(_) if task.snoozes >= TaskError::MAX_SNOOZES && last => {
                OutcomeKind::Failed
            }
            Outcome::Snooze(_) if task.snoozes >= TaskError::MAX_SNOOZES => OutcomeKind::Retried,
            Outcome::Fail(_) => OutcomeKind::Failed,
            Outcome::Throttle(..) => OutcomeKind::Throttled,
            Outcome::Snooze(_) => OutcomeKind::Snoozed,
            Outcome::Cancel => OutcomeKind::Cancelled,
            Outcome::Release(_) | Outcome::Fatal(_) => OutcomeKind::Released,
            Outcome::Abandon => OutcomeKind::LeaseLost,
        }
    }
}

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl Outcome {
    /// What the one writer of outcomes is to write (`None` for `Abandon`:
    /// nothing). `attempts` is the task's counted attempts at claim, for
    /// the backoff.
    pub(crate) fn end(&self, attempts: i32, config: &PoolConfig) -> Option<End> {
        Some(match self {
            Outcome::Succeed(value) => End::Succeed(value.clone()),
            Outcome::Retry(m) => End::Retry {
                error: m.clone(),
                backoff: config.backoff.delay(u32::try_from(attempts).unwrap_or(0)),
            },
            Outcome::Fail(m) => End::Fail(m.clone()),
            Outcome::Throttle(m, Some(wait)) => End::Throttle {
                error: m.clone(),
                wait: *wait,
            },
            Outcome::Throttle(m, None) => End::Slowdown {
                error: m.clone(),
                wait: config.default_retry_after,
            },
            Outcome::Snooze(wait) => End::Snooze {
                wait: *wait,
                error: format!(
                    "snoozed more than {} times: counted as a failed attempt",
                    TaskError::MAX_SNOOZES
                ),
            },
            Outcome::Cancel => End::Cancel,
            Outcome::Release(error) => End::Release(error.clone()),
            Outcome::Fatal(m) => End::Release(Some(format!("fatal: {m}"))),
            Outcome::Abandon => return None,
        })
    }
}

/// Writes one outcome through the one writer (`syncq.complete_many`), for
/// `syncq::testing`; the pool batches them in its completer. False: fenced
/// out (or `Abandon`, which writes nothing).
pub(crate) async fn write_outcome(
    db: &Db,
    fence: Fence<'_>,
    outcome: &Outcome,
    attempts: i32,
    config: &PoolConfig,
) -> sqlx::Result<bool> {
    match outcome.end(attempts, config) {
        Some(end) => store::tasks::complete_one(db, fence, end).await,
        None => Ok(false),
    }
}
