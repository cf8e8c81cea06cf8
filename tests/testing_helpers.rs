//! `syncq::testing`: run a handler once against a task, and assert on what
//! it enqueued — what a user's own tests would do.

mod common;

use serde_json::json;
use sqlx::PgPool;
use syncq::testing::{assert_enqueued, enqueued, run_task};
use syncq::{NewTask, SyncTask, SyncWorker, TaskError, TaskResult, TaskStatus, async_trait};

/// Fetches a page, enqueues the next one up to page 3, fails on page 0.
struct FetchPage;

#[async_trait]
impl SyncWorker for FetchPage {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        let page = task.payload()["page"].as_u64().unwrap_or(0);
        match page {
            0 => Err(TaskError::invalid("pages start at 1")),
            99 => Err(TaskError::Retryable("upstream 503".into())),
            _ => {
                task.save_checkpoint(&json!({ "cursor": page })).await?;
                if page < 3 {
                    task.enqueue(
                        NewTask::new(task.dataset_id(), "fetch_page")
                            .payload(json!({ "page": page + 1 })),
                    )
                    .await?;
                }
                Ok(json!({ "fetched": page }))
            }
        }
    }
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn run_task_records_each_outcome_as_a_pool_would(db: PgPool) {
    let ok = run_task(
        &db,
        &FetchPage,
        NewTask::new("github", "fetch_page").payload(json!({ "page": 1 })),
    )
    .await
    .unwrap();
    assert_eq!(ok.status, TaskStatus::Succeeded);
    assert_eq!(
        (ok.attempts, ok.result.clone()),
        (1, Some(json!({ "fetched": 1 })))
    );
    assert_eq!(ok.checkpoint, Some(json!({ "cursor": 1 })));
    let next = assert_enqueued(&db, "github", "fetch_page", json!({ "page": 2 })).await;
    assert_eq!(
        enqueued(&db, "github", "fetch_page").await.unwrap(),
        vec![next]
    );

    let invalid = run_task(
        &db,
        &FetchPage,
        NewTask::new("github", "fetch_page").payload(json!({ "page": 0 })),
    )
    .await
    .unwrap();
    assert_eq!((invalid.status.as_str(), invalid.attempts), ("failed", 1));
    assert!(
        invalid
            .last_error
            .unwrap_or_default()
            .contains("pages start at 1")
    );

    let retry = run_task(
        &db,
        &FetchPage,
        NewTask::new("github", "fetch_page").payload(json!({ "page": 99 })),
    )
    .await
    .unwrap();
    assert_eq!((retry.status.as_str(), retry.attempts), ("queued", 1));
    assert_eq!(retry.last_error.as_deref(), Some("upstream 503"));
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
#[should_panic(
    expected = "no queued \"fetch_page\" task in dataset \"github\" with a payload containing {\"page\":7}"
)]
async fn assert_enqueued_names_what_is_missing(db: PgPool) {
    run_task(
        &db,
        &FetchPage,
        NewTask::new("github", "fetch_page").payload(json!({ "page": 1 })),
    )
    .await
    .unwrap();
    assert_enqueued(&db, "github", "fetch_page", json!({ "page": 7 })).await;
}
