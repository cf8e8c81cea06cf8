//! SPEC §4–§5 for operators: cancel, retry, prune, inspection and roles,
//! through the `syncq` command and by SQL.

mod common;

use std::process::Output;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use syncq::maintenance::vacuumer::Vacuumer;
use syncq::{NewTask, PoolConfig, TaskQueueManager, WorkerPool};

const WAIT: Duration = Duration::from_secs(15);

/// A `syncq` command that hangs fails the test after this.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the `syncq` command on the test's database without blocking the
/// runtime (a worker pool may be running on it).
async fn syncq(opts: &PgConnectOptions, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(opts))
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(CLI_TIMEOUT, out)
        .await
        .unwrap_or_else(|_| panic!("syncq {args:?} did not finish within {CLI_TIMEOUT:?}"))
        .expect("run syncq")
}

async fn ok(opts: &PgConnectOptions, args: &[&str]) -> String {
    let out = syncq(opts, args).await;
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

/// `syncq cancel`: a queued task at once, a running one's handler within
/// SPEC §4's second, a finished one not at all. Timed, so the body runs on
/// a multi-thread runtime, and the command runs as a child process the
/// runtime awaits (`tokio::process`), so the worker pool keeps running
/// while the test waits for it.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn cancel_by_cli_queued_running_and_finished(_: PgPoolOptions, opts: PgConnectOptions) {
    common::on_multi_thread(cancel_by_cli(opts)).await;
}

/// How long after `syncq cancel` has exited (its `UPDATE` committed) the
/// running task may take to end `cancelled`. SPEC §4 gives the handler one
/// second to hear it; the task is then written `cancelled` by the pool's
/// completion loop. The second on top is for a loaded 2-core machine, where
/// this test shares the cores with PostgreSQL, its own worker pool and
/// other test binaries: the NOTIFY, the cancel check, the handler's wake-up
/// and the completion write each wait for a core. The process start of the
/// command is not counted (it is no part of the engine's promise).
const CANCEL_WITHIN: Duration = Duration::from_secs(2);

