//! SPEC §4: leases, rescue of silent holders, fencing of a holder that lost
//! its lease, and checkpoints on shutdown that the next holder resumes from.

mod common;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::maintenance::rescuer::Rescuer;
use syncq::store::tasks::{self, Fence};
use syncq::{
    Event, OutcomeKind, PoolConfig, Stop, SyncTask, SyncWorker, TaskError, TaskResult, WorkerPool,
    async_trait,
};
use tokio::sync::Notify;

const WAIT: Duration = Duration::from_secs(15);

async fn expire_lease(db: &PgPool, id: i64) {
    sqlx::query(
        "UPDATE syncq.tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(id)
    .execute(db)
    .await
    .unwrap();
}

fn kinds() -> Vec<String> {
    vec!["noop".to_string()]
}

#[sqlx::test]
async fn completion_is_fenced_against_a_holder_that_lost_its_lease(db: PgPool) {
    let id = common::insert(&db, "d", "noop", json!({})).await;
    let lease = Duration::from_secs(30);
    let a = tasks::claim(&db, "worker-a", &kinds(), None, &[], 1, lease)
        .await
        .unwrap();
    assert_eq!(a.len(), 1);
    // A goes silent; its lease expires; the rescuer takes the task back.
    expire_lease(&db, id).await;
    let rescued = Rescuer::new(Duration::from_secs(1))
        .run_once(&syncq::Db::from(&db))
        .await
        .unwrap();
    assert_eq!(rescued.len(), 1);
    assert_eq!(
        common::task(&db, id).await.attempts,
        1,
        "the lost attempt counts"
    );
    let b = tasks::claim(&db, "worker-b", &kinds(), None, &[], 1, lease)
        .await
        .unwrap();
    assert_eq!((b[0].id, b[0].runs, b[0].attempts), (id, 2, 2));

    // A wakes up: nothing it does lands.
    let fence_a = Fence {
        id,
        runs: a[0].runs,
        worker_id: "worker-a",
    };
    assert!(!tasks::succeed(&db, fence_a, &json!("stale")).await.unwrap());
    assert!(
        !tasks::save_checkpoint(&db, id, a[0].runs, "worker-a", &json!("stale"))
            .await
            .unwrap()
    );
    assert!(
        !tasks::fail_attempt(&db, fence_a, "stale", true, Duration::ZERO)
            .await
            .unwrap()
    );
    assert!(!tasks::release(&db, fence_a, None).await.unwrap());
    // Even the same worker id with the old token is refused.
    let same_worker_old_token = Fence {
        id,
        runs: a[0].runs,
        worker_id: "worker-b",
    };
    assert!(
        !tasks::succeed(&db, same_worker_old_token, &json!("stale"))
            .await
            .unwrap()
    );

    let fence_b = Fence {
        id,
        runs: b[0].runs,
        worker_id: "worker-b",
    };
    assert!(tasks::succeed(&db, fence_b, &json!("fresh")).await.unwrap());
    let row = common::task(&db, id).await;
    assert_eq!(
        (row.status.as_str(), row.result),
        ("succeeded", Some(json!("fresh")))
    );
    assert_eq!(row.checkpoint, None);
}

#[sqlx::test]
async fn an_expired_lease_fails_the_task_when_no_attempt_is_left(db: PgPool) {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, max_attempts) VALUES ('d', 'noop', 1) RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    tasks::claim(&db, "w", &kinds(), None, &[], 1, Duration::from_secs(30))
        .await
        .unwrap();
    expire_lease(&db, id).await;
    Rescuer::new(Duration::from_secs(1))
        .run_once(&syncq::Db::from(&db))
        .await
        .unwrap();
    let row = common::task(&db, id).await;
    assert_eq!((row.status.as_str(), row.attempts), ("failed", 1));
    assert!(row.last_error.unwrap().contains("lease expired: worker w"));
}

/// Blocks until released, ignoring every command: a handler stuck in I/O.
#[derive(Clone, Default)]
struct Stuck {
    started: Arc<Notify>,
    release: Arc<Notify>,
}

#[async_trait]
impl SyncWorker for Stuck {
    async fn handle(&self, _task: &mut SyncTask) -> TaskResult {
        self.started.notify_one();
        self.release.notified().await;
        Ok(json!("from the stuck holder"))
    }
}

