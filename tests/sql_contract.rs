//! SPEC §2: the public table other services insert into, its defaults,
//! constraints and uniqueness, and the enqueue API producing the same rows.

mod common;

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{NewTask, TaskQueueManager, WorkerPool};

#[sqlx::test]
async fn a_plain_sql_insert_with_defaults_is_processed(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    sqlx::query("INSERT INTO syncq.tasks (dataset_id, kind, payload) VALUES ('github', 'noop', '{\"page\": 1}')")
        .execute(&db)
        .await
        .unwrap();
    let row = common::task(&db, 1).await;
    assert_eq!(
        (
            row.status.as_str(),
            row.priority,
            row.attempts,
            row.max_attempts
        ),
        ("queued", 0, 0, 5)
    );
    // The unknown dataset was created with default settings.
    let (rate_limit, window, paused): (Option<i32>, f64, bool) = sqlx::query_as(
        "SELECT rate_limit, extract(epoch FROM rate_window)::float8, paused FROM syncq.datasets WHERE dataset_id = 'github'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((rate_limit, window, paused), (None, 1.0, false));

    let pool = WorkerPool::builder(db.clone())
        .register_builtins()
        .config(common::fast_config())
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_for(
        "the SQL-inserted task succeeds",
        Duration::from_secs(10),
        || {
            let db = db.clone();
            async move { common::status(&db, 1).await == "succeeded" }
        },
    )
    .await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, 1).await;
    assert_eq!((row.attempts, row.runs, row.locked_by), (1, 1, None));
}

#[sqlx::test]
async fn an_insert_wakes_an_idle_worker_without_waiting_for_a_poll(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let mut config = common::fast_config();
    config.poll_interval = Duration::from_secs(30);
    let pool = WorkerPool::builder(db.clone())
        .register_builtins()
        .config(config)
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    // Let the pool go idle (LISTEN established, first empty claim done).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let id = common::insert(&db, "d", "noop", json!({})).await;
    common::wait_for(
        "woken by NOTIFY well before the 30 s poll",
        Duration::from_secs(5),
        || {
            let db = db.clone();
            async move { common::status(&db, id).await == "succeeded" }
        },
    )
    .await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

#[sqlx::test]
async fn bad_rows_are_refused_with_the_column_named(db: PgPool) {
    let cases = [
        (
            "INSERT INTO syncq.tasks (dataset_id, kind, max_attempts) VALUES ('d', 'k', 0)",
            "max_attempts",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('d', '')",
            "kind",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('', 'k')",
            "dataset_id",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind, status) VALUES ('d', 'k', 'bogus')",
            "task_status",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind) VALUES (NULL, 'k')",
            "dataset_id",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind, status) VALUES ('d', 'k', 'running')",
            "locked_by",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind, payload) VALUES ('d', 'k', NULL)",
            "payload",
        ),
    ];
    for (sql, column) in cases {
        let err = sqlx::query(sql).execute(&db).await.unwrap_err().to_string();
        assert!(
            err.contains(column),
            "{sql}: error {err:?} does not name {column}"
        );
    }
    assert_eq!(common::count(&db, "true").await, 0);
}

#[sqlx::test]
async fn unique_key_is_a_violation_for_sql_and_a_no_op_for_the_api(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    let first = manager
        .enqueue(NewTask::new("d", "noop").unique_key("k1"))
        .await
        .unwrap();
    let again = manager
        .enqueue(NewTask::new("d", "noop").unique_key("k1"))
        .await
        .unwrap();
    assert_eq!(first, again);
    // Another dataset may use the same key.
    let other = manager
        .enqueue(NewTask::new("e", "noop").unique_key("k1"))
        .await
        .unwrap();
    assert_ne!(other, first);

    let err = sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind, unique_key) VALUES ('d', 'noop', 'k1')",
    )
    .execute(&db)
    .await
    .unwrap_err();
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("23505")
    );

    // Once the first is finished, the key is free again.
    sqlx::query("UPDATE syncq.tasks SET status = 'succeeded' WHERE id = $1")
        .bind(first)
        .execute(&db)
        .await
        .unwrap();
    let fresh = manager
        .enqueue(NewTask::new("d", "noop").unique_key("k1"))
        .await
        .unwrap();
    assert_ne!(fresh, first);
    assert_eq!(common::count(&db, "true").await, 3);
}

#[sqlx::test]
async fn enqueue_many_returns_ids_in_input_order_with_duplicates_resolved(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    let existing = manager
        .enqueue(NewTask::new("d", "noop").unique_key("old"))
        .await
        .unwrap();
    let batch = vec![
        NewTask::new("d", "noop").payload(json!({"n": 0})),
        NewTask::new("d", "noop").unique_key("new"),
        NewTask::new("d", "noop").unique_key("old"),
        NewTask::new("d", "noop").unique_key("new"),
        NewTask::new("d2", "sleep")
            .payload(json!({"n": 4}))
            .priority(-3),
    ];
    let ids = manager.enqueue_many(batch).await.unwrap();
    assert_eq!(ids.len(), 5);
    assert_eq!(ids[2], existing);
    assert_eq!(ids[3], ids[1]);
    assert_eq!(common::task(&db, ids[0]).await.payload, json!({"n": 0}));
    let last = common::task(&db, ids[4]).await;
    assert_eq!(
        (last.dataset_id.as_str(), last.kind.as_str(), last.priority),
        ("d2", "sleep", -3)
    );
    assert_eq!(common::count(&db, "true").await, 4);
}

