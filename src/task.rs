//! What a task is: `TaskId`, `TaskStatus`, `NewTask` (what you enqueue)
//! and `ClaimedTask` (what a claim hands out). Plain data; the handle a
//! handler works with is [`SyncTask`](crate::SyncTask).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub use crate::task_id::TaskId;

/// `syncq.task_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskStatus {
    /// Waiting to run: new, delayed, or waiting to retry.
    Queued,
    /// Held by a worker.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished without success; will not be retried unless asked.
    Failed,
    /// Cancelled before it could finish.
    Cancelled,
}

impl TaskStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [TaskStatus; 5] = [
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Cancelled,
    ];

    /// The status as spelled in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the task is finished.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded | TaskStatus::Failed | TaskStatus::Cancelled
        )
    }
}

/// Read and written as text (`status::text`, `$1::syncq.task_status`):
/// decoding the enum type itself would make sqlx look its OID up in the
/// catalog on every new connection, a statement an idle worker should not
/// pay for.
impl sqlx::Type<sqlx::Postgres> for TaskStatus {
    fn type_info() -> sqlx::postgres::PgTypeInfo {
        <String as sqlx::Type<sqlx::Postgres>>::type_info()
    }

    fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
        <String as sqlx::Type<sqlx::Postgres>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, sqlx::Postgres> for TaskStatus {
    fn decode(value: sqlx::postgres::PgValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        let text = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
        Ok(text.parse()?)
    }
}

impl sqlx::Encode<'_, sqlx::Postgres> for TaskStatus {
    fn encode_by_ref(
        &self,
        buf: &mut sqlx::postgres::PgArgumentBuffer,
    ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
        <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status {s:?} (expected queued, running, succeeded, failed or cancelled)")
            })
    }
}

/// When a new task may first run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RunAt {
    /// As soon as possible (the database's `now()`).
    Now,
    /// This long after the database's `now()` at insert.
    After(Duration),
    /// At this instant.
    At(DateTime<Utc>),
}

/// A task to enqueue. Only the dataset and kind are required.
///
/// ```
/// use syncq::NewTask;
/// use std::time::Duration;
///
/// let task = NewTask::new("github", "fetch_page")
///     .payload(serde_json::json!({ "page": 1 }))
///     .priority(-1)
///     .delay(Duration::from_secs(30))
///     .unique_key("github:page:1");
/// assert_eq!(task.kind, "fetch_page");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// The dataset (`TaskQueue`) it belongs to.
    pub dataset_id: String,
    /// The handler kind.
    pub kind: String,
    /// Handler input.
    pub payload: Value,
    /// Lower runs first within a dataset.
    pub priority: i16,
    /// When it may first run.
    pub run_at: RunAt,
    /// Attempts allowed, at least 1.
    pub max_attempts: i32,
    /// At most one queued or running task per `(dataset_id, unique_key)`.
    pub unique_key: Option<String>,
}

impl NewTask {
    /// The default `max_attempts`, as in the table's default.
    pub const DEFAULT_MAX_ATTEMPTS: i32 = 5;

    /// A task of `kind` in `dataset_id`, with an empty object as payload.
    pub fn new(dataset_id: impl Into<String>, kind: impl Into<String>) -> Self {
        NewTask {
            dataset_id: dataset_id.into(),
            kind: kind.into(),
            payload: Value::Object(Default::default()),
            priority: 0,
            run_at: RunAt::Now,
            max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
            unique_key: None,
        }
    }

    /// Sets the payload.
    pub fn payload(mut self, payload: Value) -> Self {
        self.payload = payload;
        self
    }

    /// Sets the priority (lower runs first).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Delays the first run by `delay` (from the database clock).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.run_at = RunAt::After(delay);
        self
    }

    /// Sets the first run to an instant.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = RunAt::At(at);
        self
    }

    /// Sets the number of attempts allowed.
    pub fn max_attempts(mut self, max_attempts: i32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// Sets the unique key.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// Largest `max_attempts` (the column's constraint).
    pub const MAX_ATTEMPTS_LIMIT: i32 = 10_000;

    /// The range of a `delay` (about 100 years at most).
    pub const DELAY_RANGE: crate::config::DurationRange = crate::config::DurationRange {
        min: Duration::ZERO,
        max: Duration::from_secs(36_500 * 86_400),
    };

    pub(crate) fn validate(&self) -> crate::Result<()> {
        if let RunAt::After(delay) = self.run_at
            && !Self::DELAY_RANGE.contains(delay)
        {
            return Err(crate::Error::InvalidTask(format!(
                "delay must be {}",
                Self::DELAY_RANGE.describe()
            )));
        }
        if self.max_attempts > Self::MAX_ATTEMPTS_LIMIT {
            return Err(crate::Error::InvalidTask(format!(
                "max_attempts must be at most {}, got {}",
                Self::MAX_ATTEMPTS_LIMIT,
                self.max_attempts
            )));
        }
        if self.dataset_id.is_empty() {
            return Err(crate::Error::InvalidTask(
                "dataset_id must not be empty".into(),
            ));
        }
        if self.kind.is_empty() {
            return Err(crate::Error::InvalidTask("kind must not be empty".into()));
        }
        if self.max_attempts < 1 {
            return Err(crate::Error::InvalidTask(format!(
                "max_attempts must be at least 1, got {}",
                self.max_attempts
            )));
        }
        Ok(())
    }
}

/// What a claim hands to a worker: the row's fields a handler may read.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    /// `id`.
    pub id: TaskId,
    /// `dataset_id`.
    pub dataset_id: String,
    /// `kind`.
    pub kind: String,
    /// `payload`.
    pub payload: Value,
    /// `priority`.
    pub priority: i16,
    /// `attempts`, this one included.
    pub attempts: i32,
    /// `max_attempts`.
    pub max_attempts: i32,
    /// `runs` after this claim: the fencing token.
    pub runs: i32,
    /// `checkpoint` saved by an earlier attempt.
    pub checkpoint: Option<Value>,
    /// `created_at`.
    pub created_at: DateTime<Utc>,
    /// `started_at` of this attempt.
    pub started_at: DateTime<Utc>,
    /// `snoozes`: how many times it snoozed before this attempt.
    pub snoozes: i32,
}
