//! SPEC §2 "Privileges" and §4 "only the row counts": the trust boundaries
//! of a queue shared by many services. Each role is tried by a LOGIN role
//! granted it, as a deployment would; no row anyone can write stops the
//! fleet; no value a user gives panics a worker or breaks every claim.

mod common;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use syncq::{
    NewTask, SyncTask, SyncWorker, TaskError, TaskQueueManager, TaskResult, WorkerPool, async_trait,
};
use tokio::io::AsyncReadExt;

const WAIT: Duration = Duration::from_secs(30);

/// Creates the two syncq roles in this database, and a LOGIN role
/// `login` that is a member of `member_of` (none: a role with no rights
/// on syncq at all). Roles are cluster-wide, so this is idempotent and
/// tolerant of other tests doing the same at once.
async fn login_as(
    admin: &PgPool,
    opts: &PgConnectOptions,
    login: &str,
    member_of: Option<&'static str>,
) -> PgPool {
    let statements = [
        format!(
            "DO $$ BEGIN CREATE ROLE {login} LOGIN;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        ),
        match member_of {
            Some(role) => format!(
                "DO $$ BEGIN GRANT {role} TO {login};
                 EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            ),
            None => "SELECT 1".to_string(),
        },
    ];
    for attempt in 0.. {
        let mut failed = None;
        if let Err(e) = syncq::store::roles::create(&syncq::Db::from(admin)).await {
            failed = Some(e);
        }
        for sql in &statements {
            if let Err(e) = sqlx::raw_sql(sqlx::AssertSqlSafe(sql.clone()))
                .execute(admin)
                .await
            {
                failed = Some(e);
            }
        }
        match failed {
            None => break,
            // "tuple concurrently updated" when tests grant at once: again.
            Some(e) if attempt < 10 => {
                eprintln!("setting up roles, again after: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Some(e) => panic!("setting up roles: {e}"),
        }
    }
    PgPoolOptions::new()
        .max_connections(12)
        .connect_with(opts.clone().username(login))
        .await
        .expect("log in")
}

/// This test's own login for `role` (logins are server-wide: one per test
/// database, so tests at once do not share them, and dropped at the end).
fn login_name(opts: &PgConnectOptions, role: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    opts.get_database().unwrap_or("").hash(&mut h);
    format!("syncq_t{:016x}_{role}", h.finish())
}

/// Ends the login's sessions and drops it.
async fn drop_login(admin: &PgPool, login: &str) {
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(login)
        .execute(admin)
        .await
        .expect("end the login's sessions");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {login}")))
        .execute(admin)
        .await
        .expect("drop the test's login");
}

/// Every table's rows, as text: to check that a refused statement changed
/// nothing.
async fn snapshot(admin: &PgPool) -> Vec<String> {
    let mut all = Vec::new();
    for table in ["tasks", "datasets", "task_errors", "rate_log", "workers"] {
        let rows: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT string_agg(t::text, E'\\n' ORDER BY t::text) FROM syncq.{table} t"
        )))
        .fetch_one(admin)
        .await
        .unwrap();
        all.push(format!("{table}: {}", rows.unwrap_or_default()));
    }
    all
}