async fn cancel_by_cli(opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let queued: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, run_at) VALUES ('d', 'noop', now() + interval '1 hour') RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(
        ok(&opts, &["cancel", &queued.to_string()])
            .await
            .contains("cancelled")
    );
    assert_eq!(common::status(&db, queued).await, "cancelled");

    let running = common::insert(&db, "d", "sleep", json!({"ms": 20000})).await;
    let done = common::insert(&db, "d", "noop", json!({})).await;
    let (handle, run) = common::spawn(pool(&db, common::fast_config()));
    common::wait_status(&db, running, "running").await;
    common::wait_status(&db, done, "succeeded").await;
    let asked = tokio::time::Instant::now();
    assert!(
        ok(&opts, &["cancel", &running.to_string()])
            .await
            .contains("told to cancel")
    );
    let updated = tokio::time::Instant::now();
    common::wait_status(&db, running, "cancelled").await;
    let took = updated.elapsed();
    assert!(
        took < CANCEL_WITHIN,
        "cancelled {took:?} after the command exited (it ran for {:?})",
        updated - asked
    );
    let row = common::task(&db, running).await;
    assert_eq!((row.attempts, row.locked_by), (1, None));

    // Cancelling a finished task changes nothing.
    assert!(
        ok(&opts, &["cancel", &done.to_string()])
            .await
            .contains("already succeeded")
    );
    let row = common::task(&db, done).await;
    assert_eq!(row.status, "succeeded");
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn cancel_a_whole_dataset(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    TaskQueueManager::new(db.clone())
        .enqueue_many((0..5).map(|_| NewTask::new("bulk", "noop").delay(Duration::from_secs(3600))))
        .await
        .unwrap();
    let other = common::insert(&db, "other", "noop", json!({})).await;
    assert!(
        ok(&opts, &["cancel", "--dataset", "bulk"])
            .await
            .contains("5 task(s)")
    );
    assert_eq!(
        common::count(&db, "dataset_id = 'bulk' AND status = 'cancelled'").await,
        5
    );
    assert_eq!(common::status(&db, other).await, "queued");
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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

    assert!(
        ok(&opts, &["retry", &failing.to_string()])
            .await
            .contains("queued again")
    );
    assert!(
        ok(&opts, &["retry", &cancelled.to_string()])
            .await
            .contains("queued again")
    );
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
    // Retrying a succeeded task is refused (a usage error: the task is not
    // one retry applies to) and changes nothing.
    let out = syncq(&opts, &["retry", &failing.to_string()]).await;
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(common::status(&db, failing).await, "succeeded");
    // Many at once.
    sqlx::query(
        "UPDATE syncq.tasks SET status = 'failed', finished_at = now() WHERE dataset_id = 'd'",
    )
    .execute(&db)
    .await
    .unwrap();
    assert!(
        ok(&opts, &["retry", "--dataset", "d", "--status", "failed"])
            .await
            .starts_with("2 failed")
    );
    assert_eq!(common::count(&db, "status = 'queued'").await, 2);
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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
        .await
        .contains("deleted 1100")
    );
    assert!(
        ok(&opts, &["prune", "--older-than", "7d"])
            .await
            .contains("deleted 2200")
    );
    let left: Vec<(String,)> =
        sqlx::query_as("SELECT status::text FROM syncq.tasks ORDER BY status")
            .fetch_all(&db)
            .await
            .unwrap();
    let left: Vec<String> = left.into_iter().map(|r| r.0).collect();
    assert_eq!(left, vec!["queued", "running", "succeeded"]);
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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

    let status: Value = serde_json::from_str(&ok(&opts, &["status", "--json"]).await).unwrap();
    // Looked up by name: the order of the list is no part of the output's
    // contract.
    let dataset = |name: &str| {
        status["datasets"]
            .as_array()
            .expect("a list of datasets")
            .iter()
            .find(|d| d["dataset_id"] == name)
            .unwrap_or_else(|| panic!("no dataset {name:?} in {status:#}"))
    };
    assert_eq!(
        status["datasets"].as_array().unwrap().len(),
        2,
        "{status:#}"
    );
    let alpha = dataset("alpha");
    assert_eq!(
        (alpha["succeeded"].as_i64(), alpha["failed"].as_i64()),
        (Some(3), Some(1))
    );
    assert_eq!(alpha["rate_limit"], 50);
    let beta = dataset("beta");
    assert_eq!(
        (beta["queued"].as_i64(), beta["paused"].as_bool()),
        (Some(1), Some(true))
    );
    assert_eq!(status["workers"].as_array().unwrap().len(), 1);
    assert_eq!(status["workers"][0]["pid"], std::process::id());
    assert_eq!(status["unhandled_kinds"], json!(["orphan_kind"]));
    let human = ok(&opts, &["status"]).await;
    assert!(
        human.contains("alpha") && human.contains("paused") && human.contains("orphan_kind"),
        "{human}"
    );

    let tasks: Value = serde_json::from_str(
        &ok(
            &opts,
            &[
                "tasks",
                "--dataset",
                "alpha",
                "--status",
                "succeeded",
                "--json",
            ],
        )
        .await,
    )
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
        ok(&opts, &["tasks", "--limit", "2"]).await.lines().count(),
        3,
        "a header and two rows"
    );

    let shown: Value =
        serde_json::from_str(&ok(&opts, &["show", &failed.to_string(), "--json"]).await).unwrap();
    assert_eq!(shown["status"], "failed");
    assert_eq!(shown["errors"].as_array().unwrap().len(), 1);
    assert!(
        shown["errors"][0]["error"]
            .as_str()
            .unwrap()
            .starts_with("invalid:")
    );
    assert!(
        ok(&opts, &["show", &failed.to_string()])
            .await
            .contains("errors (1):")
    );
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn unknown_ids_and_datasets_are_usage_errors_that_change_nothing(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    common::insert(&db, "known", "noop", json!({})).await;
    for (args, names) in [
        (&["cancel", "999"][..], "no task with id 999"),
        (&["retry", "999"][..], "no task with id 999"),
        (&["show", "999"][..], "no task with id 999"),
        (&["cancel", "--dataset", "nope"][..], "no dataset \"nope\""),
        (&["retry", "--dataset", "nope"][..], "no dataset \"nope\""),
        (&["pause", "nope"][..], "no dataset \"nope\""),
        (&["resume", "nope"][..], "no dataset \"nope\""),
        (
            &["limit", "nope", "--rate", "1/1s"][..],
            "no dataset \"nope\"",
        ),
        (&["limit", "known", "--rate", "5/0s"][..], "--rate"),
        (&["prune", "--older-than", "yesterday"][..], "--older-than"),
        (&["tasks", "--status", "bogus"][..], "--status"),
    ] {
        let out = syncq(&opts, args).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    let datasets: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.dataset_stats")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(datasets, 1);
    let row: (Option<i32>, bool) = sqlx::query_as(
        "SELECT rate_limit, paused FROM syncq.dataset_stats WHERE dataset_id = 'known'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(row, (None, false));
    assert_eq!(common::count(&db, "status = 'queued'").await, 1);
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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
#[sqlx::test(migrator = "syncq::MIGRATOR")]
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
        syncq::store::vacuum::try_vacuum_lock(&mut other)
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
    syncq::store::vacuum::vacuum_unlock(&mut other)
        .await
        .unwrap();

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

/// Every privilege granted to `syncq_producer` or `syncq_worker` on this
/// database's `syncq` objects (schema, tables and views, their columns,
/// functions), one line each, sorted. Empty when the roles do not exist.
async fn grants(db: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "WITH acl AS (
             SELECT 'schema syncq' AS object, (aclexplode(nspacl)).*
             FROM pg_namespace WHERE nspname = 'syncq'
             UNION ALL
             SELECT 'relation ' || c.relname, (aclexplode(c.relacl)).*
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'syncq'
             UNION ALL
             SELECT 'column ' || c.relname || '.' || a.attname, (aclexplode(a.attacl)).*
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'syncq' AND a.attacl IS NOT NULL
             UNION ALL
             SELECT 'function ' || p.oid::regprocedure::text, (aclexplode(p.proacl)).*
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
             WHERE n.nspname = 'syncq'
         )
         SELECT r.rolname || ': ' || acl.privilege_type || ' on ' || acl.object
         FROM acl JOIN pg_roles r ON r.oid = acl.grantee
         WHERE r.rolname IN ('syncq_producer', 'syncq_worker')
         ORDER BY 1",
    )
    .fetch_all(db)
    .await
    .expect("list the grants")
}

/// Whether `role` holds `privilege` on `what` (`has_<kind>_privilege`).
async fn has(db: &PgPool, check: &str) -> bool {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT {check}")))
        .fetch_one(db)
        .await
        .unwrap_or_else(|e| panic!("{check}: {e}"))
}

/// `syncq roles` (SPEC §2 Privileges). The two role names are fixed and
/// server-wide, so other runs and tests may have created them already: the
/// test asserts only about this database's objects, which are fresh, so
/// nothing is granted on them before the command whatever the server
/// holds. A LOGIN role of this test's own (named after its database) tries
/// the producer role and is dropped at the end, also when the test fails.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn roles_grants_the_two_roles_their_rights_on_this_database(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let login = format!(
        "syncq_ops_{}",
        opts.get_database().expect("test database name")
    );
    let body = tokio::spawn(roles_body(db.clone(), opts.clone(), login.clone()));
    let outcome = body.await;
    // Whatever happened: the login goes (its sessions first).
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1")
        .bind(&login)
        .execute(&db)
        .await
        .expect("end the login's sessions");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP ROLE IF EXISTS \"{login}\""
    )))
    .execute(&db)
    .await
    .expect("drop the test's login");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    let left: bool = sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)")
        .bind(&login)
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(!left, "the login {login} is still there");
}

