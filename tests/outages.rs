//! SPEC §6: no task is lost or left running through a restart of
//! PostgreSQL or lost connections, and a handler's outcome is not lost to
//! an outage shorter than the lease. Real `syncq worker` processes; the
//! restart runs on a private cluster (the shared server serves other tests).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::WorkerProcess;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use syncq::local_postgres::LocalPostgres;
use syncq::{NewTask, Stop, SyncTask, SyncWorker, TaskQueueManager, TaskResult, WorkerPool};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(90);

fn finished(counts: &BTreeMap<String, i64>) -> i64 {
    ["succeeded", "failed", "cancelled"]
        .iter()
        .map(|s| counts.get(*s).copied().unwrap_or(0))
        .sum()
}

async fn wait_all_finished(db: &PgPool, total: i64, workers: &[&WorkerProcess]) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let counts = common::by_status(db).await;
        if finished(&counts) == total {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = workers.iter().map(|w| w.log()).collect();
            panic!(
                "not every task finished within {WAIT:?}: {counts:?}\nworker logs:\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_succeeded_at_least(db: &PgPool, n: i64) {
    common::wait_for(&format!("{n} tasks succeeded"), WAIT, || async move {
        common::count(db, "status = 'succeeded'").await >= n
    })
    .await;
}

/// Every task succeeded with one counted attempt and no error on record,
/// and its handler ran to the end exactly once (the workers' attempt log).
async fn assert_each_succeeded_once(db: &PgPool, total: i64, workers: &[&WorkerProcess]) {
    let ended = common::attempts_ended_by(workers, total as usize).await;
    assert_eq!(ended.len() as i64, total, "tasks whose handler ended");
    for (id, outcomes) in &ended {
        assert_eq!(
            outcomes,
            &vec!["Succeeded".to_string()],
            "task {id}: its handler ended more than once or not as a success"
        );
    }
    let counts = common::by_status(db).await;
    let logs = || {
        workers
            .iter()
            .map(|w| w.log())
            .collect::<Vec<_>>()
            .join("\n----\n")
    };
    assert_eq!(
        counts.get("succeeded").copied().unwrap_or(0),
        total,
        "{counts:?}\n{}",
        logs()
    );
    let recounted = common::count(db, "attempts <> 1").await;
    assert_eq!(
        recounted,
        0,
        "tasks with an attempt counted twice\n{}",
        logs()
    );
    let errors: Vec<String> = sqlx::query_scalar("SELECT error FROM syncq.task_errors LIMIT 5")
        .fetch_all(db)
        .await
        .unwrap();
    assert!(errors.is_empty(), "errors recorded: {errors:?}\n{}", logs());
}

/// The reproduction: two workers, lease 8 s, 20 one-attempt tasks
/// running when connections are refused for 5 s. Every handler returned
/// `Ok`, so every task succeeds — none is failed by a lease that ran out.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn an_outage_shorter_than_the_lease_changes_no_outcome(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let admin = common::admin(&opts).await;
    let database = opts.get_database().unwrap().to_string();
    let tasks = (0..20).map(|i| {
        NewTask::new("d", "sleep")
            .payload(json!({ "ms": 1500, "i": i }))
            .max_attempts(1)
    });
    TaskQueueManager::new(db.clone())
        .enqueue_many(tasks)
        .await
        .unwrap();
    let url = common::url(&opts);
    let args = [
        "--concurrency",
        "6",
        "--lease",
        "8s",
        "--heartbeat",
        "1s",
        "--poll-interval",
        "200ms",
        "--rescue-interval",
        "300ms",
    ];
    let a = WorkerProcess::start(&url, &args, common::ATTEMPT_LOG_ENV);
    let b = WorkerProcess::start(&url, &args, common::ATTEMPT_LOG_ENV);
    common::wait_for("handlers are running", WAIT, || async {
        common::count(&db, "status = 'running'").await >= 8
    })
    .await;
    db.close().await;
    common::refuse_connections(&admin, &database).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    common::allow_connections(&admin, &database).await;
    let db = common::connect(&opts).await;
    wait_all_finished(&db, 20, &[&a, &b]).await;
    assert_each_succeeded_once(&db, 20, &[&a, &b]).await;
    // Logged once per outage, not once per try.
    for w in [&a, &b] {
        let log = w.log();
        let down = log.matches("database unreachable").count();
        assert!((1..=2).contains(&down), "{down} outage lines:\n{log}");
        assert!(log.contains("database reachable again"), "{log}");
    }
}