/// Runs each statement as `db`; each must fail with `code` and change
/// nothing.
async fn refused(admin: &PgPool, db: &PgPool, code: &str, statements: &[&str]) {
    for sql in statements {
        let before = snapshot(admin).await;
        let err = sqlx::raw_sql(sqlx::AssertSqlSafe(*sql))
            .execute(db)
            .await
            .expect_err(sql);
        let got = err
            .as_database_error()
            .and_then(|e| e.code())
            .unwrap_or_default()
            .into_owned();
        assert_eq!(got, code, "{sql}: {err}");
        assert_eq!(snapshot(admin).await, before, "{sql} changed something");
    }
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn the_producer_role_may_enqueue_and_cancel_and_nothing_more(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let admin = common::connect(&opts).await;
    let producer = login_as(
        &admin,
        &opts,
        &login_name(&opts, "producer"),
        Some("syncq_producer"),
    )
    .await;
    // A task someone else started, for the producer to try to disturb.
    let running: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, status, locked_by, lease_expires_at, attempts)
         VALUES ('d', 'noop', 'running', 'w', now() + interval '1 hour', 1) RETURNING id",
    )
    .fetch_one(&admin)
    .await
    .unwrap();

    // What it must be able to do.
    let by_sql: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, payload, priority, run_at, max_attempts, unique_key)
         VALUES ('new dataset', 'noop', '{}', 1, now(), 3, 'k0') RETURNING id",
    )
    .fetch_one(&producer)
    .await
    .unwrap();
    let manager = TaskQueueManager::new(producer.clone());
    let a = manager
        .enqueue(NewTask::new("d", "noop").unique_key("k"))
        .await
        .unwrap();
    let b = manager
        .enqueue(NewTask::new("d", "noop").unique_key("k"))
        .await
        .unwrap();
    assert_eq!(a, b, "a duplicate unique key gives the existing id");
    // A batch mixing keys, duplicates and no key: ids in input order.
    let batch = vec![
        NewTask::new("d", "noop").payload(json!({"n": 0})),
        NewTask::new("d", "noop")
            .payload(json!({"n": 1}))
            .unique_key("k"),
        NewTask::new("e", "noop")
            .payload(json!({"n": 2}))
            .unique_key("k2"),
        NewTask::new("e", "noop").payload(json!({"n": 3})),
        NewTask::new("e", "noop")
            .payload(json!({"n": 4}))
            .unique_key("k2"),
        NewTask::new("d", "noop").payload(json!({"n": 5})),
    ];
    let ids = manager.enqueue_many(batch).await.unwrap();
    assert_eq!(ids[1], a);
    assert_eq!(ids[2], ids[4]);
    for (n, id) in [(0, ids[0]), (2, ids[2]), (3, ids[3]), (5, ids[5])] {
        assert_eq!(common::task(&admin, id).await.payload, json!({ "n": n }));
    }
    let plain = manager
        .enqueue_many((0..5).map(|n| NewTask::new("f", "noop").payload(json!({ "n": n }))))
        .await
        .unwrap();
    for (n, id) in plain.into_iter().enumerate() {
        assert_eq!(common::task(&admin, id).await.payload, json!({ "n": n }));
    }
    for view in ["dataset_stats", "running_tasks", "recent_failures"] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("SELECT * FROM syncq.{view}")))
            .execute(&producer)
            .await
            .unwrap();
    }
    // Cancel its work by the row: a queued task ends cancelled at once.
    sqlx::query("UPDATE syncq.tasks SET cancel_requested = true WHERE id = $1")
        .bind(by_sql)
        .execute(&producer)
        .await
        .unwrap();
    assert_eq!(common::status(&admin, by_sql).await, "cancelled");
    sqlx::query(
        "UPDATE syncq.tasks SET cancel_requested = true
         WHERE dataset_id = 'f' AND kind = 'noop' AND status IN ('queued', 'running')",
    )
    .execute(&producer)
    .await
    .unwrap();
    assert_eq!(
        common::count(&admin, "dataset_id = 'f' AND status = 'cancelled'").await,
        5
    );

    // What it must not: a task in any other state, an id of its choosing,
    // any other change to tasks, settings, history, the registry, DDL.
    let s = running.to_string();
    refused(
        &admin,
        &producer,
        "42501",
        &[
            "INSERT INTO syncq.tasks (dataset_id, kind, status) VALUES ('d', 'noop', 'running')",
            "INSERT INTO syncq.tasks (dataset_id, kind, runs) VALUES ('d', 'noop', 2147483647)",
            "INSERT INTO syncq.tasks (dataset_id, kind, attempts) VALUES ('d', 'noop', 4)",
            "INSERT INTO syncq.tasks (dataset_id, kind, locked_by, lease_expires_at)
             VALUES ('d', 'noop', 'ghost', '9999-01-01')",
            "INSERT INTO syncq.tasks (id, dataset_id, kind) OVERRIDING SYSTEM VALUE
             VALUES (1000000, 'd', 'noop')",
            "INSERT INTO syncq.tasks (dataset_id, kind, checkpoint, result, last_error)
             VALUES ('d', 'noop', '{}', '{}', 'x')",
            "INSERT INTO syncq.tasks (dataset_id, kind, created_at) VALUES ('d', 'noop', now())",
            &format!("UPDATE syncq.tasks SET status = 'succeeded' WHERE id = {s}"),
            &format!("UPDATE syncq.tasks SET lease_expires_at = now() WHERE id = {s}"),
            &format!("UPDATE syncq.tasks SET payload = '{{}}' WHERE id = {s}"),
            &format!("UPDATE syncq.tasks SET run_at = now(), priority = 5 WHERE id = {s}"),
            &format!("UPDATE syncq.tasks SET max_attempts = 100 WHERE id = {s}"),
            "SELECT payload FROM syncq.tasks",
            "SELECT checkpoint, result, last_error FROM syncq.tasks",
            "DELETE FROM syncq.tasks",
            "TRUNCATE syncq.tasks",
            "UPDATE syncq.datasets SET paused = true",
            "UPDATE syncq.datasets SET rate_limit = 1, max_concurrency = 1",
            "INSERT INTO syncq.datasets (dataset_id) VALUES ('x')",
            "DELETE FROM syncq.datasets",
            "INSERT INTO syncq.task_errors (task_id, attempt, error) VALUES (1, 1, 'x')",
            "DELETE FROM syncq.task_errors",
            "INSERT INTO syncq.rate_log (dataset_id, started_at) VALUES ('d', now())",
            "DELETE FROM syncq.workers",
            "SELECT syncq.retry(ARRAY[1::bigint])",
            "SELECT * FROM syncq.claim('w', '{noop}', NULL, NULL, 10, 30)",
            "SELECT syncq.prune_finished(0, '{cancelled}', 100)",
            "SELECT setval('syncq.tasks_id_seq', 1)",
            "CREATE TABLE syncq.evil (x int)",
            "ALTER TABLE syncq.tasks DROP CONSTRAINT tasks_run_at_finite",
        ],
    )
    .await;
    // Without OVERRIDING SYSTEM VALUE an id is refused for everyone.
    refused(
        &admin,
        &producer,
        "428C9",
        &["INSERT INTO syncq.tasks (id, dataset_id, kind) VALUES (1000000, 'd', 'noop')"],
    )
    .await;
    assert_eq!(common::status(&admin, running).await, "running");
    drop_login(&admin, &login_name(&opts, "producer")).await;
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn the_worker_role_runs_a_real_worker_but_cannot_change_settings(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let admin = common::connect(&opts).await;
    let worker_db = login_as(
        &admin,
        &opts,
        &login_name(&opts, "worker"),
        Some("syncq_worker"),
    )
    .await;
    drop(worker_db);
    sqlx::raw_sql(
        "INSERT INTO syncq.datasets (dataset_id, rate_limit, max_concurrency) VALUES ('limited', 100, 2);
         INSERT INTO syncq.tasks (dataset_id, kind, payload) VALUES
             ('limited', 'noop', '{}'),
             ('d', 'fail', '{\"error\": \"retryable\", \"times\": 1}'),
             ('d', 'fail', '{\"error\": \"rate_limited\", \"times\": 1, \"retry_after_ms\": 100}'),
             ('d', 'fail', '{\"error\": \"invalid\"}'),
             ('d', 'count', '{\"to\": 3, \"step_ms\": 10}');
         INSERT INTO syncq.tasks (dataset_id, kind, status, locked_by, lease_expires_at, attempts)
             VALUES ('d', 'noop', 'running', 'a dead worker', now() - interval '1 second', 1);
         INSERT INTO syncq.tasks (dataset_id, kind, status, finished_at)
             VALUES ('d', 'noop', 'succeeded', now() - interval '1 day');",
    )
    .execute(&admin)
    .await
    .unwrap();

    // A real worker process logged in as the worker role: claims, retries,
    // throttles, checkpoints, rescues, prunes, and exits when idle.
    let url = common::url(&opts.clone().username(&login_name(&opts, "worker")));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "syncq=warn")
        .args([
            "worker",
            "--exit-when-idle",
            "--poll-interval",
            "50ms",
            "--rescue-interval",
            "50ms",
            "--retention",
            "1h",
        ])
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("the worker exits when idle")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("permission denied"), "{stderr}");
    let statuses: Vec<(String, String, i32)> =
        sqlx::query_as("SELECT kind, status::text, attempts FROM syncq.tasks ORDER BY id")
            .fetch_all(&admin)
            .await
            .unwrap();
    assert_eq!(
        statuses,
        vec![
            ("noop".into(), "succeeded".into(), 1),
            ("fail".into(), "succeeded".into(), 2),
            ("fail".into(), "succeeded".into(), 1),
            ("fail".into(), "failed".into(), 1),
            ("count".into(), "succeeded".into(), 1),
            ("noop".into(), "succeeded".into(), 2),
        ],
        "the finished task a day old was pruned; the rest ran as SPEC §3 says"
    );

    let worker_db = login_as(
        &admin,
        &opts,
        &login_name(&opts, "worker"),
        Some("syncq_worker"),
    )
    .await;
    refused(
        &admin,
        &worker_db,
        "42501",
        &[
            "UPDATE syncq.datasets SET rate_limit = NULL",
            "UPDATE syncq.datasets SET max_concurrency = 100",
            "UPDATE syncq.datasets SET paused = true",
            "UPDATE syncq.datasets SET rate_window = interval '1 day'",
            "INSERT INTO syncq.datasets (dataset_id) VALUES ('x')",
            "DELETE FROM syncq.datasets",
            "DELETE FROM syncq.tasks",
            "TRUNCATE syncq.tasks",
            "UPDATE syncq.tasks SET payload = '{}'",
            "UPDATE syncq.tasks SET cancel_requested = true",
            "UPDATE syncq.tasks SET max_attempts = 10000",
            "UPDATE syncq.tasks SET dataset_id = 'x', kind = 'y', priority = 1",
            "INSERT INTO syncq.tasks (dataset_id, kind, status) VALUES ('d', 'noop', 'running')",
            "INSERT INTO syncq.tasks (dataset_id, kind, runs) VALUES ('d', 'noop', 1)",
            "UPDATE syncq.task_errors SET error = 'x'",
            "DELETE FROM syncq.task_errors",
            "SELECT syncq.retry(ARRAY[1::bigint])",
            "CREATE TABLE syncq.evil (x int)",
            "CREATE FUNCTION syncq.evil() RETURNS int LANGUAGE sql AS 'SELECT 1'",
        ],
    )
    .await;
    drop_login(&admin, &login_name(&opts, "worker")).await;
}