async fn roles_body(db: PgPool, opts: PgConnectOptions, login: String) {
    assert_eq!(
        grants(&db).await,
        Vec::<String>::new(),
        "a fresh database grants the roles nothing"
    );
    assert!(ok(&opts, &["roles"]).await.contains("ready"));
    let granted = grants(&db).await;
    assert!(!granted.is_empty());
    assert!(ok(&opts, &["roles"]).await.contains("ready"));
    assert_eq!(
        grants(&db).await,
        granted,
        "running it again changes nothing"
    );

    // Both roles exist now, and cannot log in.
    let logins: Vec<(String, bool)> = sqlx::query_as(
        "SELECT rolname::text, rolcanlogin FROM pg_roles
         WHERE rolname IN ('syncq_producer', 'syncq_worker') ORDER BY 1",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(
        logins,
        [
            ("syncq_producer".to_string(), false),
            ("syncq_worker".to_string(), false)
        ]
    );

    for (check, want) in [
        // The producer: the input columns, the cancel flag, the views.
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'dataset_id', 'INSERT')",
            true,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'kind', 'INSERT')",
            true,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'payload', 'INSERT')",
            true,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'priority', 'INSERT')",
            true,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'run_at', 'INSERT')",
            true,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'max_attempts', 'INSERT')",
            true,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'unique_key', 'INSERT')",
            true,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'cancel_requested', 'UPDATE')",
            true,
        ),
        (
            "has_table_privilege('syncq_producer', 'syncq.dataset_stats', 'SELECT')",
            true,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'id', 'INSERT')",
            false,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'status', 'INSERT')",
            false,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'status', 'UPDATE')",
            false,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'attempts', 'INSERT')",
            false,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.tasks', 'locked_by', 'UPDATE')",
            false,
        ),
        (
            "has_table_privilege('syncq_producer', 'syncq.tasks', 'DELETE')",
            false,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.datasets', 'rate_limit', 'UPDATE')",
            false,
        ),
        (
            "has_column_privilege('syncq_producer', 'syncq.datasets', 'paused', 'UPDATE')",
            false,
        ),
        (
            "has_function_privilege('syncq_producer', 'syncq.retry(bigint[])', 'EXECUTE')",
            false,
        ),
        // The worker: claims, outcomes, throttles; not the settings.
        (
            "has_column_privilege('syncq_worker', 'syncq.tasks', 'status', 'UPDATE')",
            true,
        ),
        (
            "has_column_privilege('syncq_worker', 'syncq.tasks', 'checkpoint', 'UPDATE')",
            true,
        ),
        (
            "has_column_privilege('syncq_worker', 'syncq.datasets', 'throttled_until', 'UPDATE')",
            true,
        ),
        (
            "has_table_privilege('syncq_worker', 'syncq.task_errors', 'INSERT')",
            true,
        ),
        (
            "has_table_privilege('syncq_worker', 'syncq.workers', 'UPDATE')",
            true,
        ),
        (
            "has_column_privilege('syncq_worker', 'syncq.tasks', 'cancel_requested', 'UPDATE')",
            false,
        ),
        (
            "has_column_privilege('syncq_worker', 'syncq.tasks', 'payload', 'UPDATE')",
            false,
        ),
        (
            "has_column_privilege('syncq_worker', 'syncq.tasks', 'max_attempts', 'UPDATE')",
            false,
        ),
        (
            "has_table_privilege('syncq_worker', 'syncq.tasks', 'DELETE')",
            false,
        ),
        (
            "has_column_privilege('syncq_worker', 'syncq.datasets', 'rate_limit', 'UPDATE')",
            false,
        ),
        (
            "has_column_privilege('syncq_worker', 'syncq.datasets', 'max_concurrency', 'UPDATE')",
            false,
        ),
        (
            "has_column_privilege('syncq_worker', 'syncq.datasets', 'paused', 'UPDATE')",
            false,
        ),
        (
            "has_table_privilege('syncq_worker', 'syncq.datasets', 'INSERT')",
            false,
        ),
        // Neither runs DDL.
        (
            "has_schema_privilege('syncq_producer', 'syncq', 'CREATE')",
            false,
        ),
        (
            "has_schema_privilege('syncq_worker', 'syncq', 'CREATE')",
            false,
        ),
        (
            "has_database_privilege('syncq_worker', current_database(), 'CREATE')",
            false,
        ),
    ] {
        assert_eq!(has(&db, check).await, want, "{check}");
    }
    // Neither owns anything here (an owner could ALTER or DROP it).
    let owned: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         JOIN pg_roles r ON r.oid = c.relowner
         WHERE n.nspname = 'syncq' AND r.rolname IN ('syncq_producer', 'syncq_worker')",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(owned, 0);

    // A login granted the producer role enqueues, and cannot start a task.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE ROLE \"{login}\" LOGIN; GRANT syncq_producer TO \"{login}\""
    )))
    .execute(&db)
    .await
    .expect("create the test's login");
    let producer = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(opts.clone().username(&login))
        .await
        .expect("log in as the test's login");
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('by-login', 'noop') RETURNING id",
    )
    .fetch_one(&producer)
    .await
    .expect("the producer enqueues");
    let err = sqlx::query("UPDATE syncq.tasks SET status = 'running' WHERE id = $1")
        .bind(id)
        .execute(&producer)
        .await
        .expect_err("the producer cannot start a task");
    assert_eq!(
        err.as_database_error().and_then(|e| e.code()).as_deref(),
        Some("42501"),
        "{err}"
    );
    producer.close().await;
    assert_eq!(common::status(&db, id).await, "queued");
}