/// Every session of the database terminated five times during a drain:
/// the workers reconnect and the drain ends with every task succeeded once.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn backends_terminated_five_times_mid_drain_lose_and_fail_nothing(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let admin = common::admin(&opts).await;
    let database = opts.get_database().unwrap().to_string();
    let total = 3000;
    let tasks = (0..total).map(|i| {
        let kind = if i % 50 == 0 { "sleep" } else { "noop" };
        NewTask::new(format!("d{}", i % 5), kind)
            .payload(json!({ "ms": 200, "i": i }))
            .max_attempts(1)
    });
    TaskQueueManager::new(db.clone())
        .enqueue_many(tasks)
        .await
        .unwrap();
    let url = common::url(&opts);
    let args = [
        "--concurrency",
        "8",
        "--lease",
        "10s",
        "--heartbeat",
        "1s",
        "--poll-interval",
        "200ms",
    ];
    let a = WorkerProcess::start(&url, &args, common::ATTEMPT_LOG_ENV);
    let b = WorkerProcess::start(&url, &args, common::ATTEMPT_LOG_ENV);
    let mut terminated = 0;
    for round in 1..=5 {
        wait_succeeded_at_least(&db, round * 400).await;
        terminated += common::terminate_backends(&admin, &database).await;
    }
    assert!(terminated >= 10, "only {terminated} sessions were ended");
    wait_all_finished(&db, total, &[&a, &b]).await;
    assert_each_succeeded_once(&db, total, &[&a, &b]).await;
}

/// `pg_ctl restart -m fast` of the server mid-drain: workers reconnect
/// with backoff, LISTEN again (a task enqueued afterwards starts without
/// waiting for a poll), and every task succeeds once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_drain_loses_and_fails_nothing() {
    let pg = LocalPostgres::start().expect("a private PostgreSQL cluster");
    let url = pg.url("postgres");
    let db = PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    syncq::migrate(&db).await.unwrap();
    let total = 4000;
    let tasks = (0..total).map(|i| {
        let kind = if i % 100 == 0 { "sleep" } else { "noop" };
        NewTask::new(format!("d{}", i % 4), kind)
            .payload(json!({ "ms": 300, "i": i }))
            .max_attempts(1)
    });
    TaskQueueManager::new(db.clone())
        .enqueue_many(tasks)
        .await
        .unwrap();
    // A long poll: after the restart, only LISTEN can start new work fast.
    let args = [
        "--concurrency",
        "8",
        "--lease",
        "15s",
        "--heartbeat",
        "1s",
        "--poll-interval",
        "30s",
    ];
    let a = WorkerProcess::start(&url, &args, common::ATTEMPT_LOG_ENV);
    let b = WorkerProcess::start(&url, &args, common::ATTEMPT_LOG_ENV);
    wait_succeeded_at_least(&db, 800).await;
    pg.restart().expect("restart PostgreSQL");
    wait_all_finished(&db, total, &[&a, &b]).await;
    assert_each_succeeded_once(&db, total, &[&a, &b]).await;

    // LISTEN is back: a new task starts long before the 30 s poll.
    common::wait_for("both workers LISTEN again", WAIT, || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'",
        )
        .fetch_one(&db)
        .await
        .unwrap_or(0)
            >= 2
    })
    .await;
    let id = TaskQueueManager::new(db.clone())
        .enqueue(NewTask::new("late", "noop"))
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    common::wait_status(&db, id, "succeeded").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a task enqueued after the restart waited {:?}: LISTEN was not re-established",
        started.elapsed()
    );
    for w in [&a, &b] {
        let log = w.log();
        assert!(
            log.matches("database unreachable").count() <= 2,
            "outage logged per try:\n{log}"
        );
    }
    db.close().await;
}

