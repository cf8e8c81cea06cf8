//! SPEC §4–§5 for operators: cancel, retry, prune, inspection and roles,
//! through the `syncq` command and by SQL.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use syncq::maintenance::vacuumer::Vacuumer;
use syncq::{NewTask, PoolConfig, TaskQueueManager, WorkerPool};

const WAIT: Duration = Duration::from_secs(15);

fn syncq(opts: &PgConnectOptions, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(opts))
        .args(args)
        .output()
        .expect("run syncq")
}

fn ok(opts: &PgConnectOptions, args: &[&str]) -> String {
    let out = syncq(opts, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pool(db: &PgPool, config: PoolConfig) -> WorkerPool {
    WorkerPool::builder(db.clone())
        .register_builtins()
        .config(config)
        .build()
        .unwrap()
}

#[sqlx::test]
async fn cancel_by_cli_queued_running_and_finished(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let queued: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, run_at) VALUES ('d', 'noop', now() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(ok(&opts, &["cancel", &queued.to_string()]).contains("cancelled"));
    assert_eq!(common::status(&db, queued).await, "cancelled");

    let running = common::insert(&db, "d", "sleep", json!({"ms": 20000})).await;
    let done = common::insert(&db, "d", "noop", json!({})).await;
    let (handle, run) = common::spawn(pool(&db, common::fast_config()));
    common::wait_status(&db, running, "running").await;
    common::wait_status(&db, done, "succeeded").await;
    let asked = tokio::time::Instant::now();
    assert!(ok(&opts, &["cancel", &running.to_string()]).contains("told to cancel"));
    common::wait_status(&db, running, "cancelled").await;
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(1), "cancel took {took:?}");

    // Cancelling a finished task changes nothing.
    assert!(ok(&opts, &["cancel", &done.to_string()]).contains("already succeeded"));
    let row = common::task(&db, done).await;
    assert_eq!(row.status, "succeeded");
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

#[sqlx::test]
async fn cancel_a_whole_dataset(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    TaskQueueManager::new(db.clone())
        .enqueue_many((0..5).map(|_| NewTask::new("bulk", "noop").delay(Duration::from_secs(3600))))
        .await
        .unwrap();
    let other = common::insert(&db, "other", "noop", json!({})).await;
    assert!(ok(&opts, &["cancel", "--dataset", "bulk"]).contains("5 task(s)"));
    assert_eq!(
        common::count(&db, "dataset_id = 'bulk' AND status = 'cancelled'").await,
        5
    );
    assert_eq!(common::status(&db, other).await, "queued");
}

#[sqlx::test]
async fn retry_keeps_attempts_and_errors_and_allows_one_more(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let failing = TaskQueueManager::new(db.clone())
        .enqueue(
            NewTask::new("d", "fail")
                .payload(json!({"error": "retryable", "times": 2}))
                .max_attempts(2),
        )
        .await
        .unwrap();
    let cancelled: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, cancel_requested) VALUES ('d', 'noop', true) RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let (handle, run) = common::spawn(pool(&db, common::fast_config()));
    common::wait_status(&db, failing, "failed").await;
    assert_eq!(common::status(&db, cancelled).await, "cancelled");

    assert!(ok(&opts, &["retry", &failing.to_string()]).contains("queued again"));
    assert!(ok(&opts, &["retry", &cancelled.to_string()]).contains("queued again"));
    common::wait_status(&db, failing, "succeeded").await;
    common::wait_status(&db, cancelled, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();

    let row = common::task(&db, failing).await;
    assert_eq!((row.attempts, row.max_attempts), (3, 3));
    let errors: i64 =
        sqlx::query_scalar("SELECT count(*) FROM syncq.task_errors WHERE task_id = $1")
            .bind(failing)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(errors, 2, "the error history is kept");
    // Retrying a succeeded task is refused and changes nothing.
    let out = syncq(&opts, &["retry", &failing.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(common::status(&db, failing).await, "succeeded");
    // Many at once.
    sqlx::query(
        "UPDATE syncq.tasks SET status = 'failed', finished_at = now() WHERE dataset_id = 'd'",
    )
    .execute(&db)
    .await
    .unwrap();
    assert!(ok(&opts, &["retry", "--dataset", "d", "--status", "failed"]).starts_with("2 failed"));
    assert_eq!(common::count(&db, "status = 'queued'").await, 2);
}

#[sqlx::test]
async fn prune_deletes_only_old_finished_tasks(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    db.execute(
        "INSERT INTO syncq.tasks (dataset_id, kind, status, finished_at)
         SELECT 'd', 'noop', s::syncq.task_status, now() - interval '8 days'
         FROM unnest(ARRAY['succeeded', 'failed', 'cancelled']) s, generate_series(1, 1100);
         INSERT INTO syncq.tasks (dataset_id, kind, status, finished_at)
         VALUES ('d', 'noop', 'succeeded', now() - interval '1 day');
         INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('d', 'noop');
         INSERT INTO syncq.tasks (dataset_id, kind, status, locked_by, lease_expires_at)
         VALUES ('d', 'noop', 'running', 'w', now() + interval '1 hour');",
    )
    .await
    .unwrap();
    assert!(
        ok(
            &opts,
            &["prune", "--older-than", "7d", "--status", "failed"]
        )
        .contains("deleted 1100")
    );
    assert!(ok(&opts, &["prune", "--older-than", "7d"]).contains("deleted 2200"));
    let left: Vec<(String,)> =
        sqlx::query_as("SELECT status::text FROM syncq.tasks ORDER BY status")
            .fetch_all(&db)
            .await
            .unwrap();
    let left: Vec<String> = left.into_iter().map(|r| r.0).collect();
    assert_eq!(left, vec!["queued", "running", "succeeded"]);
}

#[sqlx::test]
async fn a_worker_with_a_retention_prunes_as_it_goes(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    db.execute(
        "INSERT INTO syncq.tasks (dataset_id, kind, status, finished_at)
         VALUES ('d', 'noop', 'succeeded', now() - interval '2 hours');
         INSERT INTO syncq.workers (worker_id, host, pid, concurrency, last_heartbeat_at)
         VALUES ('dead', 'gone', 1, 1, now() - interval '1 day');",
    )
    .await
    .unwrap();
    let fresh = common::insert(&db, "d", "noop", json!({})).await;
    let config = PoolConfig {
        retention: Some(Duration::from_secs(3600)),
        ..common::fast_config()
    };
    let (handle, run) = common::spawn(pool(&db, config));
    common::wait_for("the old task and the dead worker are pruned", WAIT, || {
        let db = db.clone();
        async move {
            let workers: i64 =
                sqlx::query_scalar("SELECT count(*) FROM syncq.workers WHERE worker_id = 'dead'")
                    .fetch_one(&db)
                    .await
                    .unwrap();
            common::count(&db, "true").await == 1 && workers == 0
        }
    })
    .await;
    common::wait_status(&db, fresh, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

#[sqlx::test]
async fn status_tasks_and_show_describe_a_populated_database(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    let failed = manager
        .enqueue(NewTask::new("alpha", "fail").payload(json!({"error": "invalid"})))
        .await
        .unwrap();
    manager
        .enqueue_many((0..3).map(|_| NewTask::new("alpha", "noop")))
        .await
        .unwrap();
    manager
        .enqueue(NewTask::new("beta", "orphan_kind"))
        .await
        .unwrap();
    manager.queue("beta").pause().await.unwrap();
    manager
        .queue("alpha")
        .set_rate_limit(Some("50/1s".parse().unwrap()))
        .await
        .unwrap();
    let (handle, run) = common::spawn(pool(&db, common::fast_config()));
    common::wait_status(&db, failed, "failed").await;
    common::wait_for("alpha drained", WAIT, || {
        let db = db.clone();
        async move { common::count(&db, "dataset_id = 'alpha' AND status = 'succeeded'").await == 3 }
    })
    .await;

    let status: Value = serde_json::from_str(&ok(&opts, &["status", "--json"])).unwrap();
    let alpha = &status["datasets"][0];
    assert_eq!(alpha["dataset_id"], "alpha");
    assert_eq!(
        (alpha["succeeded"].as_i64(), alpha["failed"].as_i64()),
        (Some(3), Some(1))
    );
    assert_eq!(alpha["rate_limit"], 50);
    let beta = &status["datasets"][1];
    assert_eq!(
        (beta["queued"].as_i64(), beta["paused"].as_bool()),
        (Some(1), Some(true))
    );
    assert_eq!(status["workers"].as_array().unwrap().len(), 1);
    assert_eq!(status["workers"][0]["pid"], std::process::id());
    assert_eq!(status["unhandled_kinds"], json!(["orphan_kind"]));
    let human = ok(&opts, &["status"]);
    assert!(
        human.contains("alpha") && human.contains("paused") && human.contains("orphan_kind"),
        "{human}"
    );

    let tasks: Value = serde_json::from_str(&ok(
        &opts,
        &[
            "tasks",
            "--dataset",
            "alpha",
            "--status",
            "succeeded",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(tasks.as_array().unwrap().len(), 3);
    assert!(
        tasks
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] == "succeeded")
    );
    assert_eq!(
        ok(&opts, &["tasks", "--limit", "2"]).lines().count(),
        3,
        "a header and two rows"
    );

    let shown: Value =
        serde_json::from_str(&ok(&opts, &["show", &failed.to_string(), "--json"])).unwrap();
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["errors"].as_array().unwrap().len(), 1);
    assert!(
        shown["errors"][0]["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid:")
    );
    assert!(ok(&opts, &["show", &failed.to_string()]).contains("errors (1):"));
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

#[sqlx::test]
async fn unknown_ids_and_datasets_are_usage_errors_that_change_nothing(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    common::insert(&db, "known", "noop", json!({})).await;
    for (args, names) in [
        (&["cancel", "999"][..], "ID"),
        (&["retry", "999"][..], "ID"),
        (&["show", "999"][..], "ID"),
        (&["cancel", "--dataset", "nope"][..], "DATASET"),
        (&["retry", "--dataset", "nope"][..], "DATASET"),
        (&["pause", "nope"][..], "DATASET"),
        (&["resume", "nope"][..], "DATASET"),
        (&["limit", "nope", "--rate", "1/1s"][..], "DATASET"),
        (&["limit", "known", "--rate", "5/0s"][..], "--rate"),
        (&["prune", "--older-than", "yesterday"][..], "--older-than"),
        (&["tasks", "--status", "bogus"][..], "--status"),
    ] {
        let out = syncq(&opts, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    let datasets: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.datasets")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(datasets, 1);
    let row: (Option<i32>, bool) =
        sqlx::query_as("SELECT rate_limit, paused FROM syncq.datasets WHERE dataset_id = 'known'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(row, (None, false));
    assert_eq!(common::count(&db, "status = 'queued'").await, 1);
}

#[sqlx::test]
async fn the_library_cancels_retries_and_prunes(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    let id = manager
        .enqueue(NewTask::new("lib", "noop").delay(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_eq!(
        manager.cancel(id).await.unwrap(),
        Some(syncq::TaskStatus::Cancelled)
    );
    assert_eq!(manager.cancel(id).await.unwrap(), None, "already finished");
    assert!(manager.retry(id).await.unwrap());
    assert!(!manager.retry(id).await.unwrap(), "queued, not retryable");
    assert_eq!(manager.queue("lib").cancel_all().await.unwrap(), 1);
    sqlx::query("UPDATE syncq.tasks SET finished_at = now() - interval '2 days'")
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(manager.prune(Duration::from_secs(86_400)).await.unwrap(), 1);
    assert_eq!(common::count(&db, "true").await, 0);
}

async fn vacuum_count(db: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT vacuum_count FROM pg_stat_user_tables WHERE relid = 'syncq.tasks'::regclass",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

/// Dead rows in syncq.tasks past the threshold get vacuumed, by one
/// process at a time: a sweep while another holds the vacuum lock does
/// nothing.
#[sqlx::test]
async fn the_vacuumer_reclaims_dead_rows_one_process_at_a_time(db: PgPool) {
    sqlx::query("INSERT INTO syncq.tasks (dataset_id, kind) SELECT 'v', 'noop' FROM generate_series(1, 5000)")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM syncq.tasks")
        .execute(&db)
        .await
        .unwrap();
    common::wait_for(
        "the statistics count the dead rows",
        Duration::from_secs(15),
        || {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'syncq.tasks'::regclass",
            )
            .fetch_one(&db)
            .await
            .unwrap()
                >= 5000
            }
        },
    )
    .await;
    let vacuumer = Vacuumer::default();
    let before = vacuum_count(&db).await;

    let mut other = db.acquire().await.unwrap();
    assert!(
        syncq::store::ops::try_vacuum_lock(&mut other)
            .await
            .unwrap()
    );
    assert!(
        vacuumer
            .run_once(&syncq::Db::from(&db), None)
            .await
            .unwrap()
            .is_empty()
    );
    syncq::store::ops::vacuum_unlock(&mut other).await.unwrap();

    let vacuumed = vacuumer
        .run_once(&syncq::Db::from(&db), None)
        .await
        .unwrap();
    assert!(vacuumed.contains(&"tasks".to_string()), "{vacuumed:?}");
    common::wait_for("the vacuum is counted", Duration::from_secs(15), || {
        let db = db.clone();
        async move { vacuum_count(&db).await > before }
    })
    .await;
}