#[sqlx::test]
async fn a_silent_pool_loses_its_task_to_another_pool(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "stuck", json!({})).await;
    let config = PoolConfig {
        lease: Duration::from_millis(800),
        heartbeat: Duration::from_millis(200),
        ..common::fast_config()
    };
    // Pool A takes the task, then dies without a word (its future is dropped:
    // no release, no more heartbeats — as with kill -9).
    let stuck = Stuck::default();
    let a = WorkerPool::builder(db.clone())
        .register("stuck", stuck.clone())
        .config(config.clone())
        .build()
        .unwrap();
    let a_id = a.worker_id().to_string();
    let a_run = tokio::spawn(a.run());
    tokio::time::timeout(WAIT, stuck.started.notified())
        .await
        .unwrap();
    a_run.abort();
    let _ = a_run.await;
    assert_eq!(common::task(&db, id).await.locked_by, Some(a_id));

    // Pool B, with a real handler for the kind, rescues and finishes it.
    struct Done;
    #[async_trait]
    impl SyncWorker for Done {
        async fn handle(&self, _task: &mut SyncTask) -> TaskResult {
            Ok(json!("from the rescuer"))
        }
    }
    let b = WorkerPool::builder(db.clone())
        .register("stuck", Done)
        .config(config)
        .build()
        .unwrap();
    let (handle, b_run) = common::spawn(b);
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    b_run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!((row.attempts, row.runs), (2, 2));
    assert_eq!(row.result, Some(json!("from the rescuer")));
}

#[sqlx::test]
async fn a_pool_whose_lease_was_taken_cannot_complete_the_task(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "stuck", json!({})).await;
    let stuck = Stuck::default();
    let a = WorkerPool::builder(db.clone())
        .register("stuck", stuck.clone())
        // One slot, held by the stuck handler: A cannot re-claim the task.
        .config(PoolConfig {
            concurrency: 1,
            ..common::fast_config()
        })
        .build()
        .unwrap();
    let (handle, run) = common::spawn(a);
    let mut events = handle.events();
    tokio::time::timeout(WAIT, stuck.started.notified())
        .await
        .unwrap();

    // The task is taken over behind A's back (as if A had been partitioned
    // away long enough for its lease to expire and another worker to claim).
    expire_lease(&db, id).await;
    Rescuer::new(Duration::from_secs(1))
        .run_once(&syncq::Db::from(&db))
        .await
        .unwrap();
    let b = tasks::claim(
        &db,
        "worker-b",
        &["stuck".to_string()],
        None,
        &[],
        1,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    assert_eq!(b.len(), 1);

    // A's handler now finishes: its success must not overwrite B's hold.
    stuck.release.notify_one();
    let finished = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(Event::Finished {
                task_id,
                outcome,
                recorded,
            }) = events.recv().await
                && task_id == id
            {
                return (outcome, recorded);
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(finished, (OutcomeKind::Succeeded, false));
    let row = common::task(&db, id).await;
    assert_eq!(
        (row.status.as_str(), row.locked_by.as_deref(), row.result),
        ("running", Some("worker-b"), None)
    );
    handle.checkpoint();
    run.await.unwrap().unwrap();
    // A's shutdown did not release B's task either.
    assert_eq!(common::status(&db, id).await, "running");
}

/// Heartbeats keep a long task's lease alive past the lease length.
#[sqlx::test]
async fn heartbeats_keep_a_long_task(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "sleep", json!({"ms": 2500})).await;
    let config = PoolConfig {
        lease: Duration::from_millis(700),
        heartbeat: Duration::from_millis(150),
        ..common::fast_config()
    };
    let pool = WorkerPool::builder(db.clone())
        .register_builtins()
        .config(config)
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!(
        (row.attempts, row.runs),
        (1, 1),
        "never rescued while heartbeating"
    );
}

#[sqlx::test]
async fn checkpoint_on_shutdown_then_resume_in_another_pool(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "count", json!({"to": 40, "step_ms": 50})).await;
    let first = WorkerPool::builder(db.clone())
        .register_builtins()
        .config(common::fast_config())
        .build()
        .unwrap();
    let (handle, run) = common::spawn(first);
    common::wait_for("some progress is saved", WAIT, || {
        let db = db.clone();
        async move {
            let row = common::task(&db, id).await;
            row.checkpoint
                .and_then(|c| c["counted"].as_i64())
                .unwrap_or(0)
                >= 5
        }
    })
    .await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!(
        (row.status.as_str(), row.attempts, row.locked_by),
        ("queued", 0, None)
    );
    let saved = row.checkpoint.unwrap()["counted"].as_u64().unwrap();
    assert!((5..40).contains(&saved), "{saved}");

    let second = WorkerPool::builder(db.clone())
        .register_builtins()
        .config(common::fast_config())
        .build()
        .unwrap();
    let (handle, run) = common::spawn(second);
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!(
        row.result,
        Some(json!({"counted": 40, "resumed_from": saved}))
    );
    assert_eq!((row.attempts, row.runs), (1, 2));
}

/// Ignores the checkpoint command entirely.
struct Deaf;

#[async_trait]
impl SyncWorker for Deaf {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        task.save_checkpoint(&json!({"step": 1})).await?;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        Ok(json!(null))
    }
}