/// Reports how its run was told to stop; a later run succeeds.
struct ReportsStop(mpsc::UnboundedSender<(i32, Stop)>);

#[syncq::async_trait]
impl SyncWorker for ReportsStop {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        if task.payload()["succeed_from_run"].as_i64() <= Some(i64::from(task.run())) {
            return Ok(json!({ "run": task.run() }));
        }
        let stop = task.stopped().await;
        let _ = self.0.send((task.run(), stop));
        Err(stop.into())
    }
}

/// An outage longer than the lease: the pool stops the handler whose lease
/// ran out unrenewed — while the database is still unreachable — instead
/// of letting it run on a task another worker may own by then. Afterwards
/// the task runs again and succeeds.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_long_outage_stops_the_handler_whose_lease_ran_out(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(2))
        .connect_with(opts.clone())
        .await
        .unwrap();
    let admin = common::admin(&opts).await;
    let database = opts.get_database().unwrap().to_string();
    let id = TaskQueueManager::new(db.clone())
        .enqueue(NewTask::new("d", "waits").payload(json!({ "succeed_from_run": 2 })))
        .await
        .unwrap();
    let (stops, mut heard) = mpsc::unbounded_channel();
    let config = syncq::PoolConfig {
        lease: Duration::from_secs(2),
        heartbeat: Duration::from_millis(300),
        ..common::fast_config()
    };
    let pool = WorkerPool::builder(db.clone())
        .register("waits", ReportsStop(stops))
        .config(config)
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_status(&db, id, "running").await;
    common::refuse_connections(&admin, &database).await;
    let told = tokio::time::timeout(Duration::from_secs(10), heard.recv())
        .await
        .expect("the handler heard nothing within 10 s of the outage")
        .expect("a stop");
    assert_eq!(told, (1, Stop::LeaseLost));
    common::allow_connections(&admin, &database).await;
    common::wait_status(&db, id, "succeeded").await;
    let row = common::task(&db, id).await;
    assert_eq!(row.result, Some(json!({ "run": 2 })));
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

/// A task this pool lost (its lease taken back) and then claimed again is
/// two runs here: the older one hears `LeaseLost` at once, the newer one
/// nothing, and the newer one's outcome is the one written.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_task_claimed_again_here_stops_the_older_run_only(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = TaskQueueManager::new(db.clone())
        .enqueue(NewTask::new("d", "waits").payload(json!({ "succeed_from_run": 99 })))
        .await
        .unwrap();
    let (stops, mut heard) = mpsc::unbounded_channel();
    let config = syncq::PoolConfig {
        concurrency: 2,
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_secs(10),
        rescue_interval: Duration::from_millis(50),
        ..common::fast_config()
    };
    let pool = WorkerPool::builder(db.clone())
        .register("waits", ReportsStop(stops))
        .config(config)
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_status(&db, id, "running").await;
    // The lease runs out as if the heartbeat had been silent: the rescuer
    // of this very pool takes the task back, and its dispatcher claims it
    // again.
    sqlx::query(
        "UPDATE syncq.tasks SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(id)
    .execute(&db)
    .await
    .unwrap();
    let told = tokio::time::timeout(Duration::from_secs(10), heard.recv())
        .await
        .expect("the older run heard nothing")
        .expect("a stop");
    assert_eq!(told, (1, Stop::LeaseLost));
    common::wait_for("the task runs again", WAIT, || async {
        let row = sqlx::query("SELECT status::text AS status, runs FROM syncq.tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
        row.get::<String, _>("status") == "running" && row.get::<i32, _>("runs") == 2
    })
    .await;
    // The newer run is untouched by the older one's end: it is still held
    // after a heartbeat would have renewed it, and a cancel reaches it.
    TaskQueueManager::new(db.clone()).cancel(id).await.unwrap();
    let told = tokio::time::timeout(Duration::from_secs(10), heard.recv())
        .await
        .expect("the newer run heard nothing")
        .expect("a stop");
    assert_eq!(told, (2, Stop::Cancel));
    common::wait_status(&db, id, "cancelled").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
}
