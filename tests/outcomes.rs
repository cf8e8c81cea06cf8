//! SPEC §3: what each handler result does to its task, and the claim's
//! ordering, delays and kind filter.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{
    NewTask, PoolConfig, SyncTask, SyncWorker, TaskQueueManager, TaskResult, WorkerPool,
    async_trait,
};

const WAIT: Duration = Duration::from_secs(15);

fn builtin_pool(db: &PgPool, config: PoolConfig) -> WorkerPool {
    WorkerPool::builder(db.clone())
        .register_builtins()
        .config(config)
        .build()
        .unwrap()
}

async fn errors_of(db: &PgPool, id: i64) -> Vec<(i32, String)> {
    sqlx::query_as("SELECT attempt, error FROM syncq.task_errors WHERE task_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(db)
        .await
        .unwrap()
}

#[sqlx::test]
async fn retryable_errors_retry_with_backoff_until_success(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "fail", json!({"error": "retryable", "times": 2})).await;
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!((row.attempts, row.runs), (3, 3));
    let errors = errors_of(&db, id).await;
    assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);
}

#[sqlx::test]
async fn retryable_errors_end_failed_after_max_attempts(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = TaskQueueManager::new(db.clone())
        .enqueue(
            NewTask::new("d", "fail")
                .payload(json!({"error": "retryable"}))
                .max_attempts(3),
        )
        .await
        .unwrap();
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, id, "failed").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!((row.attempts, row.max_attempts), (3, 3));
    assert!(row.last_error.unwrap().contains("run 3"));
    assert_eq!(errors_of(&db, id).await.len(), 3);
}

#[sqlx::test]
async fn invalid_fails_at_once(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "fail", json!({"error": "invalid"})).await;
    let bad = common::insert(&db, "d", "sleep", json!({"ms": "ten"})).await;
    let missing = common::insert(&db, "d", "count", json!({"step_ms": 1})).await;
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, id, "failed").await;
    common::wait_status(&db, bad, "failed").await;
    common::wait_status(&db, missing, "failed").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    assert_eq!(common::task(&db, id).await.attempts, 1);
    // A malformed payload for a built-in kind names the field.
    let bad = common::task(&db, bad).await;
    assert_eq!(bad.attempts, 1);
    let error = bad.last_error.unwrap();
    assert!(
        error.contains("ms:") && error.contains("invalid type"),
        "{error}"
    );
    let error = common::task(&db, missing).await.last_error.unwrap();
    assert!(error.contains("missing field `to`"), "{error}");
}

#[sqlx::test]
async fn rate_limited_is_not_counted_and_throttles_the_dataset(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(
        &db,
        "api",
        "fail",
        json!({"error": "rate_limited", "times": 1, "retry_after_ms": 1500}),
    )
    .await;
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    // After the first run, the dataset is throttled ~1.5 s ahead.
    common::wait_for("the dataset is throttled", WAIT, || {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT throttled_until > now() + interval '1 second' FROM syncq.datasets WHERE dataset_id = 'api'",
            )
            .fetch_one(&db)
            .await
            .unwrap_or(false)
        }
    })
    .await;
    // Another task of the dataset does not start while throttled; others do.
    let same = common::insert(&db, "api", "noop", json!({})).await;
    let other = common::insert(&db, "other", "noop", json!({})).await;
    common::wait_status(&db, other, "succeeded").await;
    assert_eq!(common::status(&db, same).await, "queued");
    common::wait_status(&db, id, "succeeded").await;
    common::wait_status(&db, same, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let (throttle_done, started_after): (bool, bool) = sqlx::query_as(
        "SELECT d.throttled_until <= now(), t.started_at >= d.throttled_until
         FROM syncq.datasets d, syncq.tasks t WHERE d.dataset_id = 'api' AND t.id = $1",
    )
    .bind(same)
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(throttle_done && started_after);
    // The throttled run gave its attempt back.
    let row = common::task(&db, id).await;
    assert_eq!((row.attempts, row.runs), (1, 2));
}

#[sqlx::test]
async fn fatal_releases_the_task_uncounted_and_stops_the_pool(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "fail", json!({"error": "fatal", "times": 1})).await;
    let pool = builtin_pool(&db, common::fast_config());
    let err = tokio::time::timeout(WAIT, pool.run())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, syncq::Error::Fatal { task_id, .. } if task_id == id),
        "{err}"
    );
    let row = common::task(&db, id).await;
    assert_eq!((row.status.as_str(), row.attempts), ("queued", 0));
    // A claim already in flight when the pool began to stop may take the
    // released task once more; it is handed back unstarted and uncounted.
    assert!((1..=2).contains(&row.runs), "runs = {}", row.runs);
    assert_eq!(row.checkpoint, Some(json!({"runs": 1})));
    // The registry row is gone after a clean stop.
    let workers: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.workers")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(workers, 0);
    // The next pool resumes it: the error is not repeated.
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    assert_eq!(common::task(&db, id).await.attempts, 1);
}

struct Panics;

#[async_trait]
impl SyncWorker for Panics {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        if task.attempt() == 1 {
            panic!("boom on attempt 1");
        }
        Ok(json!("recovered"))
    }
}