#[sqlx::test]
async fn a_handler_that_ignores_the_grace_period_is_aborted_and_released(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "deaf", json!({})).await;
    let config = PoolConfig {
        shutdown_grace: Duration::from_millis(300),
        ..common::fast_config()
    };
    let pool = WorkerPool::builder(db.clone())
        .register("deaf", Deaf)
        .config(config)
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_for("the checkpoint is saved", WAIT, || {
        let db = db.clone();
        async move { common::task(&db, id).await.checkpoint.is_some() }
    })
    .await;
    handle.checkpoint();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let row = common::task(&db, id).await;
    assert_eq!((row.status.as_str(), row.attempts), ("queued", 0));
    assert_eq!(row.checkpoint, Some(json!({"step": 1})));
}

/// Reports what it heard.
struct Listener;

#[async_trait]
impl SyncWorker for Listener {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        match task.stopped().await {
            Stop::Cancel => Err(TaskError::Cancelled),
            other => Err(other.into()),
        }
    }
}

#[sqlx::test]
async fn a_running_task_hears_cancel_within_a_second(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "listen", json!({})).await;
    let pool = WorkerPool::builder(db.clone())
        .register("listen", Listener)
        .config(common::fast_config())
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_status(&db, id, "running").await;
    let asked = tokio::time::Instant::now();
    sqlx::query("UPDATE syncq.tasks SET cancel_requested = true WHERE id = $1")
        .bind(id)
        .execute(&db)
        .await
        .unwrap();
    common::wait_status(&db, id, "cancelled").await;
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    // A queued task that is cancelled never starts.
    let queued: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, run_at) VALUES ('d', 'listen', now() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    sqlx::query("UPDATE syncq.tasks SET cancel_requested = true WHERE id = $1")
        .bind(queued)
        .execute(&db)
        .await
        .unwrap();
    let row = common::task(&db, queued).await;
    assert_eq!((row.status.as_str(), row.runs), ("cancelled", 0));
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

#[sqlx::test]
async fn a_completion_batch_skips_only_the_task_whose_lease_was_lost(db: PgPool) {
    for _ in 0..3 {
        common::insert(&db, "d", "noop", json!({})).await;
    }
    let lease = Duration::from_secs(30);
    let mine = tasks::claim(&db, "worker-a", &kinds(), None, &[], 3, lease)
        .await
        .unwrap();
    assert_eq!(mine.len(), 3);
    let stolen = mine[1].id;
    expire_lease(&db, stolen).await;
    Rescuer::new(Duration::from_secs(1))
        .run_once(&syncq::Db::from(&db))
        .await
        .unwrap();
    let theirs = tasks::claim(&db, "worker-b", &kinds(), None, &[], 1, lease)
        .await
        .unwrap();
    assert_eq!(theirs[0].id, stolen);

    let batch: Vec<(i64, i32, serde_json::Value)> =
        mine.iter().map(|t| (t.id, t.runs, json!("a"))).collect();
    let mut written = tasks::succeed_many(&db, "worker-a", &batch).await.unwrap();
    written.sort();
    assert_eq!(written, vec![mine[0].id, mine[2].id]);
    let row = common::task(&db, stolen).await;
    assert_eq!(
        (row.status.as_str(), row.locked_by.as_deref(), row.result),
        ("running", Some("worker-b"), None)
    );
    // Written again (a retry after a lost reply): nothing changes.
    assert!(
        tasks::succeed_many(&db, "worker-a", &batch)
            .await
            .unwrap()
            .is_empty()
    );
}

#[sqlx::test]
async fn connections_killed_mid_drain_lose_nothing(_: PgPoolOptions, opts: PgConnectOptions) {
    let admin = common::connect(&opts).await;
    syncq::TaskQueueManager::new(admin.clone())
        .enqueue_many((0..1500).map(|i| {
            syncq::NewTask::new(format!("d{}", i % 3), "sleep").payload(json!({"ms": 10}))
        }))
        .await
        .unwrap();
    let worker_db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(12)
        .connect_with(opts.clone().application_name("syncq-chaos"))
        .await
        .unwrap();
    let pool = WorkerPool::builder(worker_db)
        .register_builtins()
        .config(PoolConfig {
            concurrency: 16,
            lease: Duration::from_secs(2),
            heartbeat: Duration::from_millis(300),
            ..common::fast_config()
        })
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    // Kill every connection of the pool a few times while it drains.
    let mut killed_mid_drain = 0;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = 'syncq-chaos'",
        )
        .fetch_one(&admin)
        .await
        .unwrap();
        if common::count(&admin, "status <> 'succeeded'").await > 0 {
            killed_mid_drain += killed;
        }
    }
    assert!(
        killed_mid_drain > 0,
        "no connection was killed while work remained"
    );
    common::wait_for("every task succeeded", Duration::from_secs(60), || {
        let db = admin.clone();
        async move { common::count(&db, "status = 'succeeded'").await == 1500 }
    })
    .await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    assert_eq!(common::count(&admin, "status <> 'succeeded'").await, 0);
}