/// `syncq worker --datasets a,b` (a real worker process) runs the tasks of
/// those datasets and leaves every other dataset's alone: they are never
/// claimed, even after the worker has gone round its claim loop many times.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_worker_with_datasets_runs_only_those(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    // The other dataset's tasks first: a worker that ignored --datasets
    // would have them in its first claim.
    TaskQueueManager::new(db.clone())
        .enqueue_many(
            ["c", "c", "c", "a", "a", "b", "b", "other"]
                .into_iter()
                .map(|d| NewTask::new(d, "noop")),
        )
        .await
        .unwrap();
    let worker = common::WorkerProcess::start(
        &common::url(&opts),
        &["--datasets", "a,b", "--poll-interval", "50ms"],
        &[],
    );
    common::wait_for("a and b drained", WAIT, || {
        let db = db.clone();
        async move {
            common::count(&db, "dataset_id IN ('a', 'b') AND status = 'succeeded'").await == 4
        }
    })
    .await;
    // More rounds of the claim loop: a fresh task of b, woken by its insert,
    // and polls in between.
    let later = common::insert(&db, "b", "noop", json!({})).await;
    common::wait_status(&db, later, "succeeded").await;

    let untouched: Vec<(String, String, i32, i32, Option<String>)> = sqlx::query_as(
        "SELECT dataset_id, status::text, attempts, runs, locked_by FROM syncq.tasks
         WHERE dataset_id NOT IN ('a', 'b') ORDER BY id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(untouched.len(), 4);
    for row in &untouched {
        assert_eq!(
            (row.1.as_str(), row.2, row.3, row.4.as_deref()),
            ("queued", 0, 0, None),
            "{row:?}; worker log:\n{}",
            worker.log()
        );
    }
    let registered: Option<Vec<String>> = sqlx::query_scalar("SELECT datasets FROM syncq.workers")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(registered, Some(vec!["a".to_string(), "b".to_string()]));
}

