//! Real `syncq worker` processes: sharing a queue, SIGTERM checkpoints,
//! kill -9 rescue, a Fatal error's exit.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::WorkerProcess;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{NewTask, TaskQueueManager};

const WAIT: Duration = Duration::from_secs(60);

/// The application name of the test's own connections, so that the
/// workers' sessions can be told apart in `pg_stat_activity`.
const OBSERVER: &str = "syncq-processes-test";

/// A `syncq worker` with short timings, logging each attempt's start and
/// end (inside the `task` span, an info span: hence info, not warn).
fn worker(opts: &PgConnectOptions, extra: &[&str]) -> WorkerProcess {
    let mut args = vec!["--poll-interval", "200ms", "--rescue-interval", "300ms"];
    args.extend_from_slice(extra);
    WorkerProcess::start(
        &common::url(opts),
        &args,
        &[
            common::ATTEMPT_LOG_ENV[0],
            ("SYNCQ_LEASE", "2s"),
            ("SYNCQ_HEARTBEAT", "300ms"),
        ],
    )
}

/// The task ids whose attempts a worker logged as started.
fn started_tasks(w: &WorkerProcess) -> Vec<i64> {
    w.log()
        .lines()
        .filter(|l| l.contains("syncq::attempt: attempt started"))
        .filter_map(|l| {
            l.split([' ', '{', '}'])
                .find_map(|part| part.strip_prefix("task_id="))
                .and_then(|v| v.parse().ok())
        })
        .collect()
}

/// Two processes drain 2,000 tasks of 7 datasets: each task ran once,
/// and both processes ran a fair part of them. The datasets are paused
/// until both processes are up, so that neither can drain the queue
/// before the other has connected.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn two_processes_drain_2000_tasks_each_exactly_once(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    sqlx::query(
        "INSERT INTO syncq.datasets (dataset_id, paused)
         SELECT 'ds' || i, true FROM generate_series(0, 6) i",
    )
    .execute(&db)
    .await
    .unwrap();
    let tasks =
        (0..2000).map(|i| NewTask::new(format!("ds{}", i % 7), "noop").payload(json!({ "i": i })));
    let ids = TaskQueueManager::new(db.clone())
        .enqueue_many(tasks)
        .await
        .unwrap();
    let mut a = worker(&opts, &["--concurrency", "8"]);
    let mut b = worker(&opts, &["--concurrency", "8"]);
    // Up means listening: a process that has not yet LISTENed would miss
    // the wake-up below and start late, by up to its poll (and neither
    // may exit early: every task is in a paused dataset until then).
    common::wait_for("both processes listen", WAIT, || {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(DISTINCT pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            )
            .fetch_one(&db)
            .await
            .unwrap()
                == 2
        }
    })
    .await;
    // Resume every dataset, then wake both at once (a notification is only
    // a hint to look at the rows: this one saves them their poll).
    sqlx::query("UPDATE syncq.datasets SET paused = false")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("SELECT pg_notify('syncq_task_inserted', '')")
        .execute(&db)
        .await
        .unwrap();
    common::wait_for("every task finished", WAIT, || {
        let db = db.clone();
        async move { common::count(&db, "status = 'succeeded'").await == 2000 }
    })
    .await;
    a.signal("-TERM").await;
    b.signal("-TERM").await;
    assert!(a.wait_exit(WAIT).await.success(), "{}", a.log());
    assert!(b.wait_exit(WAIT).await.success(), "{}", b.log());
    assert_eq!(
        common::count(&db, "status = 'succeeded' AND attempts = 1 AND runs = 1").await,
        2000
    );
    let errors: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.task_errors")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(errors, 0);
    let workers: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.workers")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(workers, 0, "workers deregister on exit");

    // Both did work, and between them started each task exactly once.
    // Woken together, they split the work about evenly (900–1,100 each
    // when measured); a tenth each leaves room for a loaded machine that
    // starts one process's claims late.
    let (by_a, by_b) = (started_tasks(&a), started_tasks(&b));
    assert!(
        by_a.len() >= 200 && by_b.len() >= 200,
        "one process did nearly everything: {} and {} starts",
        by_a.len(),
        by_b.len()
    );
    let mut all: Vec<i64> = by_a.iter().chain(&by_b).copied().collect();
    all.sort_unstable();
    let mut expected = ids.clone();
    expected.sort_unstable();
    assert_eq!(
        all, expected,
        "each task started exactly once, in one process"
    );
    let (set_a, set_b): (BTreeSet<i64>, BTreeSet<i64>) =
        (by_a.into_iter().collect(), by_b.into_iter().collect());
    assert!(set_a.is_disjoint(&set_b));
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn sigterm_checkpoints_and_exits_0_and_the_next_process_resumes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "count", json!({"to": 60, "step_ms": 50})).await;
    let mut first = worker(&opts, &[]);
    common::wait_for("progress is saved", WAIT, || {
        let db = db.clone();
        async move { common::counted(&db, id).await >= 5 }
    })
    .await;
    first.signal("-TERM").await;
    let status = first.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", first.log());
    let row = common::task(&db, id).await;
    assert_eq!((row.status.as_str(), row.attempts), ("queued", 0));
    let saved = common::counted(&db, id).await;

    let mut second = worker(&opts, &["--exit-when-idle"]);
    assert!(second.wait_exit(WAIT).await.success(), "{}", second.log());
    let row = common::task(&db, id).await;
    assert_eq!(row.status, "succeeded");
    assert_eq!(
        row.result,
        Some(json!({"counted": 60, "resumed_from": saved}))
    );
}

