//! SPEC §2: the public table other services insert into, its defaults,
//! constraints and uniqueness, and the enqueue API producing the same rows.

mod common;

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{NewTask, TaskQueueManager, WorkerPool};

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_plain_sql_insert_with_defaults_is_processed(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id: i64 = sqlx::query_scalar("INSERT INTO syncq.tasks (dataset_id, kind, payload) VALUES ('github', 'noop', '{\"page\": 1}') RETURNING id")
        .fetch_one(&db)
        .await
        .unwrap();
    let row = common::task(&db, id).await;
    assert_eq!(
        (
            row.status.as_str(),
            row.priority,
            row.attempts,
            row.max_attempts
        ),
        ("queued", 0, 0, 5)
    );
    // The insert touched no dataset row (producers only append, SPEC §2).
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.datasets")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(rows, 0);

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
            async move { common::status(&db, id).await == "succeeded" }
        },
    )
    .await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!((row.attempts, row.runs, row.locked_by), (1, 1, None));
    // Its first claim made the unknown dataset's row, with default settings.
    let (rate_limit, window, paused): (Option<i32>, f64, bool) = sqlx::query_as(
        "SELECT rate_limit, extract(epoch FROM rate_window)::float8, paused FROM syncq.datasets WHERE dataset_id = 'github'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((rate_limit, window, paused), (None, 1.0, false));
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn an_insert_wakes_an_idle_worker_without_waiting_for_a_poll(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let mut config = common::fast_config();
    config.poll_interval = Duration::from_secs(30);
    // Quiet background loops, so "idle" below means idle.
    config.lease = Duration::from_secs(30);
    config.heartbeat = Duration::from_secs(10);
    config.rescue_interval = Duration::from_secs(30);
    let pool = WorkerPool::builder(db.clone())
        .register_builtins()
        .config(config)
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    // Wait until the pool is idle: its LISTEN session is up, and nothing
    // else of it is busy (the one claim a new LISTEN session triggers is
    // done). From then on only a notification or the 30 s poll claims.
    common::wait_for(
        "the pool listens and is idle",
        Duration::from_secs(10),
        || {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, Option<bool>>(
                    "SELECT bool_or(state = 'idle' AND query LIKE 'LISTEN %syncq_task_inserted%')
                        AND bool_and(state = 'idle')
                 FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND backend_type = 'client backend'",
                )
                .fetch_one(&db)
                .await
                .unwrap()
                .unwrap_or(false)
            }
        },
    )
    .await;
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

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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
        // Past what the code can represent (chrono stops at year 262143).
        (
            "INSERT INTO syncq.tasks (dataset_id, kind, run_at) VALUES ('d', 'k', '290000-01-01')",
            "run_at",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind) VALUES (repeat('x', 4000), 'k')",
            "dataset_id",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('d', repeat('k', 70000))",
            "kind",
        ),
        (
            "INSERT INTO syncq.datasets (dataset_id, throttled_until) VALUES ('d', '290000-01-01')",
            "throttled_until",
        ),
        (
            "INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, every)
             VALUES ('s', repeat('x', 4000), 'k', '1 hour')",
            "dataset_id",
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

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
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
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("syncq enqueue finishes within a minute")
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
#[sqlx::test(migrator = "syncq::MIGRATOR")]
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
    // Both datasets were marked as having work, as a plain INSERT does
    // (once absorbed, as every claim does first).
    sqlx::query("SELECT syncq.absorb_signals()")
        .execute(&db)
        .await
        .unwrap();
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
        .unwrap_err();
    // Refused by PostgreSQL for the NUL byte (22021,
    // character_not_in_repertoire), not lost to anything else.
    let code = match &err {
        syncq::Error::Database(e) => e
            .as_database_error()
            .and_then(|e| e.code())
            .map(|c| c.into_owned()),
        _ => None,
    };
    assert_eq!(code.as_deref(), Some("22021"), "{err}");
    assert!(err.to_string().contains("0x00"), "{err}");
    // Nothing of the batch is left: no task, and no dataset row from the
    // statement's trigger.
    let datasets: i64 =
        sqlx::query_scalar("SELECT count(*) FROM syncq.datasets WHERE dataset_id = 'd'")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(datasets, 0);
    assert_eq!(common::count(&db, "dataset_id = 'd'").await, 0);
}