/// `syncq enqueue --run-at` (RFC 3339, here with a non-UTC offset) stores
/// that instant as `run_at`, and a worker that is running and idle the
/// whole time (a real process) does not start the task before it: every
/// look at the row while the database clock is before `run_at` finds it
/// `queued`, and its `started_at` is not before `run_at`.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn enqueue_run_at_sets_run_at_and_the_task_waits_for_it(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let worker =
        common::WorkerProcess::start(&common::url(&opts), &["--poll-interval", "50ms"], &[]);
    // The worker is up: it runs a task enqueued now.
    let now_task = common::insert(&db, "d", "noop", json!({})).await;
    common::wait_status(&db, now_task, "succeeded").await;

    // 3 s ahead on the database clock (room for the command's start on a
    // loaded machine: the row must be seen queued before it), at +05:30.
    let at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT date_trunc('milliseconds', now() + interval '3 seconds')")
            .fetch_one(&db)
            .await
            .unwrap();
    let offset = chrono::FixedOffset::east_opt(5 * 3600 + 30 * 60).unwrap();
    let arg = at
        .with_timezone(&offset)
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
    assert!(arg.ends_with("+05:30"), "{arg}");
    let id: i64 = ok(
        &opts,
        &[
            "enqueue",
            "--dataset",
            "d",
            "--kind",
            "noop",
            "--run-at",
            &arg,
        ],
    )
    .await
    .trim()
    .parse()
    .expect("an id");
    let run_at: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT run_at FROM syncq.tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(run_at, at, "run_at is the instant given ({arg})");

    let looked_early = std::cell::Cell::new(0u32);
    let looked = &looked_early;
    common::wait_for("the delayed task succeeds", WAIT, || {
        let db = db.clone();
        async move {
            let (status, early): (String, bool) = sqlx::query_as(
                "SELECT status::text, now() < run_at FROM syncq.tasks WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
            if early {
                looked.set(looked.get() + 1);
                assert_eq!(status, "queued", "task {id} left queued before its run_at");
            }
            status == "succeeded"
        }
    })
    .await;
    assert!(looked_early.get() > 0, "never looked before run_at");
    let (started_late, attempts): (bool, i32) =
        sqlx::query_as("SELECT started_at >= run_at, attempts FROM syncq.tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(
        started_late,
        "started before run_at; log:\n{}",
        worker.log()
    );
    assert_eq!(attempts, 1);
}

