//! A task leased ahead is not a task started (SPEC §2, §4, §6): measured
//! at the handlers of real `syncq worker` processes, the local queue at
//! its default. Handler starts are read from the workers' own records —
//! their `attempt started` log lines (JSON, with the time each was
//! written) — not from the rows the claim writes; the rows are then held
//! to say the same.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::WorkerProcess;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{NewTask, TaskQueueManager};

const WAIT: Duration = Duration::from_secs(90);

/// A `syncq worker` logging JSON, every flag at its default but `extra`
/// (a short poll interval where a test says so).
fn worker(opts: &PgConnectOptions, extra: &[&str]) -> WorkerProcess {
    let mut args = vec!["--log-format", "json"];
    args.extend_from_slice(extra);
    WorkerProcess::start(&common::url(opts), &args, &[common::ATTEMPT_LOG_ENV[0]])
}

/// One handler start, as its worker logged it.
#[derive(Debug, Clone)]
struct Start {
    at: DateTime<Utc>,
    task_id: i64,
    dataset: String,
}

/// Every handler start the workers logged, in time order.
fn starts(workers: &[&WorkerProcess]) -> Vec<Start> {
    let mut all = Vec::new();
    for w in workers {
        for line in w.log().lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if v["fields"]["message"] != "attempt started" {
                continue;
            }
            let at = v["timestamp"]
                .as_str()
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc));
            let span = &v["span"];
            if let (Some(at), Some(task_id), Some(dataset)) = (
                at,
                span["task_id"].as_i64(),
                span["dataset"].as_str().map(str::to_string),
            ) {
                all.push(Start {
                    at,
                    task_id,
                    dataset,
                });
            }
        }
    }
    all.sort_by_key(|s| s.at);
    all
}

/// The most of `times` (sorted) in any half-open interval of `window`.
fn worst_window(times: &[DateTime<Utc>], window: Duration) -> usize {
    let window = chrono::Duration::from_std(window).unwrap();
    let mut worst = 0;
    let mut first = 0;
    for (i, t) in times.iter().enumerate() {
        while *t - times[first] >= window {
            first += 1;
        }
        worst = worst.max(i + 1 - first);
    }
    worst
}

/// Runs the `syncq` command; panics with its output if it fails.
fn syncq(opts: &PgConnectOptions, args: &[&str]) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(opts))
        .args(args)
        .output()
        .expect("run syncq");
    assert!(
        out.status.success(),
        "syncq {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_all_finished(db: &PgPool) {
    common::wait_for("every task finished", WAIT, || async {
        common::count(db, "status IN ('queued', 'running')").await == 0
    })
    .await;
}

/// `before` short tasks, then one long one, then `after` short ones, all in
/// dataset `d`: the short ones set a pool's pace (so it leases ahead), the
/// long one then holds its slot while the next ones wait leased ahead.
/// Returns the long task's id.
async fn short_long_short(db: &PgPool, before: usize, long_ms: u64, after: usize) -> i64 {
    let manager = TaskQueueManager::new(db.clone());
    let short = |_| NewTask::new("d", "sleep").payload(json!({"ms": 3}));
    manager.enqueue_many((0..before).map(short)).await.unwrap();
    let long = manager
        .enqueue(NewTask::new("d", "sleep").payload(json!({"ms": long_ms})))
        .await
        .unwrap();
    manager.enqueue_many((0..after).map(short)).await.unwrap();
    long.into()
}

/// Rate limit 5/1s on `api` beside 120 slow tasks of 7 unlimited
/// datasets, two workers of 4 slots: in no second do more than 5 of
/// `api`'s handlers start.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_rate_limit_holds_at_the_handlers_of_two_workers(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    sqlx::query(
        "INSERT INTO syncq.datasets (dataset_id, rate_limit, paused) VALUES ('api', 5, true)",
    )
    .execute(&db)
    .await
    .unwrap();
    let manager = TaskQueueManager::new(db.clone());
    manager
        .enqueue_many((0..30).map(|_| NewTask::new("api", "noop")))
        .await
        .unwrap();
    manager
        .enqueue_many(
            (0..120).map(|i| {
                NewTask::new(format!("slow-{}", i % 7), "sleep").payload(json!({"ms": 700}))
            }),
        )
        .await
        .unwrap();
    let a = worker(&opts, &["--concurrency", "4"]);
    let b = worker(&opts, &["--concurrency", "4"]);
    common::wait_for("both workers registered", WAIT, || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM syncq.workers")
            .fetch_one(&db)
            .await
            .unwrap()
            == 2
    })
    .await;
    sqlx::query("UPDATE syncq.datasets SET paused = false WHERE dataset_id = 'api'")
        .execute(&db)
        .await
        .unwrap();
    wait_all_finished(&db).await;
    let starts = starts(&[&a, &b]);
    let api: Vec<DateTime<Utc>> = starts
        .iter()
        .filter(|s| s.dataset == "api")
        .map(|s| s.at)
        .collect();
    assert_eq!(api.len(), 30, "every api task started once");
    let worst = worst_window(&api, Duration::from_secs(1));
    eprintln!("worst 1-second window of api handler starts: {worst}");
    assert!(
        worst <= 5,
        "{worst} handler starts of api in one second (rate limit 5/1s)"
    );
    // Both workers served api: the limit was shared, not one worker's.
    let by_worker = [&a, &b].map(|w| starts_of(w).iter().filter(|s| s.dataset == "api").count());
    assert!(
        by_worker.iter().all(|n| *n > 0),
        "api starts by worker: {by_worker:?}"
    );
}