/// kill -9 mid-task: the rescuer process resumes from exactly the last
/// checkpoint the killed one saved (read once the killed process's
/// sessions are gone, so no write of it can still land), and the killed
/// attempt counts.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn kill_9_loses_only_work_since_the_last_checkpoint(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::observer(&opts, OBSERVER, 4).await;
    let id = common::insert(&db, "d", "count", json!({"to": 40, "step_ms": 50})).await;
    let mut victim = worker(&opts, &[]);
    common::wait_for("progress is saved", WAIT, || {
        let db = db.clone();
        async move { common::counted(&db, id).await >= 5 }
    })
    .await;
    victim.signal("-KILL").await;
    let _ = victim.wait_exit(Duration::from_secs(5)).await;
    common::wait_sessions_gone(&db, OBSERVER).await;
    assert_eq!(
        common::status(&db, id).await,
        "running",
        "nobody released it"
    );
    let saved = common::counted(&db, id).await;

    let mut rescuer = worker(&opts, &["--exit-when-idle"]);
    assert!(rescuer.wait_exit(WAIT).await.success(), "{}", rescuer.log());
    let row = common::task(&db, id).await;
    assert_eq!(row.status, "succeeded");
    assert_eq!(
        row.result,
        Some(json!({"counted": 40, "resumed_from": saved})),
        "resumed from exactly the last checkpoint"
    );
    assert_eq!(row.attempts, 2, "the killed attempt counts");
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_fatal_error_stops_the_process_with_exit_1(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "fail", json!({"error": "fatal", "times": 1})).await;
    let mut w = worker(&opts, &[]);
    let status = w.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(1));
    let stderr = w.log();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("syncq: error: task") && last.contains("fatal"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let row = common::task(&db, id).await;
    assert_eq!((row.status.as_str(), row.attempts), ("queued", 0));
}

/// `syncq status --json`, parsed.
async fn status_json(opts: &PgConnectOptions) -> serde_json::Value {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(opts))
        .args(["status", "--json"])
        .output()
        .await
        .expect("run syncq status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

/// A worker killed with -9 cannot remove its row; `syncq status` stops
/// listing it as live once two heartbeat intervals pass without a beat
/// (300 ms here: well within 5 s, where it used to take 60 s), lists it
/// as stale with the age of its last beat, and no longer counts its kinds
/// as handled.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_killed_worker_stops_being_live_after_two_heartbeats(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::on_multi_thread(async move {
        let db = common::observer(&opts, OBSERVER, 2).await;
        let mut w = worker(&opts, &[]);
        common::wait_for("the worker registered as live", WAIT, || {
            let opts = opts.clone();
            async move {
                status_json(&opts).await["workers"]
                    .as_array()
                    .is_some_and(|a| a.len() == 1)
            }
        })
        .await;
        let live = status_json(&opts).await;
        assert_eq!(live["workers"][0]["heartbeat_every_secs"], json!(0.3));
        w.signal("-KILL").await;
        let _ = w.wait_exit(WAIT).await;
        let killed_at = tokio::time::Instant::now();
        TaskQueueManager::new(db.clone())
            .enqueue(NewTask::new("d", "noop"))
            .await
            .unwrap();
        common::wait_for(
            "the killed worker no longer live",
            Duration::from_secs(5),
            || {
                let opts = opts.clone();
                async move {
                    status_json(&opts).await["workers"]
                        .as_array()
                        .is_some_and(|a| a.is_empty())
                }
            },
        )
        .await;
        let status = status_json(&opts).await;
        let stale = status["stale_workers"].as_array().expect("stale_workers");
        assert_eq!(stale.len(), 1, "{status:#}");
        assert!(
            stale[0]["heartbeat_age_secs"].as_f64().unwrap() >= 0.6,
            "{status:#}"
        );
        assert_eq!(status["unhandled_kinds"], json!(["noop"]));
        assert!(killed_at.elapsed() < Duration::from_secs(5));
    })
    .await;
}