#[sqlx::test]
async fn a_panic_is_retryable_and_the_worker_lives_on(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "panics", json!({})).await;
    let pool = WorkerPool::builder(db.clone())
        .register("panics", Panics)
        .register_builtins()
        .config(PoolConfig {
            concurrency: 1,
            ..common::fast_config()
        })
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_status(&db, id, "succeeded").await;
    let next = common::insert(&db, "d", "noop", json!({})).await;
    common::wait_status(&db, next, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!(row.attempts, 2);
    assert_eq!(row.result, Some(json!("recovered")));
    assert!(
        errors_of(&db, id).await[0]
            .1
            .contains("handler panicked: boom on attempt 1")
    );
}

/// Records the order in which tasks start.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<i64>>>);

#[async_trait]
impl SyncWorker for Recorder {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        self.0.lock().unwrap().push(task.id());
        Ok(json!(null))
    }
}

#[sqlx::test]
async fn within_a_dataset_priority_then_run_at_then_id(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    let past = chrono::Utc::now() - chrono::Duration::hours(1);
    let a = manager
        .enqueue(NewTask::new("d", "rec").priority(1))
        .await
        .unwrap();
    let b = manager.enqueue(NewTask::new("d", "rec")).await.unwrap();
    let c = manager
        .enqueue(NewTask::new("d", "rec").run_at(past))
        .await
        .unwrap();
    let d = manager
        .enqueue(NewTask::new("d", "rec").priority(-5))
        .await
        .unwrap();
    let e = manager.enqueue(NewTask::new("d", "rec")).await.unwrap();
    let recorder = Recorder::default();
    let pool = WorkerPool::builder(db.clone())
        .register("rec", recorder.clone())
        .config(PoolConfig {
            concurrency: 1,
            ..common::fast_config()
        })
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_status(&db, a, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    assert_eq!(*recorder.0.lock().unwrap(), vec![d, c, b, e, a]);
}

#[sqlx::test]
async fn a_delayed_task_starts_on_time_without_a_notify(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = TaskQueueManager::new(db.clone())
        .enqueue(NewTask::new("d", "noop").delay(Duration::from_millis(1500)))
        .await
        .unwrap();
    let config = PoolConfig {
        poll_interval: Duration::from_secs(1),
        ..common::fast_config()
    };
    let (handle, run) = common::spawn(builtin_pool(&db, config));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        common::status(&db, id).await,
        "queued",
        "started before run_at"
    );
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    // Started no earlier than run_at and within about a poll interval of it.
    let (early, late): (bool, bool) = sqlx::query_as(
        "SELECT started_at < run_at, started_at > run_at + interval '1.5 seconds' FROM syncq.tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(!early && !late);
}

#[sqlx::test]
async fn a_worker_claims_only_kinds_it_has_handlers_for(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let foreign = common::insert(&db, "d", "someone_elses_kind", json!({})).await;
    let mine = common::insert(&db, "d", "noop", json!({})).await;
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, mine, "succeeded").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, foreign).await;
    assert_eq!((row.status.as_str(), row.runs), ("queued", 0));
}

#[sqlx::test]
async fn poll_only_mode_still_runs_tasks(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let config = PoolConfig {
        listen: false,
        ..common::fast_config()
    };
    let (handle, run) = common::spawn(builtin_pool(&db, config));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let id = common::insert(&db, "d", "noop", json!({})).await;
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

#[sqlx::test]
async fn a_paused_dataset_starts_nothing_until_resumed(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    manager.queue("slow").pause().await.unwrap();
    let held = common::insert(&db, "slow", "noop", json!({})).await;
    let free = common::insert(&db, "fast", "noop", json!({})).await;
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, free, "succeeded").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(common::status(&db, held).await, "queued");
    manager.queue("slow").resume().await.unwrap();
    common::wait_status(&db, held, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

/// Returns a result PostgreSQL cannot store (a NUL character in jsonb).
struct UnstorableResult;

#[async_trait]
impl SyncWorker for UnstorableResult {
    async fn handle(&self, _task: &mut SyncTask) -> TaskResult {
        Ok(json!({ "text": "nul \u{0} here" }))
    }
}

/// Successes are written in batches; one whose result the database refuses
/// must not take its batch down with it: the others succeed once, and it
/// fails at once with the reason, instead of being retried by lease expiry.
#[sqlx::test]
async fn a_result_the_database_refuses_fails_alone_in_its_batch(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    let bad = manager
        .enqueue(NewTask::new("d", "unstorable"))
        .await
        .unwrap();
    manager
        .enqueue_many((0..200).map(|_| NewTask::new("d", "noop")))
        .await
        .unwrap();
    let pool = WorkerPool::builder(db.clone())
        .register_builtins()
        .register("unstorable", UnstorableResult)
        .config(PoolConfig {
            concurrency: 64,
            ..common::fast_config()
        })
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_for("every task finished", WAIT, || {
        let db = db.clone();
        async move { common::count(&db, "status IN ('queued', 'running')").await == 0 }
    })
    .await;
    handle.checkpoint();
    run.await.unwrap().unwrap();

    assert_eq!(
        common::count(
            &db,
            "kind = 'noop' AND status = 'succeeded' AND attempts = 1"
        )
        .await,
        200
    );
    let row = common::task(&db, bad).await;
    assert_eq!((row.status.as_str(), row.attempts), ("failed", 1));
    let error = row.last_error.unwrap_or_default();
    assert!(error.contains("result could not be stored"), "{error}");
}