/// `syncq.dataset_stats` (SPEC §2) on a populated database: one row per
/// dataset — with tasks in every status, with only delayed tasks, with
/// none — and each column's value: the five counts, the age of the oldest
/// *ready* task (queued and due; not a delayed one, not a finished or
/// running one with an older `run_at`), and each setting as the datasets
/// row holds it.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn dataset_stats_gives_each_column_per_dataset(db: PgPool) {
    sqlx::raw_sql(
        "INSERT INTO syncq.datasets (dataset_id, rate_limit, rate_window, max_concurrency, throttled_until)
         VALUES ('busy', 50, interval '2.5 seconds', 3, '2001-02-03 04:05:06.789+00');
         INSERT INTO syncq.datasets (dataset_id, paused, throttled_until)
         VALUES ('held', true, '2100-01-02 03:04:05+00');
         -- busy: 3 queued (2 due, the oldest due since 2000; one delayed),
         -- 1 running, 4 succeeded, 2 failed, 1 cancelled; the running and
         -- finished ones have older run_at values than any queued one.
         INSERT INTO syncq.tasks (dataset_id, kind, run_at) VALUES
             ('busy', 'noop', '2000-01-01 00:00:00+00'),
             ('busy', 'noop', '2020-06-01 00:00:00+00'),
             ('busy', 'noop', now() + interval '1 hour');
         INSERT INTO syncq.tasks (dataset_id, kind, status, locked_by, lease_expires_at, run_at)
         VALUES ('busy', 'noop', 'running', 'w', now() + interval '1 hour', '1990-01-01 00:00:00+00');
         INSERT INTO syncq.tasks (dataset_id, kind, status, finished_at, run_at)
         SELECT 'busy', 'noop', s::syncq.task_status, now(), '1980-01-01 00:00:00+00'
         FROM unnest(ARRAY['succeeded', 'succeeded', 'succeeded', 'succeeded',
                           'failed', 'failed', 'cancelled']) s;
         -- later: created by its first task, which is not due yet.
         INSERT INTO syncq.tasks (dataset_id, kind, run_at)
         VALUES ('later', 'noop', now() + interval '1 hour');",
    )
    .execute(&db)
    .await
    .unwrap();

    type Row = (
        String,
        [i64; 5],
        Option<bool>,
        Option<i32>,
        f64,
        Option<i32>,
        bool,
        Option<chrono::DateTime<chrono::Utc>>,
    );
    let rows: Vec<Row> = sqlx::query_as::<
        _,
        (
            String,
            i64,
            i64,
            i64,
            i64,
            i64,
            Option<bool>,
            Option<i32>,
            f64,
            Option<i32>,
            bool,
            Option<chrono::DateTime<chrono::Utc>>,
        ),
    >(
        // The age compared in the same statement, so with the same now().
        "SELECT dataset_id, queued, running, succeeded, failed, cancelled,
                oldest_ready_age = now() - timestamptz '2000-01-01 00:00:00+00',
                rate_limit, extract(epoch FROM rate_window)::float8, max_concurrency,
                paused, throttled_until
         FROM syncq.dataset_stats ORDER BY dataset_id",
    )
    .fetch_all(&db)
    .await
    .unwrap()
    .into_iter()
    .map(|r| {
        (
            r.0,
            [r.1, r.2, r.3, r.4, r.5],
            r.6,
            r.7,
            r.8,
            r.9,
            r.10,
            r.11,
        )
    })
    .collect();
    let at = |s: &str| Some(s.parse::<chrono::DateTime<chrono::Utc>>().unwrap());
    let expected: Vec<Row> = vec![
        (
            "busy".into(),
            [3, 1, 4, 2, 1],
            Some(true),
            Some(50),
            2.5,
            Some(3),
            false,
            at("2001-02-03T04:05:06.789Z"),
        ),
        (
            "held".into(),
            [0; 5],
            None,
            None,
            1.0,
            None,
            true,
            at("2100-01-02T03:04:05Z"),
        ),
        (
            "later".into(),
            [1, 0, 0, 0, 0],
            None,
            None,
            1.0,
            None,
            false,
            None,
        ),
    ];
    assert_eq!(rows, expected);

    // The columns SPEC §2 names are there, with their types.
    let columns: Vec<(String, String)> = sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = 'syncq' AND table_name = 'dataset_stats'",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    for (name, data_type) in [
        ("dataset_id", "text"),
        ("queued", "bigint"),
        ("running", "bigint"),
        ("succeeded", "bigint"),
        ("failed", "bigint"),
        ("cancelled", "bigint"),
        ("oldest_ready_age", "interval"),
        ("rate_limit", "integer"),
        ("rate_window", "interval"),
        ("max_concurrency", "integer"),
        ("paused", "boolean"),
        ("throttled_until", "timestamp with time zone"),
    ] {
        assert!(
            columns.contains(&(name.to_string(), data_type.to_string())),
            "no column {name} {data_type} in {columns:?}"
        );
    }
}