/// Sleeps this long, unless told to stop.
struct Sleeps(Duration);

#[async_trait]
impl SyncWorker for Sleeps {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        match task.sleep(self.0).await {
            Some(stop) => Err(stop.into()),
            None => Ok(json!("slept")),
        }
    }
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_notification_is_a_hint_and_only_the_row_cancels(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let admin = common::connect(&opts).await;
    let nobody = login_as(&admin, &opts, &login_name(&opts, "nobody"), None).await;
    let pool = WorkerPool::builder(admin.clone())
        .register("slow", Sleeps(Duration::from_millis(2500)))
        .config(common::fast_config())
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    let forged = common::insert(&admin, "d", "slow", json!({})).await;
    let real = common::insert(&admin, "d", "slow", json!({})).await;
    common::wait_status(&admin, forged, "running").await;
    common::wait_status(&admin, real, "running").await;

    // A role without a single right on syncq shouts "cancel" at both.
    for _ in 0..20 {
        for id in [forged, real] {
            sqlx::query("SELECT pg_notify('syncq_cancel', $1)")
                .bind(id.to_string())
                .execute(&nobody)
                .await
                .unwrap();
        }
    }
    // The row says cancel for one of them: its handler hears it within a
    // second of the update, by the database's clock.
    let asked_at: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "UPDATE syncq.tasks SET cancel_requested = true WHERE id = $1 RETURNING clock_timestamp()",
    )
    .bind(real)
    .fetch_one(&admin)
    .await
    .unwrap();
    common::wait_status(&admin, real, "cancelled").await;
    let finished_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT finished_at FROM syncq.tasks WHERE id = $1")
            .bind(real)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert!(
        finished_at - asked_at < chrono::Duration::seconds(1),
        "cancelled {} ms after the update",
        (finished_at - asked_at).num_milliseconds()
    );
    // The other ran to its end.
    common::wait_status(&admin, forged, "succeeded").await;
    let row = common::task(&admin, forged).await;
    assert_eq!(row.result, Some(json!("slept")));
    handle.checkpoint();
    run.await.unwrap().unwrap();
    drop_login(&admin, &login_name(&opts, "nobody")).await;
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn no_row_that_can_be_written_makes_a_claim_fail(admin: PgPool) {
    // Bounded counters and finite times, refused with the column's name.
    for (sql, column) in [
        (
            "INSERT INTO syncq.tasks (dataset_id, kind, attempts) VALUES ('d', 'noop', 2147483647)",
            "attempts",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind, max_attempts) VALUES ('d', 'noop', 2147483647)",
            "max_attempts",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind, attempts, max_attempts) VALUES ('d', 'noop', 3, 3)",
            "attempts",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind, run_at) VALUES ('d', 'noop', 'infinity')",
            "run_at",
        ),
        (
            "INSERT INTO syncq.tasks (dataset_id, kind, status, locked_by, lease_expires_at)
             VALUES ('d', 'noop', 'running', 'w', 'infinity')",
            "lease_expires_at",
        ),
        (
            "INSERT INTO syncq.datasets (dataset_id, throttled_until) VALUES ('x', 'infinity')",
            "throttled_until",
        ),
    ] {
        let err = sqlx::query(sql).execute(&admin).await.expect_err(sql);
        let message = err.to_string();
        assert!(message.contains(column), "{sql}: {message}");
    }

    // runs, the fencing token, at its largest: the next claim wraps it.
    let edge = common::insert(&admin, "d", "noop", json!({})).await;
    sqlx::query("UPDATE syncq.tasks SET runs = 2147483647, attempts = 4 WHERE id = $1")
        .bind(edge)
        .execute(&admin)
        .await
        .unwrap();
    let others: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind) SELECT 'other' || n, 'noop'
         FROM generate_series(1, 5) n RETURNING id",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    let pool = WorkerPool::builder(admin.clone())
        .register_builtins()
        .config(common::fast_config())
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    for id in others.iter().chain([&edge]) {
        common::wait_status(&admin, *id, "succeeded").await;
    }
    let row = common::task(&admin, edge).await;
    assert_eq!((row.runs, row.attempts), (1, 5));

    // Retry allows one more attempt even at the bound (SPEC §5).
    let spent: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, status, attempts, max_attempts, finished_at)
         VALUES ('d', 'noop', 'failed', 10000, 10000, now()) RETURNING id",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(
        TaskQueueManager::new(admin.clone())
            .retry(syncq::TaskId(spent))
            .await
            .unwrap()
    );
    common::wait_status(&admin, spent, "succeeded").await;
    let row = common::task(&admin, spent).await;
    assert_eq!((row.attempts, row.max_attempts), (10000, 10000));
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

