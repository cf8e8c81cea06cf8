//! `TaskQueue`: one dataset's queue — its rows in `syncq.tasks` and its
//! settings row in `syncq.datasets`.

use serde_json::Value;
use sqlx::PgPool;

use crate::error::Result;
use crate::manager::TaskQueueManager;
use crate::store;
pub use crate::store::datasets::DatasetRow as QueueSettings;
use crate::task::{NewTask, TaskId};

/// One dataset's queue.
#[derive(Debug, Clone)]
pub struct TaskQueue {
    db: PgPool,
    dataset_id: String,
}

impl TaskQueue {
    pub(crate) fn new(db: PgPool, dataset_id: String) -> Self {
        TaskQueue { db, dataset_id }
    }

    /// The dataset's id.
    pub fn dataset_id(&self) -> &str {
        &self.dataset_id
    }

    /// Enqueues a task of `kind` with `payload` in this dataset.
    pub async fn enqueue(&self, kind: impl Into<String>, payload: Value) -> Result<TaskId> {
        TaskQueueManager::new(self.db.clone())
            .enqueue(NewTask::new(self.dataset_id.clone(), kind).payload(payload))
            .await
    }

    /// The dataset's settings, or `None` if it has never been used.
    pub async fn settings(&self) -> Result<Option<QueueSettings>> {
        Ok(store::datasets::get(&self.db, &self.dataset_id).await?)
    }

    /// Stops new starts of this dataset in every process; running tasks finish.
    pub async fn pause(&self) -> Result<()> {
        Ok(store::datasets::set_paused(&self.db, &self.dataset_id, true).await?)
    }

    /// Lets the dataset's tasks start again.
    pub async fn resume(&self) -> Result<()> {
        Ok(store::datasets::set_paused(&self.db, &self.dataset_id, false).await?)
    }
}