/// SPEC §2: `syncq.datasets` has a `weight` setting (int, default 1,
/// 1–1000) and `dataset_stats` shows every setting under its column name.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn dataset_stats_shows_the_weight_setting(db: PgPool) {
    sqlx::raw_sql(
        "INSERT INTO syncq.datasets (dataset_id, weight) VALUES ('heavy', 7);
         INSERT INTO syncq.datasets (dataset_id) VALUES ('plain');",
    )
    .execute(&db)
    .await
    .expect("syncq.datasets has a weight column");
    let weights: Vec<(String, i32)> =
        sqlx::query_as("SELECT dataset_id, weight FROM syncq.dataset_stats ORDER BY dataset_id")
            .fetch_all(&db)
            .await
            .expect("dataset_stats has a weight column");
    assert_eq!(weights, [("heavy".into(), 7), ("plain".into(), 1)]);
    for bad in [0, 1001] {
        let err = sqlx::query("UPDATE syncq.datasets SET weight = $1 WHERE dataset_id = 'plain'")
            .bind(bad)
            .execute(&db)
            .await
            .expect_err("a weight out of 1–1000 is refused");
        assert!(err.to_string().contains("weight"), "{err}");
    }
}

/// How many producers race for one `(dataset_id, unique_key)` in a round.
const RACERS: usize = 16;

/// One racer's insert: the API, a plain SQL insert, or the documented
/// `ON CONFLICT … DO NOTHING` (docs/sql.md).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Racer {
    Api,
    Sql,
    SqlOnConflict,
}

/// What a racer got: an id (the API always; SQL when it inserted), a
/// unique violation (plain SQL that lost), or nothing (ON CONFLICT that
/// lost).
#[derive(Debug, Clone, PartialEq)]
enum Got {
    Id(i64),
    UniqueViolation,
    Nothing,
}

/// Many producers, each on its own connection, insert the same dataset and
/// unique key at once — through `TaskQueueManager::enqueue`, plain SQL and
/// `INSERT … ON CONFLICT DO NOTHING`, all in one race — on a multi-thread
/// runtime with the connections opened beforehand, so the inserts really
/// meet in PostgreSQL. In every round: exactly one task is inserted and is
/// queued; every API caller gets its id; every plain SQL loser gets a
/// unique violation (23505) and every ON CONFLICT loser nothing — no
/// deadlock, no other error. Between rounds the task finishes, freeing the
/// key (SPEC §2: at most one *queued or running* task per key), so the
/// next round makes one new task.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn concurrent_inserts_of_one_unique_key_make_one_task(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::on_multi_thread(unique_key_race(opts)).await;
}