fn starts_of(w: &WorkerProcess) -> Vec<Start> {
    starts(&[w])
}

/// `syncq pause` while a worker drains short tasks with a local queue:
/// no handler of the dataset starts more than a second after the pause
/// committed, and the tasks left are `queued`, uncounted.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn no_handler_starts_after_its_dataset_is_paused(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    manager
        .enqueue_many((0..3000).map(|_| NewTask::new("d", "sleep").payload(json!({"ms": 2}))))
        .await
        .unwrap();
    let w = worker(&opts, &["--concurrency", "2"]);
    common::wait_for("a few hundred done", WAIT, || async {
        common::count(&db, "status = 'succeeded'").await >= 300
    })
    .await;
    let leased_before: i64 =
        common::count(&db, "status = 'queued' AND locked_by IS NOT NULL").await;
    syncq(&opts, &["pause", "d"]);
    let paused_at = Utc::now();
    // Longer than any task leased ahead may wait (AHEAD_WAIT).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let late: Vec<Start> = starts(&[&w])
        .into_iter()
        .filter(|s| s.at > paused_at + chrono::Duration::seconds(1))
        .collect();
    assert!(late.is_empty(), "started after the pause: {late:?}");
    let after: Vec<i64> = starts(&[&w])
        .into_iter()
        .filter(|s| s.at > paused_at)
        .map(|s| (s.at - paused_at).num_milliseconds())
        .collect();
    // Nothing of d is running or held by the worker a second on.
    assert_eq!(common::count(&db, "status = 'running'").await, 0);
    assert_eq!(
        common::count(&db, "status = 'queued' AND attempts > 0").await,
        0,
        "a task that never ran was counted"
    );
    eprintln!(
        "leased ahead at the pause: {leased_before}; handler starts after it, ms after: {after:?}"
    );
}

/// A task cancelled while a worker holds it leased ahead (behind a long
/// task in its only slot) ends `cancelled`, and its handler never starts.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_task_cancelled_while_leased_ahead_never_starts(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let long = short_long_short(&db, 200, 3000, 100).await;
    let w = worker(&opts, &["--concurrency", "1"]);
    let deadline = tokio::time::Instant::now() + WAIT;
    let waiting = loop {
        let running_long = common::status(&db, long).await == "running";
        let leased: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM syncq.tasks WHERE status = 'queued' AND locked_by IS NOT NULL
               AND lease_expires_at > now() AND id > $1 ORDER BY id DESC LIMIT 1",
        )
        .bind(long)
        .fetch_optional(&db)
        .await
        .unwrap();
        if let (true, Some(id)) = (running_long, leased) {
            break Some(id);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no task leased ahead behind the long one"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let waiting = waiting.unwrap();
    syncq(&opts, &["cancel", &waiting.to_string()]);
    wait_all_finished(&db).await;
    let row = common::task(&db, waiting).await;
    assert_eq!((row.status.as_str(), row.attempts), ("cancelled", 0));
    assert!(
        !starts(&[&w]).iter().any(|s| s.task_id == waiting),
        "the handler of a task cancelled while leased ahead started"
    );
}

/// kill -9 of a worker holding tasks leased ahead, every task with
/// `max_attempts = 1`: another worker runs them; none fails without its
/// handler having started.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn kill_9_costs_no_attempt_of_a_task_leased_ahead(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let long = short_long_short(&db, 200, 60_000, 100).await;
    sqlx::query("UPDATE syncq.tasks SET max_attempts = 1")
        .execute(&db)
        .await
        .unwrap();
    // A lease short enough that the killed worker's running task comes
    // back within the test (the rule under test is the other tasks').
    let mut a = worker(
        &opts,
        &[
            "--concurrency",
            "1",
            "--lease",
            "2s",
            "--heartbeat",
            "500ms",
        ],
    );
    common::wait_for("tasks leased ahead behind the long one", WAIT, || async {
        common::status(&db, long).await == "running"
            && common::count(&db, "status = 'queued' AND locked_by IS NOT NULL").await > 0
    })
    .await;
    let leased = common::count(&db, "status = 'queued' AND locked_by IS NOT NULL").await;
    a.signal("-KILL").await;
    a.wait_exit(WAIT).await;
    let started_by_a: std::collections::BTreeSet<i64> =
        starts(&[&a]).iter().map(|s| s.task_id).collect();
    let b = worker(&opts, &["--concurrency", "4", "--rescue-interval", "200ms"]);
    wait_all_finished(&db).await;
    let failed: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM syncq.tasks WHERE status = 'failed' ORDER BY id")
            .fetch_all(&db)
            .await
            .unwrap();
    // Only the long task failed: its handler began in the killed worker
    // (an attempt, its only one).
    assert_eq!(failed, vec![long], "{leased} were leased ahead at the kill");
    assert!(started_by_a.contains(&long));
    let unrun_counted = common::count(&db, "status = 'succeeded' AND attempts <> 1").await;
    assert_eq!(unrun_counted, 0);
    drop(b);
}

