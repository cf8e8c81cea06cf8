//! Helpers for testing your `SyncWorker`s against a real database, in the
//! spirit of River's `rivertest` and `Oban.Testing`.
//!
//! - [`run_task`] enqueues a task, runs your handler on it once — with the
//!   same fenced statements a `WorkerPool` uses — and returns the row as it
//!   ended up: status, attempts, result, checkpoint, error.
//! - [`enqueued`] and [`assert_enqueued`] look at what your code enqueued.
//! - [`prepare_database_url`] makes `DATABASE_URL` point at a server that
//!   answers, starting a private one when none does (see
//!   [`LocalPostgres`]).
//!
//! ```no_run
//! use serde_json::json;
//! use syncq::testing::{assert_enqueued, run_task};
//! use syncq::{NewTask, SyncTask, SyncWorker, TaskResult, async_trait};
//!
//! /// Fetches one page and enqueues the next.
//! struct FetchPage;
//!
//! #[async_trait]
//! impl SyncWorker for FetchPage {
//!     async fn handle(&self, task: &mut SyncTask) -> TaskResult {
//!         let page = task.payload()["page"].as_u64().unwrap_or(1);
//!         if page < 3 {
//!             task.enqueue(NewTask::new(task.dataset_id(), "fetch_page")
//!                 .payload(json!({ "page": page + 1 }))).await?;
//!         }
//!         Ok(json!({ "fetched": page }))
//!     }
//! }
//!
//! #[sqlx::test(migrator = "syncq::MIGRATOR")]
//! async fn fetching_a_page_enqueues_the_next(db: sqlx::PgPool) {
//!     let done = run_task(&db, &FetchPage, NewTask::new("github", "fetch_page")
//!         .payload(json!({ "page": 1 }))).await.unwrap();
//!     assert_eq!(done.status, syncq::TaskStatus::Succeeded);
//!     assert_eq!(done.result, Some(json!({ "fetched": 1 })));
//!     assert_enqueued(&db, "github", "fetch_page", json!({ "page": 2 })).await;
//! }
//! ```

use std::sync::Arc;

use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::PoolConfig;
use crate::error::{Error, Result};
use crate::local_postgres::LocalPostgres;
use crate::outcome::Outcome;
use crate::store;
use crate::store::tasks::Fence;
use crate::sync_task::{SyncTask, TaskContext};
use crate::task::{NewTask, TaskId, TaskStatus};
use crate::worker::SyncWorker;

/// A task row as a test sees it after a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TestedTask {
    /// `id`.
    pub id: TaskId,
    /// `status`: `succeeded`, `failed`, `queued` (retry, throttle or
    /// release), `cancelled`.
    pub status: TaskStatus,
    /// Counted attempts.
    pub attempts: i32,
    /// `result` of a success.
    pub result: Option<Value>,
    /// The checkpoint the handler saved.
    pub checkpoint: Option<Value>,
    /// `last_error`.
    pub last_error: Option<String>,
}

/// Enqueues `task` and runs `worker` on it once, recording the outcome as
/// a pool would (retryable errors go back to `queued` with backoff, invalid
/// ones to `failed`, and so on). Returns the row afterwards.
pub async fn run_task(db: &PgPool, worker: &dyn SyncWorker, task: NewTask) -> Result<TestedTask> {
    let id = crate::TaskQueueManager::new(db.clone())
        .enqueue(task)
        .await?;
    run_enqueued(db, worker, id).await
}

/// Runs `worker` once on the queued task `id` (whatever its dataset's turn,
/// limits or `run_at`), as [`run_task`] does.
pub async fn run_enqueued(db: &PgPool, worker: &dyn SyncWorker, id: TaskId) -> Result<TestedTask> {
    let worker_id: Arc<str> = Arc::from(format!("syncq-testing-{}", std::process::id()));
    let config = PoolConfig::default();
    let claimed = store::tasks::claim_by_id(db, id, &worker_id, config.lease)
        .await?
        .ok_or_else(|| Error::InvalidTask(format!("task {id} is not queued")))?;
    let (commands, _) = broadcast::channel(16);
    let db = crate::db::Db::from(db);
    let ctx = TaskContext {
        db: db.clone(),
        lease: crate::lease::Lease::new(tokio::time::Instant::now(), config.lease),
        worker_id: worker_id.clone(),
        commands,
        checkpoint: CancellationToken::new(),
    };
    let mut sync_task = SyncTask::new(claimed.clone(), ctx);
    let result = worker.handle(&mut sync_task).await;
    let fence = Fence {
        id,
        runs: claimed.runs,
        worker_id: &worker_id,
    };
    crate::outcome::write_outcome(
        &db,
        fence,
        &Outcome::of(Ok(result), false),
        claimed.attempts,
        &config,
    )
    .await?;
    tested(db.pool(), id).await
}