#[sqlx::test]
async fn the_api_rejects_bad_tasks_before_the_database(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    let err = manager
        .enqueue(NewTask::new("d", "noop").max_attempts(0))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_attempts"), "{err}");
    let err = manager
        .enqueue(NewTask::new("d", ""))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("kind"), "{err}");
    assert_eq!(common::count(&db, "true").await, 0);
}

#[sqlx::test]
async fn api_cli_and_sql_produce_the_same_row(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let payload = json!({"page": 7, "name": "ünï 'quoted'"});
    let api = TaskQueueManager::new(db.clone())
        .enqueue(
            NewTask::new("data set ü", "fetch")
                .payload(payload.clone())
                .priority(2)
                .max_attempts(3)
                .unique_key("u-api"),
        )
        .await
        .unwrap();
    let sql: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, payload, priority, max_attempts, unique_key)
         VALUES ('data set ü', 'fetch', $1, 2, 3, 'u-sql') RETURNING id",
    )
    .bind(&payload)
    .fetch_one(&db)
    .await
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(&opts))
        .args([
            "enqueue",
            "--dataset",
            "data set ü",
            "--kind",
            "fetch",
            "--priority",
            "2",
        ])
        .args(["--max-attempts", "3", "--unique-key", "u-cli", "--payload"])
        .arg(payload.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: i64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();

    let normalise = |mut row: common::TaskRow| {
        row.id = 0;
        row.unique_key = None;
        row
    };
    let api_row = normalise(common::task(&db, api).await);
    assert_eq!(api_row, normalise(common::task(&db, sql).await));
    assert_eq!(api_row, normalise(common::task(&db, cli).await));
    // Without a unique key the API takes its single-row path: same row.
    let plain = TaskQueueManager::new(db.clone())
        .enqueue(
            NewTask::new("data set ü", "fetch")
                .payload(payload.clone())
                .priority(2)
                .max_attempts(3),
        )
        .await
        .unwrap();
    assert_eq!(api_row, normalise(common::task(&db, plain).await));
}

/// The COPY path writes the same rows as the others, escapes what COPY's
/// text format gives a meaning to, takes run_at from the database clock,
/// wakes datasets like an INSERT, and is all or nothing.
#[sqlx::test]
async fn enqueue_bulk_copies_rows_exactly_and_all_or_nothing(db: PgPool) {
    let manager = TaskQueueManager::new(db.clone());
    let awkward = "tab\there, newline\nthere, back\\slash, \r, ü, \"quote\"";
    let copied = manager
        .enqueue_bulk(vec![
            NewTask::new(awkward, "noop").payload(json!({ "text": awkward, "n": [1, 2] })),
            NewTask::new("later", "sleep")
                .priority(-2)
                .max_attempts(1)
                .delay(Duration::from_secs(3600)),
        ])
        .await
        .unwrap();
    assert_eq!(copied, 2);
    let (dataset, payload): (String, serde_json::Value) =
        sqlx::query_as("SELECT dataset_id, payload FROM syncq.tasks WHERE kind = 'noop'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(dataset, awkward);
    assert_eq!(payload, json!({ "text": awkward, "n": [1, 2] }));
    let (priority, max_attempts, delay_secs): (i16, i32, f64) = sqlx::query_as(
        "SELECT priority, max_attempts, extract(epoch FROM run_at - created_at)::float8
         FROM syncq.tasks WHERE dataset_id = 'later'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((priority, max_attempts), (-2, 1));
    assert!((delay_secs - 3600.0).abs() < 0.001, "{delay_secs}");
    // Both datasets were marked as having work, as a plain INSERT does.
    assert_eq!(
        common::count(&db, "true").await,
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM syncq.datasets WHERE ready_at IS NOT NULL"
        )
        .fetch_one(&db)
        .await
        .unwrap()
    );

    // A unique key is refused up front; a row the table refuses (here a
    // NUL byte, which text columns cannot hold) rolls back the whole batch.
    let err = manager
        .enqueue_bulk(vec![NewTask::new("d", "noop").unique_key("k")])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unique_key"), "{err}");
    let err = manager
        .enqueue_bulk(vec![
            NewTask::new("d", "noop"),
            NewTask::new("d", "bad\0kind"),
        ])
        .await
        .unwrap_err()
        .to_string();
    assert!(!err.is_empty());
    assert_eq!(common::count(&db, "dataset_id = 'd'").await, 0);
}