/// Collects a child's stderr while it runs (so a full pipe never blocks it).
fn collect_stderr(child: &mut tokio::process::Child) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().expect("piped stderr");
    let sink = text.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    text
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_dataset_whose_claims_fail_is_set_aside_and_the_others_drain(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let admin = common::connect(&opts).await;
    // Something no constraint foresaw: every claim touching this dataset
    // fails. It sorts first, so it is always in the first turn.
    sqlx::raw_sql(
        "CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'the upstream mirror of % is gone', NEW.dataset_id; END $$;
         CREATE TRIGGER refuse BEFORE UPDATE OF locked_by ON syncq.tasks FOR EACH ROW
             WHEN (NEW.dataset_id = 'a-broken' AND NEW.locked_by IS NOT NULL)
             EXECUTE FUNCTION public.refuse();
         INSERT INTO syncq.tasks (dataset_id, kind) SELECT 'a-broken', 'noop' FROM generate_series(1, 5);
         -- Ahead of it in turn order, datasets the claim passes over: one
         -- at its cap, one throttled.
         INSERT INTO syncq.datasets (dataset_id, max_concurrency, last_claimed_at)
             VALUES ('0-capped', 1, now() - interval '1 day');
         INSERT INTO syncq.datasets (dataset_id, throttled_until, last_claimed_at)
             VALUES ('0-throttled', now() + interval '1 hour', now() - interval '1 day');
         INSERT INTO syncq.tasks (dataset_id, kind, status, locked_by, lease_expires_at, attempts)
             VALUES ('0-capped', 'noop', 'running', 'elsewhere', now() + interval '1 hour', 1);
         INSERT INTO syncq.tasks (dataset_id, kind)
             SELECT d, 'noop' FROM unnest(ARRAY['0-capped', '0-throttled']) d;
         INSERT INTO syncq.tasks (dataset_id, kind)
             SELECT 'good-' || (n % 4), 'noop' FROM generate_series(1, 200) n;",
    )
    .execute(&admin)
    .await
    .unwrap();

    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(&opts))
        .env("RUST_LOG", "syncq=warn")
        .args([
            "worker",
            // One slot: each claim asks for one task, from the first
            // dataset in turn that it may serve.
            "--concurrency",
            "1",
            "--poll-interval",
            "100ms",
            "--set-aside",
            "1s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = collect_stderr(&mut worker);
    common::wait_for("every good dataset drains", WAIT, || {
        let db = admin.clone();
        async move {
            common::count(&db, "dataset_id LIKE 'good-%' AND status = 'succeeded'").await == 200
        }
    })
    .await;
    assert_eq!(
        common::count(&admin, "dataset_id = 'a-broken' AND status = 'queued'").await,
        5
    );

    // Fixed: once its time is up the dataset is served again.
    sqlx::query("DROP TRIGGER refuse ON syncq.tasks")
        .execute(&admin)
        .await
        .unwrap();
    common::wait_for("the repaired dataset drains", WAIT, || {
        let db = admin.clone();
        async move { common::count(&db, "dataset_id = 'a-broken' AND status = 'succeeded'").await == 5 }
    })
    .await;
    let pid = worker.id().expect("running").to_string();
    let term = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(term.success());
    let status = tokio::time::timeout(WAIT, worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let log = stderr.lock().unwrap().clone();
    assert!(
        log.contains("a-broken")
            && log.contains("setting it aside")
            && log.contains("the upstream mirror of a-broken is gone"),
        "the log names the dataset and its error:\n{log}"
    );
    assert!(
        !log.contains("good-"),
        "no good dataset was set aside:\n{log}"
    );
}

/// Reports whatever its payload says, as an error of the kind it names.
/// jsonb cannot hold a NUL, so the payload writes one as `<NUL>`.
struct Says;

#[async_trait]
impl SyncWorker for Says {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        let text = task.payload()["text"]
            .as_str()
            .unwrap_or_default()
            .replace("<NUL>", "\u{0}");
        match task.payload()["as"].as_str() {
            Some("invalid") => Err(TaskError::Invalid(text)),
            Some("panic") => panic!("{text}"),
            Some("rate_limited") => Err(TaskError::RateLimited {
                retry_after: Some(Duration::MAX),
            }),
            _ => Err(TaskError::Retryable(text)),
        }
    }
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn any_error_text_is_stored_and_an_invalid_task_fails_once(admin: PgPool) {
    use proptest::strategy::{Strategy, ValueTree};
    use proptest::test_runner::TestRunner;

    let pool = WorkerPool::builder(admin.clone())
        .register("says", Says)
        .config(common::fast_config())
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    let max = TaskError::MAX_MESSAGE_BYTES;

    // Texts PostgreSQL refuses as they are: NULs, and far too long.
    let nul = common::insert(
        &admin,
        "d",
        "says",
        json!({"as": "invalid", "text": "a<NUL>b"}),
    )
    .await;
    let long = "é".repeat(50_000);
    let huge = common::insert(&admin, "d", "says", json!({"as": "invalid", "text": long})).await;
    let panics = common::insert(
        &admin,
        "d",
        "says",
        json!({"as": "panic", "text": "p<NUL>q"}),
    )
    .await;
    let throttles = common::insert(&admin, "t", "says", json!({"as": "rate_limited"})).await;
    for id in [nul, huge] {
        common::wait_status(&admin, id, "failed").await;
        let row = common::task(&admin, id).await;
        assert_eq!(row.attempts, 1, "an invalid task is never retried");
    }
    assert_eq!(
        common::task(&admin, nul).await.last_error.as_deref(),
        Some("invalid: a\\0b")
    );
    let stored = common::task(&admin, huge).await.last_error.unwrap();
    assert!(
        stored.len() <= max && stored.contains("[truncated from"),
        "{}",
        stored.len()
    );

    common::wait_for("the panic is recorded", WAIT, || {
        let db = admin.clone();
        async move {
            common::task(&db, panics)
                .await
                .last_error
                .is_some_and(|e| e == "handler panicked: p\\0q")
        }
    })
    .await;
    common::wait_for("the throttle is recorded, clamped", WAIT, || {
        let db = admin.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT throttled_until BETWEEN now() + interval '23 hours' AND now() + interval '24 hours 1 minute'
                 FROM syncq.datasets WHERE dataset_id = 't'",
            )
            .fetch_one(&db)
            .await
            .unwrap_or(false)
        }
    })
    .await;
    let row = common::task(&admin, throttles).await;
    assert_eq!((row.status.as_str(), row.attempts), ("queued", 0));

    // Any string a handler may return is stored, as SPEC says it is.
    let mut runner = TestRunner::deterministic();
    let texts = proptest::string::string_regex("([^\u{0}]|<NUL>){0,300}").unwrap();
    let mut ids = Vec::new();
    for _ in 0..24 {
        let text = texts.new_tree(&mut runner).unwrap().current();
        let id = common::insert(&admin, "p", "says", json!({"as": "invalid", "text": text})).await;
        ids.push((id, text));
    }
    for (id, text) in ids {
        common::wait_status(&admin, id, "failed").await;
        let row = sqlx::query("SELECT last_error, (SELECT error FROM syncq.task_errors WHERE task_id = $1) AS history FROM syncq.tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&admin)
            .await
            .unwrap();
        let expected = format!("invalid: {}", text.replace("<NUL>", "\\0"));
        assert_eq!(row.get::<String, _>("last_error"), expected);
        assert_eq!(row.get::<String, _>("history"), expected);
    }
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

/// Runs the CLI; returns its exit code and stderr.
async fn cli(opts: &PgConnectOptions, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(opts))
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn duration_flags_out_of_range_are_usage_errors(_: PgPoolOptions, opts: PgConnectOptions) {
    for args in [
        &["worker", "--rescue-interval", "500000000000y"][..],
        &["worker", "--lease", "100000000000y"],
        &["worker", "--lease", "10000y"],
        &["worker", "--lease", "1ms"],
        &["worker", "--heartbeat", "0s"],
        &["worker", "--poll-interval", "2h"],
        &["worker", "--grace", "100y"],
        &["worker", "--retention", "500000000000y"],
        &["worker", "--set-aside", "0s"],
        &["worker", "--lease", "30s", "--heartbeat", "1m"],
        &[
            "enqueue",
            "--dataset",
            "d",
            "--kind",
            "noop",
            "--delay",
            "500000000000y",
        ],
        &[
            "enqueue",
            "--dataset",
            "d",
            "--kind",
            "noop",
            "--max-attempts",
            "10001",
        ],
        &["prune", "--older-than", "500000000000y"],
    ] {
        let (code, stderr) = cli(&opts, args).await;
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(
            stderr.contains("between")
                || stderr.contains("invalid value")
                || stderr.contains("shorter"),
            "{args:?}: {stderr}"
        );
    }
    let (code, _) = cli(
        &opts,
        &[
            "enqueue",
            "--dataset",
            "d",
            "--kind",
            "noop",
            "--delay",
            "36000d",
        ],
    )
    .await;
    assert_eq!(code, 0, "a delay within range is taken");
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_producer_holding_a_row_lock_delays_no_other_task(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let admin = common::connect(&opts).await;
    let producer = login_as(
        &admin,
        &opts,
        &login_name(&opts, "producer"),
        Some("syncq_producer"),
    )
    .await;
    let pool = WorkerPool::builder(admin.clone())
        // Through several heartbeats and past its lease.
        .register("sleeps", Sleeps(Duration::from_millis(4500)))
        .config(common::fast_config()) // lease 3 s, heartbeat 300 ms
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    let locked = common::insert(&admin, "d", "sleeps", json!({})).await;
    let other = common::insert(&admin, "e", "sleeps", json!({})).await;
    common::wait_status(&admin, locked, "running").await;
    common::wait_status(&admin, other, "running").await;

    // The producer's UPDATE privilege lets it lock its task's row, and it
    // keeps its transaction open past the lease. The worker's lease on
    // the other task must still be renewed.
    let mut tx = producer.begin().await.unwrap();
    sqlx::query("UPDATE syncq.tasks SET cancel_requested = false WHERE id = $1")
        .bind(locked)
        .execute(&mut *tx)
        .await
        .unwrap();
    common::wait_status(&admin, other, "succeeded").await;
    tx.rollback().await.unwrap();
    let row = common::task(&admin, other).await;
    assert_eq!((row.attempts, row.runs), (1, 1), "never taken back");
    let errors: i64 =
        sqlx::query_scalar("SELECT count(*) FROM syncq.task_errors WHERE task_id = $1")
            .bind(other)
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(errors, 0);
    // The locked one is not lost either.
    common::wait_status(&admin, locked, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    drop_login(&admin, &login_name(&opts, "producer")).await;
}

/// A producer's payload that is valid jsonb but that no handler can be
/// given (nested 300 levels deep; a number past f64), beside ordinary
/// tasks of its dataset and another: each such task fails once, as
/// invalid, with an error naming the payload, uncounted (no handler
/// began) — it does not cycle through claims — and every other task runs.
/// A real worker process, until idle.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn an_undecodable_payload_fails_its_own_task_once(_: PgPoolOptions, opts: PgConnectOptions) {
    let admin = common::connect(&opts).await;
    sqlx::raw_sql(
        r#"INSERT INTO syncq.tasks (dataset_id, kind, payload)
           VALUES ('p', 'noop', (repeat('[', 300) || repeat(']', 300))::jsonb),
                  ('p', 'noop', '{"n": 1e400}');
           INSERT INTO syncq.tasks (dataset_id, kind)
           SELECT d, 'noop' FROM unnest(ARRAY['p', 'q']) d, generate_series(1, 50);"#,
    )
    .execute(&admin)
    .await
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(&opts))
        .env("RUST_LOG", "syncq=warn")
        .args(["worker", "--exit-when-idle", "--poll-interval", "50ms"])
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("the worker exits when idle")
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let poison: Vec<(String, i32, i32, Option<String>)> = sqlx::query_as(
        "SELECT status::text, attempts, runs, last_error FROM syncq.tasks
         WHERE dataset_id = 'p' AND payload <> '{}' ORDER BY id",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(poison.len(), 2);
    for (status, attempts, runs, error) in &poison {
        assert_eq!(
            (status.as_str(), *attempts, *runs),
            ("failed", 0, 1),
            "{poison:?}"
        );
        let error = error.as_deref().unwrap_or_default();
        assert!(error.contains("payload: cannot be read"), "{error}");
    }
    assert_eq!(
        common::count(&admin, "payload = '{}' AND status = 'succeeded'").await,
        100
    );
}