/// `syncq migrate` on a live database: while two real worker processes
/// drain a queue (with tasks that checkpoint), `migrate` runs again —
/// three at once, as a deploy on several hosts would. Each exits 0, the
/// schema's migration history is unchanged, the workers keep running (and
/// still hear new inserts), and every task ends `succeeded` once, with no
/// error recorded.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn migrate_on_a_live_database_breaks_nothing(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let history = || {
        let db = db.clone();
        async move {
            sqlx::query_as::<_, (i64, bool, Vec<u8>)>(
                "SELECT version, success, checksum FROM _sqlx_migrations ORDER BY version",
            )
            .fetch_all(&db)
            .await
            .expect("read the migration history")
        }
    };
    // The versioned migrations' history (migrate drops the test
    // migrator's one entry for the function files: they are recorded in
    // syncq.sql_objects).
    let mut before = history().await;
    assert!(!before.is_empty());
    before.retain(|(v, _, _)| *v != syncq::schema::SQL_OBJECTS_VERSION);
    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind, payload)
         SELECT 'live-' || (n % 3), 'sleep', '{\"ms\": 20}'::jsonb FROM generate_series(1, 600) n
         UNION ALL
         SELECT 'live-count', 'count', '{\"to\": 10, \"step_ms\": 30}'::jsonb FROM generate_series(1, 6)",
    )
    .execute(&db)
    .await
    .unwrap();
    let url = common::url(&opts);
    let args = ["--concurrency", "4", "--poll-interval", "50ms"];
    let mut workers = [
        common::WorkerProcess::start(&url, &args, &[]),
        common::WorkerProcess::start(&url, &args, &[]),
    ];
    common::wait_for("the drain is under way", WAIT, || {
        let db = db.clone();
        async move { common::count(&db, "status = 'succeeded'").await > 0 }
    })
    .await;
    let left_before = common::count(&db, "status IN ('queued', 'running')").await;
    let (a, b, c) = tokio::join!(
        syncq(&opts, &["migrate"]),
        syncq(&opts, &["migrate"]),
        syncq(&opts, &["migrate"]),
    );
    for out in [a, b, c] {
        assert!(
            out.status.success(),
            "migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("up to date"));
    }
    assert!(
        left_before > 0,
        "the queue had drained before migrate ran: make the workload longer"
    );
    assert_eq!(history().await, before, "the migration history changed");

    // Work enqueued after the migrations is picked up too.
    let after = TaskQueueManager::new(db.clone())
        .enqueue(NewTask::new("after-migrate", "noop"))
        .await
        .unwrap();
    common::wait_status(&db, after, "succeeded").await;
    common::wait_for("every task succeeded", WAIT, || {
        let db = db.clone();
        async move { common::count(&db, "status <> 'succeeded'").await == 0 }
    })
    .await;
    for w in &mut workers {
        assert!(
            w.child.try_wait().expect("try_wait").is_none(),
            "a worker exited; its log:\n{}",
            w.log()
        );
    }
    assert_eq!(common::count(&db, "true").await, 607);
    assert_eq!(
        common::count(&db, "attempts <> 1 OR last_error IS NOT NULL").await,
        0,
        "a task was retried"
    );
    let errors: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.task_errors")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(errors, 0);
    for w in &mut workers {
        w.signal("-TERM").await;
    }
    for w in &mut workers {
        let status = w.wait_exit(WAIT).await;
        let log = w.log();
        assert!(status.success(), "worker exit {status}; log:\n{log}");
        assert!(
            !log.contains(" ERROR ") && !log.contains(" WARN "),
            "the worker logged trouble:\n{log}"
        );
    }
}

/// `syncq roles` three times at once, beside `syncq migrate`: every one
/// exits 0 (grants on the same objects in two transactions at once once
/// failed one in three with "tuple concurrently updated").
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn roles_and_migrate_are_safe_to_run_at_once(_: PgPoolOptions, opts: PgConnectOptions) {
    for round in 0..4 {
        let (a, b, c, m) = tokio::join!(
            syncq(&opts, &["roles"]),
            syncq(&opts, &["roles"]),
            syncq(&opts, &["roles"]),
            syncq(&opts, &["migrate"]),
        );
        for (what, out) in [("roles", a), ("roles", b), ("roles", c), ("migrate", m)] {
            assert!(
                out.status.success(),
                "round {round}, {what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// A worker of this build on a database a newer build migrated (a version
/// it lacks in the history) starts, and says loudly that it should be
/// upgraded.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_worker_on_a_newer_schema_says_to_upgrade_it(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (999999, 'from a newer build', true, '\\x00', 0)",
    )
    .execute(&db)
    .await
    .unwrap();
    let out = syncq(&opts, &["worker", "--exit-when-idle"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("newer than this build of syncq knows") && stderr.contains("999999"),
        "{stderr}"
    );
}
