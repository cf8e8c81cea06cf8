//! Write a `SyncWorker`: a handler that pages through an upstream, saving
//! its cursor as a checkpoint so a restart resumes where it stopped, and
//! mapping upstream failures onto `TaskError`.
//!
//! Run it against a local PostgreSQL (it enqueues one task and drains it):
//!
//! ```sh
//! cargo run --example sync_worker
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use syncq::{
    NewTask, PoolConfig, Stop, SyncTask, SyncWorker, TaskError, TaskQueueManager, TaskResult,
    WorkerPool, async_trait,
};

/// The task's input: which upstream collection to copy, and how many pages.
#[derive(Deserialize)]
struct SyncCollection {
    collection: String,
    pages: u32,
}

/// The progress saved after each page.
#[derive(Serialize, Deserialize)]
struct Cursor {
    next_page: u32,
    items: u64,
}

/// A stand-in for an upstream API call.
async fn fetch_page(collection: &str, page: u32) -> Result<Vec<String>, TaskError> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    if collection.is_empty() {
        // 4xx: retrying cannot help.
        return Err(TaskError::invalid("collection must not be empty"));
    }
    Ok((0..10)
        .map(|i| format!("{collection}-{page}-{i}"))
        .collect())
}

struct CollectionSync;

#[async_trait]
impl SyncWorker for CollectionSync {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        let input: SyncCollection = task.payload_as()?;
        let mut cursor = task.checkpoint_as::<Cursor>()?.unwrap_or(Cursor {
            next_page: 1,
            items: 0,
        });
        while cursor.next_page <= input.pages {
            // Save and stop when the pool checkpoints (Ctrl-C) or cancels.
            if let Some(stop) = task.stop_requested() {
                return Err(match stop {
                    Stop::Checkpoint => TaskError::Interrupted,
                    other => other.into(),
                });
            }
            let items = fetch_page(&input.collection, cursor.next_page).await?;
            cursor.items += items.len() as u64;
            cursor.next_page += 1;
            task.save_checkpoint(&cursor).await?;
        }
        Ok(json!({ "items": cursor.items }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| syncq::cli::DEFAULT_DATABASE_URL.to_string());
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&url)
        .await?;
    syncq::migrate(&db).await?;

    let id = TaskQueueManager::new(db.clone())
        .enqueue(
            NewTask::new("example-crm", "sync_collection")
                .payload(json!({ "collection": "contacts", "pages": 5 })),
        )
        .await?;
    println!("enqueued task {id}");

    WorkerPool::builder(db)
        .register("sync_collection", CollectionSync)
        .config(PoolConfig {
            datasets: Some(vec!["example-crm".into()]),
            exit_when_idle: true,
            ..PoolConfig::default()
        })
        .build()?
        .run_with_signals()
        .await?;
    println!("done");
    Ok(())
}
