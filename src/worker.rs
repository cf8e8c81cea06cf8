//! The `SyncWorker` trait users implement.
//!
//! A handler returns a [`TaskResult`]: a JSON value, or a [`TaskError`](crate::TaskError)
//! saying why the attempt did not succeed. What each does to the task is
//! decided in one place, [`crate::outcome`] (SPEC §3).

use async_trait::async_trait;

use crate::outcome::TaskResult;
use crate::sync_task::SyncTask;

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