async fn tested(db: &PgPool, id: TaskId) -> Result<TestedTask> {
    let row = store::reports::task(db, id)
        .await?
        .ok_or_else(|| Error::InvalidTask(format!("task {id} is gone")))?;
    Ok(TestedTask {
        id,
        status: row.status,
        attempts: row.attempts,
        result: row.result,
        checkpoint: row.checkpoint,
        last_error: row.last_error,
    })
}

/// A queued task, as [`enqueued`] lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct EnqueuedTask {
    /// `id`.
    pub id: TaskId,
    /// `payload`.
    pub payload: Value,
    /// `priority`.
    pub priority: i16,
    /// `unique_key`.
    pub unique_key: Option<String>,
}

/// The queued tasks of `kind` in `dataset`, oldest first.
pub async fn enqueued(db: &PgPool, dataset: &str, kind: &str) -> Result<Vec<EnqueuedTask>> {
    Ok(store::reports::queued_of_kind(db, dataset, kind)
        .await?
        .into_iter()
        .map(|(id, payload, priority, unique_key)| EnqueuedTask {
            id,
            payload,
            priority,
            unique_key,
        })
        .collect())
}

/// Asserts that a task of `kind` is queued in `dataset` whose payload
/// contains `payload` (JSON containment, as `@>`), and returns it. Panics
/// listing what is queued otherwise.
pub async fn assert_enqueued(
    db: &PgPool,
    dataset: &str,
    kind: &str,
    payload: Value,
) -> EnqueuedTask {
    let queued = match enqueued(db, dataset, kind).await {
        Ok(q) => q,
        Err(e) => panic!("assert_enqueued: cannot read the queue: {e}"),
    };
    if let Some(found) = queued.iter().find(|t| contains(&t.payload, &payload)) {
        return found.clone();
    }
    let seen: Vec<String> = queued.iter().map(|t| t.payload.to_string()).collect();
    panic!(
        "no queued {kind:?} task in dataset {dataset:?} with a payload containing {payload}; queued: [{}]",
        seen.join(", ")
    );
}

/// JSON containment, as PostgreSQL's `jsonb @>`.
fn contains(haystack: &Value, needle: &Value) -> bool {
    match (haystack, needle) {
        (Value::Object(h), Value::Object(n)) => n
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| contains(hv, v))),
        (Value::Array(h), Value::Array(n)) => n.iter().all(|v| h.iter().any(|hv| contains(hv, v))),
        (h, n) => h == n,
    }
}

/// Makes `DATABASE_URL` name a server that answers, with its database
/// created: when it is unset or the local default
/// (`postgres://postgres@127.0.0.1:5432/syncq`) and nothing answers there,
/// starts a private cluster and points `DATABASE_URL` at it — keep the
/// returned value alive for as long as the tests run (dropping it removes
/// the cluster). Blocking; meant for a test binary's set-up, before its
/// tests start (this crate's own tests call it from a `ctor`).
pub fn prepare_database_url() -> Result<Option<LocalPostgres>> {
    let default = crate::db::DEFAULT_DATABASE_URL;
    let url = std::env::var("DATABASE_URL").unwrap_or_else(|_| default.to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::LocalPostgres(format!("cannot start a runtime: {e}")))?;
    let answers = runtime.block_on(ensure_database(&url));
    let (private, url) = match answers {
        Ok(()) => (None, url),
        Err(_) if url == default => {
            let pg = LocalPostgres::start()?;
            let url = pg.url("syncq");
            runtime.block_on(ensure_database(&url))?;
            (Some(pg), url)
        }
        Err(e) => return Err(e),
    };
    drop(runtime);
    // SAFETY-relevant: called before the tests start their threads.
    // SAFETY: the runtime above is dropped (its threads joined); this runs
    // before any test thread exists, so nothing reads the environment
    // concurrently.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("DATABASE_URL", &url)
    };
    Ok(private)
}

/// Connects to `url`'s server and creates its database if missing.
async fn ensure_database(url: &str) -> Result<()> {
    let options: sqlx::postgres::PgConnectOptions = url
        .parse()
        .map_err(|e| Error::LocalPostgres(format!("invalid DATABASE_URL: {e}")))?;
    store::server::create_database_if_missing(&options).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::contains;
    use serde_json::json;

    #[test]
    fn containment_is_jsonb_at_greater() {
        let row = json!({ "page": 2, "tags": ["a", "b"], "meta": { "x": 1, "y": 2 } });
        assert!(contains(&row, &json!({ "page": 2 })));
        assert!(contains(
            &row,
            &json!({ "tags": ["b"], "meta": { "y": 2 } })
        ));
        assert!(!contains(&row, &json!({ "page": 3 })));
        assert!(!contains(&row, &json!({ "tags": ["c"] })));
        assert!(contains(&row, &json!({})));
    }
}