/// Short tasks behind a long one in one worker's local queue are run by
/// another worker with free slots, not after the long task.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn no_task_waits_behind_a_long_one_while_another_worker_is_free(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let long = short_long_short(&db, 300, 8000, 200).await;
    let a = worker(&opts, &["--concurrency", "1"]);
    let b = worker(&opts, &["--concurrency", "1"]);
    wait_all_finished(&db).await;
    let (long_started, long_finished): (DateTime<Utc>, DateTime<Utc>) =
        sqlx::query_as("SELECT started_at, finished_at FROM syncq.tasks WHERE id = $1")
            .bind(long)
            .fetch_one(&db)
            .await
            .unwrap();
    let last_short: DateTime<Utc> =
        sqlx::query_scalar("SELECT max(finished_at) FROM syncq.tasks WHERE id <> $1")
            .bind(long)
            .fetch_one(&db)
            .await
            .unwrap();
    assert!(
        last_short < long_finished - chrono::Duration::seconds(5),
        "the last short task finished at {last_short}, the long one ran {long_started} – {long_finished}"
    );
    drop((a, b));
}

/// One worker, one slot, tasks of priorities 5, −3, 0, 10, 2, −1, 7, 1:
/// the handlers start in priority order, and `ORDER BY started_at` reads
/// the same order.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn started_at_reads_the_priority_order_the_handlers_ran_in(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    // 20 ms each: a start's time is the database's clock less the time
    // since its handler began as the worker measured it, accurate to well
    // under a millisecond — not to the microseconds between noop tasks.
    for p in [5, -3, 0, 10, 2, -1, 7, 1] {
        manager
            .enqueue(
                NewTask::new("d", "sleep")
                    .payload(json!({"ms": 20}))
                    .priority(p),
            )
            .await
            .unwrap();
    }
    let w = worker(&opts, &["--concurrency", "1"]);
    wait_all_finished(&db).await;
    let by_start: Vec<(i64, i16)> =
        sqlx::query_as("SELECT id, priority FROM syncq.tasks ORDER BY started_at, id")
            .fetch_all(&db)
            .await
            .unwrap();
    let priorities: Vec<i16> = by_start.iter().map(|(_, p)| *p).collect();
    assert_eq!(priorities, vec![-3, -1, 0, 1, 2, 5, 7, 10]);
    let handler_order: Vec<i64> = starts(&[&w]).iter().map(|s| s.task_id).collect();
    let row_order: Vec<i64> = by_start.iter().map(|(id, _)| *id).collect();
    assert_eq!(handler_order, row_order);
}

/// One worker, one slot, three datasets of 30 tasks: the handlers take
/// turns of at most the quantum (4 tasks), and `ORDER BY started_at`
/// reads the same turns.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn started_at_reads_the_rounds_the_handlers_ran_in(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    manager
        .enqueue_many(
            (0..90)
                .map(|i| NewTask::new(format!("ds-{}", i % 3), "sleep").payload(json!({"ms": 25}))),
        )
        .await
        .unwrap();
    let w = worker(&opts, &["--concurrency", "1"]);
    wait_all_finished(&db).await;
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, dataset_id FROM syncq.tasks ORDER BY started_at, id")
            .fetch_all(&db)
            .await
            .unwrap();
    let handler: Vec<(i64, String)> = starts(&[&w])
        .into_iter()
        .map(|s| (s.task_id, s.dataset))
        .collect();
    assert_eq!(handler, rows, "the rows' start order is the handlers'");
    let mut longest: BTreeMap<String, usize> = BTreeMap::new();
    let mut run = 0;
    for (i, (_, d)) in rows.iter().enumerate() {
        run = if i > 0 && rows[i - 1].1 == *d {
            run + 1
        } else {
            1
        };
        let l = longest.entry(d.clone()).or_default();
        *l = (*l).max(run);
    }
    assert!(
        longest.values().all(|l| *l <= 4),
        "longest run of one dataset's starts: {longest:?}"
    );
}