/// `--exit-when-idle` exits 0 once nothing is left that will run without
/// an operator, and says what is left: tasks in a paused dataset and a
/// task delayed an hour stay queued; a task due in a second is waited for
/// and runs.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn exit_when_idle_leaves_paused_and_far_delayed_tasks_and_says_so(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::on_multi_thread(async move {
        let db = common::observer(&opts, OBSERVER, 2).await;
        let manager = TaskQueueManager::new(db.clone());
        let paused = manager.enqueue(NewTask::new("held", "noop")).await.unwrap();
        manager.queue("held").pause().await.unwrap();
        let later = manager
            .enqueue(NewTask::new("later", "noop").delay(Duration::from_secs(3600)))
            .await
            .unwrap();
        let now = manager.enqueue(NewTask::new("now", "noop")).await.unwrap();
        let soon = manager
            .enqueue(NewTask::new("soon", "noop").delay(Duration::from_secs(1)))
            .await
            .unwrap();
        let mut w = worker(&opts, &["--exit-when-idle"]);
        let status = w.wait_exit(Duration::from_secs(30)).await;
        assert!(status.success(), "{status:?}\n{}", w.log());
        assert_eq!(common::status(&db, now).await, "succeeded");
        assert_eq!(common::status(&db, soon).await, "succeeded", "{}", w.log());
        assert_eq!(common::status(&db, paused).await, "queued");
        assert_eq!(common::status(&db, later).await, "queued");
        let log = w.log();
        let line = log
            .lines()
            .find(|l| l.contains("nothing left to run"))
            .unwrap_or_else(|| panic!("no idle line in:\n{log}"));
        assert!(
            line.contains("paused dataset") && line.contains("held"),
            "{line}"
        );
        assert!(line.contains("delayed or throttled"), "{line}");
    })
    .await;
}

/// A worker whose stderr was closed (its log reader went away) still
/// stops cleanly on SIGTERM: exit 0, its registry row removed.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_worker_with_a_closed_stderr_stops_cleanly_on_sigterm(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::on_multi_thread(async move {
        let db = common::observer(&opts, OBSERVER, 2).await;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
            .env("DATABASE_URL", common::url(&opts))
            .env("RUST_LOG", "syncq=debug")
            .args(["worker", "--poll-interval", "50ms"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start a worker");
        drop(child.stderr.take());
        common::wait_for("the worker registered", WAIT, || {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM syncq.workers")
                    .fetch_one(&db)
                    .await
                    .unwrap()
                    == 1
            }
        })
        .await;
        // Work to log about, to a closed pipe.
        TaskQueueManager::new(db.clone())
            .enqueue(NewTask::new("d", "noop"))
            .await
            .unwrap();
        let pid = child.id().expect("pid").to_string();
        let killed = tokio::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .await
            .unwrap();
        assert!(killed.success());
        let status = tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("the worker exited")
            .unwrap();
        assert!(status.success(), "{status:?}");
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.workers")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(rows, 0, "the worker left its registry row");
    })
    .await;
}

/// A `--datasets` name that matches nothing (a typo, most likely) is
/// warned about once at start, not waited on in silence.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn an_unknown_dataset_in_datasets_is_warned_about(_: PgPoolOptions, opts: PgConnectOptions) {
    common::on_multi_thread(async move {
        let mut w = worker(&opts, &["--datasets", "nothing_here", "--exit-when-idle"]);
        let status = w.wait_exit(WAIT).await;
        assert!(status.success(), "{status:?}\n{}", w.log());
        let log = w.log();
        let warned: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("no task and no settings for this dataset yet"))
            .collect();
        assert_eq!(warned.len(), 1, "{log}");
        assert!(warned[0].contains("nothing_here"), "{log}");
    })
    .await;
}
