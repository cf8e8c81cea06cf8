//! The `SyncWorker` trait users implement, and `TaskError`, the outcomes a
//! handler can report.
//!
//! What each outcome does to the task is decided in one place,
//! [`crate::pool`]'s `Outcome::of`, and follows SPEC §3:
//!
//! | handler returns | the task |
//! | --- | --- |
//! | `Ok(value)` | `succeeded`, `result` stored |
//! | `Retryable` (or any `?`-propagated error, or a panic) | `queued` with backoff until `max_attempts`, then `failed` |
//! | `Invalid` | `failed` at once |
//! | `RateLimited { retry_after }` | `queued`, attempt not counted, dataset throttled |
//! | `Cancelled` | `cancelled` |
//! | `Fatal` | `queued` with its checkpoint, attempt not counted; the pool checkpoints and stops |
//! | `Interrupted` | `queued` with its checkpoint, attempt not counted |
//! | `LeaseLost` | nothing is written: another holder owns the task |

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::task::SyncTask;

/// What a handler returns: a JSON result, stored in `syncq.tasks.result`.
pub type TaskResult = Result<Value, TaskError>;

/// A handler for one task kind.
///
/// ```
/// use syncq::{async_trait, SyncTask, SyncWorker, TaskError, TaskResult};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct FetchPage { page: u32 }
///
/// struct Fetcher;
///
/// #[async_trait]
/// impl SyncWorker for Fetcher {
///     async fn handle(&self, task: &mut SyncTask) -> TaskResult {
///         let input: FetchPage = task.payload_as()?;
///         if input.page == 0 {
///             return Err(TaskError::Invalid("pages start at 1".into()));
///         }
///         Ok(serde_json::json!({ "fetched": input.page }))
///     }
/// }
/// ```
#[async_trait]
pub trait SyncWorker: Send + Sync + 'static {
    /// Runs one attempt of `task`.
    async fn handle(&self, task: &mut SyncTask) -> TaskResult;
}

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
    /// The upstream said "rate limit exceeded": throttle the whole dataset
    /// until `retry_after` (the pool's default when `None`); the attempt is
    /// not counted.
    RateLimited {
        /// How long the upstream asked to wait.
        retry_after: Option<Duration>,
    },
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