async fn unique_key_race(opts: PgConnectOptions) {
    let db = PgPoolOptions::new()
        .max_connections(RACERS as u32 + 2)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts.clone())
        .await
        .expect("connect");
    let manager = TaskQueueManager::new(db.clone());
    let kinds = [Racer::Api, Racer::Sql, Racer::SqlOnConflict];
    let mut previous = Vec::new();
    for round in 0..4 {
        // Every racer's connection open and idle in the pool first.
        let warm: Vec<_> = futures_util::future::join_all((0..RACERS).map(|_| db.acquire())).await;
        drop(warm);
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(RACERS));
        let racers = (0..RACERS).map(|i| {
            let racer = kinds[i % kinds.len()];
            let (db, manager, start) = (db.clone(), manager.clone(), start.clone());
            tokio::spawn(async move {
                let got = race_once(&db, &manager, &start, racer).await;
                (racer, got)
            })
        });
        let results: Vec<(Racer, Got)> = tokio::time::timeout(
            Duration::from_secs(30),
            futures_util::future::join_all(racers),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: the racers did not finish in 30 s"))
        .into_iter()
        .map(|r| r.expect("a racer panicked"))
        .collect();

        let rows: Vec<(i64, String)> = sqlx::query_as(
            "SELECT id, status::text FROM syncq.tasks
             WHERE dataset_id = 'race' AND unique_key = 'k' AND status IN ('queued', 'running')",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        assert_eq!(rows.len(), 1, "round {round}: {rows:?} from {results:?}");
        let (id, status) = rows[0].clone();
        assert_eq!(status, "queued");
        assert!(!previous.contains(&id), "round {round}: an old task's id");
        let mut inserted = 0;
        for (racer, got) in &results {
            match (racer, got) {
                (Racer::Api, Got::Id(got)) => assert_eq!(*got, id, "round {round}: {results:?}"),
                (Racer::Sql | Racer::SqlOnConflict, Got::Id(got)) => {
                    assert_eq!(*got, id, "round {round}: {results:?}");
                    inserted += 1;
                }
                (Racer::Sql, Got::UniqueViolation) | (Racer::SqlOnConflict, Got::Nothing) => {}
                other => panic!("round {round}: {other:?} in {results:?}"),
            }
        }
        assert!(inserted <= 1, "round {round}: {results:?}");
        // Only this round's task for the key, besides the finished ones.
        assert_eq!(
            common::count(&db, "dataset_id = 'race' AND unique_key = 'k'").await,
            round + 1
        );
        previous.push(id);
        // The task finishes: the key is free for the next round.
        sqlx::query(
            "UPDATE syncq.tasks SET status = 'succeeded', finished_at = now() WHERE id = $1",
        )
        .bind(id)
        .execute(&db)
        .await
        .unwrap();
    }
}

async fn race_once(
    db: &PgPool,
    manager: &TaskQueueManager,
    start: &tokio::sync::Barrier,
    racer: Racer,
) -> Got {
    let task = NewTask::new("race", "noop").unique_key("k");
    if racer == Racer::Api {
        start.wait().await;
        let id = manager.enqueue(task).await.expect("the API enqueues");
        return Got::Id(id.into());
    }
    let sql = match racer {
        Racer::Sql => {
            "INSERT INTO syncq.tasks (dataset_id, kind, unique_key) VALUES ('race', 'noop', 'k')
             RETURNING id"
        }
        _ => {
            "INSERT INTO syncq.tasks (dataset_id, kind, unique_key) VALUES ('race', 'noop', 'k')
             ON CONFLICT (dataset_id, unique_key)
                 WHERE unique_key IS NOT NULL AND status IN ('queued', 'running')
             DO NOTHING RETURNING id"
        }
    };
    // Its own transaction, begun before the race, committed after.
    let mut tx = db.begin().await.expect("begin");
    start.wait().await;
    let got = match sqlx::query_scalar::<_, i64>(sql)
        .fetch_optional(&mut *tx)
        .await
    {
        Ok(Some(id)) => Got::Id(id),
        Ok(None) => Got::Nothing,
        Err(e) if e.as_database_error().and_then(|d| d.code()).as_deref() == Some("23505") => {
            Got::UniqueViolation
        }
        Err(e) => panic!("{racer:?}: {e}"),
    };
    if matches!(got, Got::UniqueViolation) {
        tx.rollback().await.expect("rollback");
    } else {
        tx.commit().await.expect("commit");
    }
    got
}
