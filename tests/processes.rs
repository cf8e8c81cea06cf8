//! Real `syncq worker` processes: sharing a queue, SIGTERM checkpoints,
//! kill -9 rescue.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{NewTask, TaskQueueManager};

const WAIT: Duration = Duration::from_secs(60);

fn worker(opts: &PgConnectOptions, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(opts))
        .env("RUST_LOG", "syncq=warn")
        .env("SYNCQ_LEASE", "2s")
        .env("SYNCQ_HEARTBEAT", "300ms")
        .args([
            "worker",
            "--poll-interval",
            "200ms",
            "--rescue-interval",
            "300ms",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a worker process")
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} failed");
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("worker process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn checkpoint_count(db: &PgPool, id: i64) -> u64 {
    common::task(db, id)
        .await
        .checkpoint
        .and_then(|c| c["counted"].as_u64())
        .unwrap_or(0)
}

#[sqlx::test]
async fn two_processes_drain_2000_tasks_each_exactly_once(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let tasks =
        (0..2000).map(|i| NewTask::new(format!("ds{}", i % 7), "noop").payload(json!({ "i": i })));
    TaskQueueManager::new(db.clone())
        .enqueue_many(tasks)
        .await
        .unwrap();
    let mut a = worker(&opts, &["--concurrency", "8", "--exit-when-idle"]);
    let mut b = worker(&opts, &["--concurrency", "8", "--exit-when-idle"]);
    assert!(wait_exit(&mut a, WAIT).success());
    assert!(wait_exit(&mut b, WAIT).success());
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
}

#[sqlx::test]
async fn sigterm_checkpoints_and_exits_0_and_the_next_process_resumes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "count", json!({"to": 60, "step_ms": 50})).await;
    let mut first = worker(&opts, &[]);
    common::wait_for("progress is saved", WAIT, || {
        let db = db.clone();
        async move { checkpoint_count(&db, id).await >= 5 }
    })
    .await;
    signal(&first, "-TERM");
    let status = wait_exit(&mut first, Duration::from_secs(15));
    assert_eq!(status.code(), Some(0));
    let row = common::task(&db, id).await;
    assert_eq!((row.status.as_str(), row.attempts), ("queued", 0));
    let saved = checkpoint_count(&db, id).await;

    let mut second = worker(&opts, &["--exit-when-idle"]);
    assert!(wait_exit(&mut second, WAIT).success());
    let row = common::task(&db, id).await;
    assert_eq!(row.status, "succeeded");
    assert_eq!(
        row.result,
        Some(json!({"counted": 60, "resumed_from": saved}))
    );
}

#[sqlx::test]
async fn kill_9_loses_only_work_since_the_last_checkpoint(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "count", json!({"to": 40, "step_ms": 50})).await;
    let mut victim = worker(&opts, &[]);
    common::wait_for("progress is saved", WAIT, || {
        let db = db.clone();
        async move { checkpoint_count(&db, id).await >= 5 }
    })
    .await;
    signal(&victim, "-KILL");
    let _ = wait_exit(&mut victim, Duration::from_secs(5));
    assert_eq!(
        common::status(&db, id).await,
        "running",
        "nobody released it"
    );
    let saved = checkpoint_count(&db, id).await;

    let mut rescuer = worker(&opts, &["--exit-when-idle"]);
    assert!(wait_exit(&mut rescuer, WAIT).success());
    let row = common::task(&db, id).await;
    assert_eq!(row.status, "succeeded");
    let resumed = row.result.unwrap()["resumed_from"].as_u64().unwrap();
    assert!(resumed >= saved, "resumed from {resumed}, saved {saved}");
    assert_eq!(row.attempts, 2, "the killed attempt counts");
}

#[sqlx::test]
async fn a_fatal_error_stops_the_process_with_exit_1(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "fail", json!({"error": "fatal", "times": 1})).await;
    let mut w = worker(&opts, &[]);
    let status = wait_exit(&mut w, WAIT);
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(w.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("syncq: error: task") && last.contains("fatal"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let row = common::task(&db, id).await;
    assert_eq!((row.status.as_str(), row.attempts), ("queued", 0));
}
