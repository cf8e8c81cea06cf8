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

use std::borrow::Cow;
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
    /// Longest error message stored (`last_error`, `syncq.task_errors`), in
    /// bytes; a longer one is cut at a character boundary and ends with
    /// `… [truncated from N bytes]`.
    pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

    /// Longest throttle a `RateLimited { retry_after }` sets: an upstream
    /// asking for longer is taken to mean this long (an operator can still
    /// pause the dataset).
    pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

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

/// `message` as it is stored: PostgreSQL's `text` cannot hold a NUL
/// character, so each is written as the two characters `\0`, and the
/// whole is at most [`TaskError::MAX_MESSAGE_BYTES`] long. Whatever a
/// handler or a panic says, its attempt's error can be recorded.
pub(crate) fn storable_message(message: &str) -> Cow<'_, str> {
    let max = TaskError::MAX_MESSAGE_BYTES;
    if message.len() <= max && !message.contains('\0') {
        return Cow::Borrowed(message);
    }
    let escaped = message.replace('\0', "\\0");
    if escaped.len() <= max {
        return Cow::Owned(escaped);
    }
    let marker = format!("… [truncated from {} bytes]", escaped.len());
    let mut cut = max.saturating_sub(marker.len());
    while !escaped.is_char_boundary(cut) {
        cut -= 1;
    }
    Cow::Owned(format!("{}{marker}", &escaped[..cut]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_message_becomes_storable(message in ".*", pad in 0usize..20_000) {
            let message = format!("{message}{}", "\0é".repeat(pad % 7_000));
            let stored = storable_message(&message);
            prop_assert!(!stored.contains('\0'));
            prop_assert!(stored.len() <= TaskError::MAX_MESSAGE_BYTES);
            if message.len() <= TaskError::MAX_MESSAGE_BYTES && !message.contains('\0') {
                prop_assert_eq!(stored.as_ref(), message.as_str());
            }
        }

        #[test]
        fn short_messages_keep_everything_but_nul(message in "[a-z\\x00]{0,200}") {
            let stored = storable_message(&message);
            prop_assert_eq!(stored.as_ref(), message.replace('\0', "\\0"));
        }
    }

    #[test]
    fn long_messages_say_they_were_cut() {
        let long = "x".repeat(100_000);
        let stored = storable_message(&long);
        assert!(
            stored.ends_with("… [truncated from 100000 bytes]"),
            "{stored}"
        );
        assert_eq!(stored.len(), TaskError::MAX_MESSAGE_BYTES);
    }
}
