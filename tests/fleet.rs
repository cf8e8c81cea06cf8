//! SPEC §4 and §6 across a fleet: real `syncq worker` processes — three
//! where it matters — run the built-in kinds, and the test looks only at
//! what users see: rows, through SQL, and the workers' own logs.
//!
//! What the task rows do not keep (every attempt's start, every checkpoint
//! a run wrote) is recorded by two audit triggers the test adds to its own
//! database (`fleet_audit`, below), as an operator auditing a queue would:
//! they copy what each claim and each checkpoint wrote, in the writing
//! transaction, with the database's values (`started_at` is the claim's
//! clock). They change nothing in `syncq`'s tables.
//!
//! The tests take turns (`fleet_test`): each runs up to three worker
//! processes next to PostgreSQL on a 2-core machine, so two at once would
//! starve each other and measure the machine instead of the engine.

mod common;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::WorkerProcess;
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Deadline for a fleet to get through its work: several times what each
/// test needs on an idle machine (2–7 s), for a 2-core machine that also
/// runs other test binaries and builds.
const WAIT: Duration = Duration::from_secs(30);

/// Whole-test limit: a test that hangs anywhere fails with this.
const TEST_LIMIT: Duration = Duration::from_secs(120);

/// The application name of the test's own connections, so that the
/// workers' sessions can be told apart in `pg_stat_activity`.
const OBSERVER: &str = "syncq-fleet-test";

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs a test body: one at a time (see the module's doc), on a
/// multi-thread runtime (the bodies measure time and sample while they
/// wait), and within `TEST_LIMIT`. Worker processes still running when it
/// ends — or panics — are killed when dropped.
async fn fleet_test<F>(body: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let _turn = SERIAL.lock().await;
    common::on_multi_thread(async move {
        if tokio::time::timeout(TEST_LIMIT, body).await.is_err() {
            panic!("the test did not finish within {TEST_LIMIT:?}");
        }
    })
    .await;
}

/// A `syncq worker` logging each attempt's start and end.
fn worker(opts: &PgConnectOptions, args: &[&str]) -> WorkerProcess {
    WorkerProcess::start(&common::url(opts), args, common::ATTEMPT_LOG_ENV)
}

/// Runs the `syncq` command without blocking the runtime; its stdout.
async fn syncq(opts: &PgConnectOptions, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(opts))
        .args(args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .unwrap_or_else(|_| panic!("syncq {args:?} did not finish within 60 s"))
        .expect("run syncq");
    assert!(
        out.status.success(),
        "syncq {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The audit: one row per start of an attempt (every claim moves `runs`
/// on and sets `started_at`), and one per checkpoint written.
const AUDIT: &str = r#"
CREATE SCHEMA fleet_audit;
CREATE TABLE fleet_audit.starts (
    seq        bigint GENERATED ALWAYS AS IDENTITY,
    task_id    bigint NOT NULL,
    dataset_id text NOT NULL,
    runs       int NOT NULL,
    attempts   int NOT NULL,
    worker     text NOT NULL,
    started_at timestamptz NOT NULL
);
CREATE FUNCTION fleet_audit.record_start() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fleet_audit.starts (task_id, dataset_id, runs, attempts, worker, started_at)
    VALUES (NEW.id, NEW.dataset_id, NEW.runs, NEW.attempts,
            coalesce(NEW.locked_by, OLD.locked_by), NEW.started_at);
    RETURN NULL;
END;
$$;
CREATE TRIGGER fleet_audit_start AFTER UPDATE ON syncq.tasks FOR EACH ROW
    -- A start: its started_at written — by the claim (a limited dataset's
    -- task), or for a task leased ahead after its handler began, on its
    -- own or with its end (then the row goes from queued to its end).
    WHEN (NEW.started_at IS NOT NULL AND NEW.started_at IS DISTINCT FROM OLD.started_at)
    EXECUTE FUNCTION fleet_audit.record_start();
CREATE TABLE fleet_audit.checkpoints (
    seq        bigint GENERATED ALWAYS AS IDENTITY,
    task_id    bigint NOT NULL,
    runs       int NOT NULL,
    checkpoint jsonb
);
CREATE FUNCTION fleet_audit.record_checkpoint() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO fleet_audit.checkpoints (task_id, runs, checkpoint)
    VALUES (NEW.id, NEW.runs, NEW.checkpoint);
    RETURN NULL;
END;
$$;
CREATE TRIGGER fleet_audit_checkpoint AFTER UPDATE OF checkpoint ON syncq.tasks FOR EACH ROW
    WHEN (NEW.checkpoint IS DISTINCT FROM OLD.checkpoint)
    EXECUTE FUNCTION fleet_audit.record_checkpoint();
"#;

async fn install_audit(db: &PgPool) {
    sqlx::raw_sql(AUDIT)
        .execute(db)
        .await
        .expect("install the audit triggers");
}

/// One attempt's start, as the rows recorded it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Start {
    task_id: i64,
    dataset_id: String,
    runs: i32,
    attempts: i32,
    worker: String,
    started_at: DateTime<Utc>,
}

/// Every start of the dataset's tasks (all of them with `None`), by time.
async fn starts(db: &PgPool, dataset: Option<&str>) -> Vec<Start> {
    sqlx::query_as(
        "SELECT task_id, dataset_id, runs, attempts, worker, started_at FROM fleet_audit.starts
         WHERE $1::text IS NULL OR dataset_id = $1 ORDER BY started_at, seq",
    )
    .bind(dataset)
    .fetch_all(db)
    .await
    .expect("read the audited starts")
}

/// The checkpoints each run of task `id` wrote, in order.
async fn checkpoints(db: &PgPool, id: i64) -> Vec<(i32, Value)> {
    sqlx::query_as(
        "SELECT runs, checkpoint FROM fleet_audit.checkpoints WHERE task_id = $1 ORDER BY seq",
    )
    .bind(id)
    .fetch_all(db)
    .await
    .expect("read the audited checkpoints")
}

async fn db_now(db: impl sqlx::PgExecutor<'_>) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(db)
        .await
        .expect("read the database clock")
}

/// A line of a worker's attempt log (target `syncq::attempt`).
#[derive(Debug, Clone, PartialEq)]
struct AttemptLine {
    task_id: i64,
    run: i32,
    /// `None`: "attempt started"; else the end's outcome and whether it
    /// was written.
    ended: Option<(String, bool)>,
}

fn parse_attempt(line: &str) -> Option<AttemptLine> {
    let started = line.contains("syncq::attempt: attempt started");
    let ended = line.contains("syncq::attempt: attempt ended");
    if !started && !ended {
        return None;
    }
    let field = |name: &str| {
        line.split([' ', '{', '}'])
            .find_map(|part| part.strip_prefix(name))
    };
    let task_id = field("task_id=")?.parse().ok()?;
    let run = field("run=")?.parse().ok()?;
    let ended = if ended {
        Some((
            field("outcome=")?.to_string(),
            field("recorded=")? == "true",
        ))
    } else {
        None
    };
    Some(AttemptLine {
        task_id,
        run,
        ended,
    })
}

/// The attempt lines a worker logged so far.
fn attempt_log(w: &WorkerProcess) -> Vec<AttemptLine> {
    w.log().lines().filter_map(parse_attempt).collect()
}

/// Whether `w` logged the start of run `run` of task `id`.
fn started_here(w: &WorkerProcess, id: i64, run: i32) -> bool {
    attempt_log(w)
        .iter()
        .any(|l| l.task_id == id && l.run == run && l.ended.is_none())
}

/// The end of run `run` of task `id` that `w` logged, if any.
fn ended_here(w: &WorkerProcess, id: i64, run: i32) -> Option<(String, bool)> {
    attempt_log(w)
        .into_iter()
        .find(|l| l.task_id == id && l.run == run && l.ended.is_some())
        .and_then(|l| l.ended)
}

async fn count_where(db: &PgPool, sql: &'static str, dataset: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(dataset)
        .fetch_one(db)
        .await
        .expect("count")
}

/// Waits until no task of `dataset` is queued or running.
async fn wait_drained(db: &PgPool, dataset: &'static str) {
    common::wait_for(&format!("dataset {dataset} drained"), WAIT, || {
        let db = db.clone();
        async move {
            count_where(
                &db,
                "SELECT count(*) FROM syncq.tasks
                 WHERE dataset_id = $1 AND status IN ('queued', 'running')",
                dataset,
            )
            .await
                == 0
        }
    })
    .await;
}

/// Asserts that no `limit + 1` of `times` (sorted) fall within one
/// `window`: the start `limit` places after any start is at least a
/// window later. Returns whether some window held exactly `limit` (the
/// limit was reached, not merely respected).
fn assert_at_most_per_window(
    times: &[DateTime<Utc>],
    limit: usize,
    window: TimeDelta,
    what: &str,
) -> bool {
    for (i, later) in times.iter().enumerate().skip(limit) {
        let first = times[i - limit];
        assert!(
            *later - first >= window,
            "{what}: {} starts within {} (from {first} to {later}), the limit is {limit} per {window}",
            limit + 1,
            *later - first,
        );
    }
    times
        .iter()
        .enumerate()
        .skip(limit - 1)
        .any(|(i, last)| *last - times[i + 1 - limit] < window)
}

/// Waits until every worker exited 0.
async fn wait_all_exit_0(workers: &mut [WorkerProcess]) {
    for w in workers.iter_mut() {
        let status = w.wait_exit(WAIT).await;
        assert!(status.success(), "a worker exited {status:?}:\n{}", w.log());
    }
}

// ---------------------------------------------------------------------
// §2 / §6: rate limits, caps, fairness and throttles hold across processes.
// ---------------------------------------------------------------------

/// 60 `noop` tasks on a dataset limited (by `syncq limit`) to 10 starts
/// per second, drained by three worker processes: in no interval of one
/// second — any, not only aligned ones — did 11 tasks start (`started_at`
/// of the rows, the claims' database clock; each ran exactly once), the
/// limit was reached, at least two processes shared the budget, and the
/// drain took at least the 5 s that 60 starts at 10 per second need.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_rate_limit_holds_in_every_window_across_three_worker_processes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    fleet_test(rate_limit_across_processes(opts)).await;
}

async fn rate_limit_across_processes(opts: PgConnectOptions) {
    let db = common::observer(&opts, OBSERVER, 6).await;
    install_audit(&db).await;
    let said = syncq(&opts, &["limit", "rated", "--rate", "10/1s", "--create"]).await;
    assert!(said.contains("rate 10/1s"), "{said}");
    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind)
         SELECT 'rated', 'noop' FROM generate_series(1, 60)",
    )
    .execute(&db)
    .await
    .unwrap();

    let began = tokio::time::Instant::now();
    let args = [
        "--concurrency",
        "4",
        "--poll-interval",
        "100ms",
        "--exit-when-idle",
    ];
    let mut workers: Vec<WorkerProcess> = (0..3).map(|_| worker(&opts, &args)).collect();
    wait_all_exit_0(&mut workers).await;
    let took = began.elapsed();

    assert_eq!(
        count_where(
            &db,
            "SELECT count(*) FROM syncq.tasks
             WHERE dataset_id = $1 AND status = 'succeeded' AND attempts = 1 AND runs = 1",
            "rated",
        )
        .await,
        60,
        "every task ran exactly once"
    );
    let times: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT started_at FROM syncq.tasks WHERE dataset_id = 'rated' ORDER BY started_at",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let reached = assert_at_most_per_window(&times, 10, TimeDelta::seconds(1), "rated");
    assert!(reached, "no second held 10 starts: {times:?}");
    let span = times[59] - times[0];
    assert!(
        span >= TimeDelta::seconds(5),
        "60 starts at 10/s took only {span}"
    );
    assert!(
        took >= Duration::from_secs(5),
        "the drain took {took:?}, less than the limit allows"
    );

    // No start the rows do not show, and more than one process took part.
    let audited = starts(&db, Some("rated")).await;
    assert_eq!(audited.len(), 60, "starts seen by the audit: {audited:?}");
    let processes: BTreeSet<&str> = audited.iter().map(|s| s.worker.as_str()).collect();
    assert!(
        processes.len() >= 2,
        "one process took every start: {processes:?}"
    );
}

/// 20 `fail` tasks that fail twice (retryable, default backoff) on a
/// dataset limited to 10 starts per second, three worker processes: all
/// 60 attempts — first tries and retries — together respect the limit in
/// every one-second interval. Each attempt's start is what its claim wrote
/// (the audit of `runs`/`started_at`), cross-checked with the workers' own
/// attempt logs: the same 60 (task, run) pairs, each started once in one
/// process.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn every_attempt_counts_toward_the_rate_limit_across_three_worker_processes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    fleet_test(every_attempt_counts(opts)).await;
}

async fn every_attempt_counts(opts: PgConnectOptions) {
    let db = common::observer(&opts, OBSERVER, 6).await;
    install_audit(&db).await;
    sqlx::query("INSERT INTO syncq.datasets (dataset_id, rate_limit) VALUES ('flaky', 10)")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query(
        r#"INSERT INTO syncq.tasks (dataset_id, kind, payload)
           SELECT 'flaky', 'fail', '{"error": "retryable", "times": 2}' FROM generate_series(1, 20)"#,
    )
    .execute(&db)
    .await
    .unwrap();

    let args = [
        "--concurrency",
        "4",
        "--poll-interval",
        "100ms",
        "--exit-when-idle",
    ];
    let mut workers: Vec<WorkerProcess> = (0..3).map(|_| worker(&opts, &args)).collect();
    wait_all_exit_0(&mut workers).await;

    assert_eq!(
        count_where(
            &db,
            "SELECT count(*) FROM syncq.tasks
             WHERE dataset_id = $1 AND status = 'succeeded' AND attempts = 3 AND runs = 3",
            "flaky",
        )
        .await,
        20,
        "each task failed twice, then succeeded"
    );
    let audited = starts(&db, Some("flaky")).await;
    assert_eq!(audited.len(), 60, "three starts per task: {audited:?}");
    assert!(
        audited.iter().all(|s| s.attempts == s.runs),
        "each run was a counted attempt: {audited:?}"
    );
    let times: Vec<DateTime<Utc>> = audited.iter().map(|s| s.started_at).collect();
    let reached = assert_at_most_per_window(&times, 10, TimeDelta::seconds(1), "flaky");
    assert!(reached, "no second held 10 starts: {times:?}");
    // The budget was contended by retries: some second held 10 starts,
    // retries among them.
    let busy_with_retries = (9..audited.len()).any(|i| {
        audited[i].started_at - audited[i - 9].started_at < TimeDelta::seconds(1)
            && audited[i - 9..=i].iter().any(|s| s.runs > 1)
    });
    assert!(busy_with_retries, "no full second had a retry in it");

    // The workers ran exactly these attempts, each once.
    let mut logged: Vec<(i64, i32)> = workers
        .iter()
        .flat_map(attempt_log)
        .filter(|l| l.ended.is_none())
        .map(|l| (l.task_id, l.run))
        .collect();
    logged.sort_unstable();
    let mut claimed: Vec<(i64, i32)> = audited.iter().map(|s| (s.task_id, s.runs)).collect();
    claimed.sort_unstable();
    assert_eq!(logged, claimed, "attempts the workers ran vs claims");
    let errors: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.task_errors")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(errors, 40);
    let processes: BTreeSet<&str> = audited.iter().map(|s| s.worker.as_str()).collect();
    assert!(processes.len() >= 2, "one process took every start");
}

/// A dataset capped at 2 running tasks (by `syncq limit`), 20 `sleep`
/// tasks of 150–250 ms, three worker processes with one slot each (so
/// that reaching the cap takes two processes, and only the cap keeps the
/// third one out): the number of its `running` rows, sampled every few
/// milliseconds while they drain, is at most 2 — and 2 is reached, held
/// by two processes at once.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_concurrency_cap_is_reached_and_never_exceeded_across_three_worker_processes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    fleet_test(cap_across_processes(opts)).await;
}

async fn cap_across_processes(opts: PgConnectOptions) {
    let db = common::observer(&opts, OBSERVER, 6).await;
    install_audit(&db).await;
    let said = syncq(
        &opts,
        &["limit", "capped", "--concurrency", "2", "--create"],
    )
    .await;
    assert!(said.contains("concurrency 2"), "{said}");
    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind, payload)
         SELECT 'capped', 'sleep', jsonb_build_object('ms', 150 + (i % 3) * 50)
         FROM generate_series(1, 20) i",
    )
    .execute(&db)
    .await
    .unwrap();

    // One slot each: a process that holds both slots of the cap itself
    // keeps them (its own completions wake it first), which would leave
    // nothing for the cap to decide between processes.
    let args = [
        "--concurrency",
        "1",
        "--poll-interval",
        "20ms",
        "--exit-when-idle",
    ];
    let mut workers: Vec<WorkerProcess> = (0..3).map(|_| worker(&opts, &args)).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut samples = 0;
    let mut most = 0;
    let mut most_processes = 0;
    loop {
        let (running, holders, left): (i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'running'),
                    count(DISTINCT locked_by) FILTER (WHERE status = 'running'),
                    count(*) FILTER (WHERE status IN ('queued', 'running'))
             FROM syncq.tasks WHERE dataset_id = 'capped'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        samples += 1;
        assert!(
            running <= 2,
            "{running} tasks running at once (sample {samples})"
        );
        most = most.max(running);
        most_processes = most_processes.max(holders);
        if left == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the capped dataset did not drain within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_all_exit_0(&mut workers).await;

    assert_eq!(most, 2, "the cap is used, not only respected");
    assert_eq!(most_processes, 2, "two processes shared the cap at once");
    // 20 tasks of ~200 ms, two at a time: ~2 s of sampling, ~2 ms apart
    // on an idle machine; 50 samples (one per 40 ms) still see every
    // 150 ms task at least thrice on a loaded one.
    assert!(samples >= 50, "only {samples} samples");
    assert_eq!(
        count_where(
            &db,
            "SELECT count(*) FROM syncq.tasks WHERE dataset_id = $1 AND status = 'succeeded'",
            "capped",
        )
        .await,
        20
    );
    let audited = starts(&db, Some("capped")).await;
    assert_eq!(audited.len(), 20, "each task started once: {audited:?}");
}

/// Limits set on busy datasets hold from the moment they are set. Two
/// worker processes (16 slots each, prefetch on) drain two unlimited
/// datasets; once both are busy, an operator caps one at 3 running tasks
/// and limits the other to 50 starts per second, each in a transaction
/// that, before committing, lists the tasks started so far. Every start
/// after that (a task not on the list) respects the new setting: no start
/// of the capped dataset found 3 or more of its tasks running (its rows'
/// `started_at`..`finished_at`), no second held more than 50 new starts
/// of the other — and both limits were reached. A claim that read a
/// dataset as unlimited before the setting committed would show up here
/// as a start not on the list, past the cap or the rate.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_cap_and_a_rate_limit_set_on_busy_datasets_hold_from_that_moment(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    fleet_test(limits_set_on_busy_datasets(opts)).await;
}

/// Sets `set` on `dataset` in a transaction; returns the tasks of the
/// dataset started before the setting committed, and the database's clock
/// once it has: a task leased ahead whose handler began before then has
/// its start written a few milliseconds later, with that `started_at`.
async fn set_limit_listing_starts(
    db: &PgPool,
    dataset: &str,
    set: &'static str,
) -> (Vec<i64>, DateTime<Utc>) {
    let mut tx = db.begin().await.unwrap();
    let changed = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE syncq.datasets SET {set} WHERE dataset_id = $1"
    )))
    .bind(dataset)
    .execute(&mut *tx)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(changed, 1, "the busy dataset {dataset} has its row");
    let started: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM syncq.tasks WHERE dataset_id = $1 AND started_at IS NOT NULL",
    )
    .bind(dataset)
    .fetch_all(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    (started, db_now(db).await)
}

/// How soon after a limit commits every process applies it to the tasks
/// it leased ahead: they hear it by NOTIFY (syncq_dataset_held) within
/// milliseconds; SPEC §2 allows a second. Claims apply it at once.
const HEARD: TimeDelta = TimeDelta::milliseconds(100);

async fn limits_set_on_busy_datasets(opts: PgConnectOptions) {
    let db = common::observer(&opts, OBSERVER, 6).await;
    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind, payload)
         SELECT 'to-cap', 'sleep', '{\"ms\": 60}'::jsonb FROM generate_series(1, 200)
         UNION ALL
         SELECT 'to-rate', 'sleep', '{\"ms\": 30}' FROM generate_series(1, 300)",
    )
    .execute(&db)
    .await
    .unwrap();
    let args = [
        "--concurrency",
        "16",
        "--poll-interval",
        "20ms",
        "--exit-when-idle",
    ];
    let mut workers: Vec<WorkerProcess> = (0..2).map(|_| worker(&opts, &args)).collect();
    // Busy: several of the capped dataset's tasks running at once.
    common::wait_for("the datasets busy", WAIT, || {
        let db = db.clone();
        async move {
            count_where(
                &db,
                "SELECT count(*) FROM syncq.tasks WHERE dataset_id = $1 AND status = 'running'",
                "to-cap",
            )
            .await
                >= 6
        }
    })
    .await;
    let (before_cap, cap_at) = set_limit_listing_starts(&db, "to-cap", "max_concurrency = 3").await;
    let (before_rate, rate_at) = set_limit_listing_starts(
        &db,
        "to-rate",
        "rate_limit = 50, rate_window = interval '1 second'",
    )
    .await;
    assert!(
        before_rate.len() < 250,
        "the rate-limited dataset was nearly drained before its limit: {}",
        before_rate.len()
    );
    wait_all_exit_0(&mut workers).await;
    assert_eq!(
        count_where(
            &db,
            "SELECT count(*) FROM syncq.tasks WHERE dataset_id LIKE $1 AND status = 'succeeded'",
            "to-%",
        )
        .await,
        500,
        "every task succeeded"
    );

    // The cap: each later start, with the tasks running at that instant
    // (itself included), by the rows' own clock.
    let crowded: Vec<(i64, i64, f64)> = sqlx::query_as(
        "SELECT s.id, (SELECT count(*) FROM syncq.tasks r
                       WHERE r.dataset_id = 'to-cap' AND r.started_at <= s.started_at
                         AND r.finished_at > s.started_at),
                (extract(epoch FROM s.started_at - $2) * 1000)::float8
         FROM syncq.tasks s
         WHERE s.dataset_id = 'to-cap' AND NOT (s.id = ANY ($1)) AND s.started_at > $2 + $3",
    )
    .bind(&before_cap)
    .bind(cap_at)
    .bind(HEARD)
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(
        crowded.len() >= 100,
        "only {} starts after the cap",
        crowded.len()
    );
    let over: Vec<&(i64, i64, f64)> = crowded.iter().filter(|(_, n, _)| *n > 3).collect();
    assert!(over.is_empty(), "starts past the cap of 3: {over:?}");
    assert!(
        crowded.iter().any(|(_, n, _)| *n == 3),
        "the cap was never reached after it was set"
    );

    // The rate: the later starts, in every one-second window.
    let times: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT started_at FROM syncq.tasks
         WHERE dataset_id = 'to-rate' AND NOT (id = ANY ($1)) AND started_at > $2 + $3
         ORDER BY started_at",
    )
    .bind(&before_rate)
    .bind(rate_at)
    .bind(HEARD)
    .fetch_all(&db)
    .await
    .unwrap();
    assert!(
        times.len() >= 50,
        "only {} starts after the rate limit",
        times.len()
    );
    let reached = assert_at_most_per_window(&times, 50, TimeDelta::seconds(1), "to-rate");
    assert!(reached, "no second held 50 starts after the limit was set");
}

/// Three worker processes (one slot each) drain a dataset of 3,000 `noop`
/// tasks; 20 datasets of one task each are then inserted at once. Each of
/// them starts within one round: between the moment their insert was
/// committed and the last of them starting, the big dataset started at
/// most 4 tasks — the claims already past their choice of dataset when the
/// insert committed (one per process: 3) plus the big dataset's own turn
/// in the round (1 start at one slot). The big one still had a backlog.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn twenty_small_datasets_start_within_one_round_of_a_big_backlog_across_three_processes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    fleet_test(fairness_across_processes(opts)).await;
}

async fn fairness_across_processes(opts: PgConnectOptions) {
    let db = common::observer(&opts, OBSERVER, 6).await;
    install_audit(&db).await;
    // "a-big" sorts first: a turn order that fell back to names would
    // favour it.
    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind)
         SELECT 'a-big', 'noop' FROM generate_series(1, 3000)",
    )
    .execute(&db)
    .await
    .unwrap();
    // One task per claim (no local queue), so that a turn is one start and
    // the bound below counts claims. With a local queue a claim takes up
    // to its room, and the claims in flight at the insert's commit are
    // that much bigger (the lonely-dataset test in tests/weights.rs runs
    // with the defaults).
    let args = [
        "--concurrency",
        "1",
        "--prefetch",
        "0",
        "--poll-interval",
        "100ms",
    ];
    let _workers: Vec<WorkerProcess> = (0..3).map(|_| worker(&opts, &args)).collect();
    common::wait_for("three processes draining the big dataset", WAIT, || {
        let db = db.clone();
        async move {
            let (n, processes): (i64, i64) =
                sqlx::query_as("SELECT count(*), count(DISTINCT worker) FROM fleet_audit.starts")
                    .fetch_one(&db)
                    .await
                    .unwrap();
            n >= 150 && processes == 3
        }
    })
    .await;

    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind)
         SELECT 'z-small-' || lpad(i::text, 2, '0'), 'noop' FROM generate_series(1, 20) i",
    )
    .execute(&db)
    .await
    .unwrap();
    // Committed by now: counted from when the tasks could be seen.
    let visible = db_now(&db).await;
    common::wait_for("the 20 small datasets ran", WAIT, || {
        let db = db.clone();
        async move {
            common::count(&db, "dataset_id LIKE 'z-small-%' AND status = 'succeeded'").await == 20
        }
    })
    .await;

    let all = starts(&db, None).await;
    let small: Vec<&Start> = all
        .iter()
        .filter(|s| s.dataset_id.starts_with("z-small-"))
        .collect();
    assert_eq!(small.len(), 20, "each small task started once");
    let last_small = small.iter().map(|s| s.started_at).max().unwrap();
    let big_before = all
        .iter()
        .filter(|s| s.dataset_id == "a-big" && s.started_at <= last_small)
        .count();
    let big_meanwhile: Vec<DateTime<Utc>> = all
        .iter()
        .filter(|s| s.dataset_id == "a-big" && s.started_at > visible && s.started_at < last_small)
        .map(|s| s.started_at)
        .collect();
    assert!(
        big_meanwhile.len() <= 4,
        "the big dataset started {} tasks while the small ones waited (visible at {visible}, last small start {last_small}), the first: {:?}",
        big_meanwhile.len(),
        &big_meanwhile[..big_meanwhile.len().min(10)]
    );
    assert!(
        big_before < 2500,
        "the big dataset was nearly drained ({big_before} started) before the small ones ran: nothing was shown"
    );
}

/// A `fail` task reports an upstream rate limit (retry after 1.5 s) on a
/// dataset with 60 more tasks ready; three worker processes run it and a
/// second dataset. From the moment the throttle could be seen until
/// `throttled_until` — as the handler's report set it, 1.5 s after the
/// report — no task of the dataset started in any process, while the
/// other dataset's did; afterwards the dataset's tasks ran, the throttled
/// one's attempt uncounted.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn an_upstream_throttle_holds_back_every_process_until_it_ends(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    fleet_test(throttle_across_processes(opts)).await;
}

async fn throttle_across_processes(opts: PgConnectOptions) {
    let db = common::observer(&opts, OBSERVER, 6).await;
    install_audit(&db).await;
    // Lower priority value runs first: the throttle comes at the start,
    // with the rest of the dataset still queued.
    let throttler: i64 = sqlx::query_scalar(
        r#"INSERT INTO syncq.tasks (dataset_id, kind, payload, priority)
           VALUES ('upstream', 'fail', '{"error": "rate_limited", "times": 1, "retry_after_ms": 1500}', -1)
           RETURNING id"#,
    )
    .fetch_one(&db)
    .await
    .unwrap();
    sqlx::query(
        r#"INSERT INTO syncq.tasks (dataset_id, kind, payload)
           SELECT d, 'sleep', '{"ms": 50}'
           FROM unnest(ARRAY['upstream', 'elsewhere']) d, generate_series(1, 60) i
           WHERE d = 'upstream' OR i <= 30"#,
    )
    .execute(&db)
    .await
    .unwrap();

    // Watches for the throttle from before the workers start: the first
    // time it is seen, with the database's clock then (after the
    // throttle's commit) and how many tasks were waiting.
    let watcher = {
        let db = db.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                let seen: Option<(DateTime<Utc>, DateTime<Utc>, i64)> = sqlx::query_as(
                    "SELECT d.throttled_until, clock_timestamp(),
                            (SELECT count(*) FROM syncq.tasks t
                             WHERE t.dataset_id = d.dataset_id AND t.status = 'queued')
                     FROM syncq.datasets d
                     WHERE d.dataset_id = 'upstream' AND d.throttled_until IS NOT NULL",
                )
                .fetch_optional(&db)
                .await
                .unwrap();
                if let Some(seen) = seen {
                    return seen;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the dataset was not throttled within {WAIT:?}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let args = ["--concurrency", "2", "--poll-interval", "50ms"];
    let workers: Vec<WorkerProcess> = (0..3).map(|_| worker(&opts, &args)).collect();
    let (until, seen_at, waiting) = watcher.await.expect("the throttle watcher");
    wait_drained(&db, "upstream").await;
    wait_drained(&db, "elsewhere").await;
    drop(workers);

    // As set: 1.5 s after the report (its error row has the same clock).
    let reported: DateTime<Utc> =
        sqlx::query_scalar("SELECT at FROM syncq.task_errors WHERE task_id = $1")
            .bind(throttler)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(until - reported, TimeDelta::milliseconds(1500));
    let final_until: DateTime<Utc> = sqlx::query_scalar(
        "SELECT throttled_until FROM syncq.datasets WHERE dataset_id = 'upstream'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(final_until, until, "one throttle, set once");
    // Seen early enough for the window to say something: the watcher
    // polls every 2 ms and sees it within milliseconds; half a second of
    // the 1.5 s is left for a loaded machine's delays.
    assert!(
        until - seen_at >= TimeDelta::seconds(1),
        "the throttle was seen only at {seen_at}, it ends at {until}"
    );
    assert!(waiting > 0, "nothing was waiting while throttled");

    let all = starts(&db, None).await;
    let during: Vec<&Start> = all
        .iter()
        .filter(|s| s.started_at >= seen_at && s.started_at < until)
        .collect();
    let upstream_during: Vec<&&Start> = during
        .iter()
        .filter(|s| s.dataset_id == "upstream")
        .collect();
    assert!(
        upstream_during.is_empty(),
        "started while throttled (seen {seen_at}, until {until}): {upstream_during:?}"
    );
    assert!(
        during.iter().any(|s| s.dataset_id == "elsewhere"),
        "the other dataset should have run meanwhile: {all:?}"
    );
    let after: Vec<&Start> = all
        .iter()
        .filter(|s| s.dataset_id == "upstream" && s.started_at >= until)
        .collect();
    // Every task of the dataset that had not started when the throttle
    // was seen started after it (the `queued` count the watcher read also
    // holds tasks leased ahead whose handler had just begun: their start
    // is written within milliseconds, with its `started_at`).
    let upstream: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM syncq.tasks WHERE dataset_id = 'upstream'")
            .fetch_all(&db)
            .await
            .unwrap();
    let before: BTreeSet<i64> = all
        .iter()
        .filter(|s| s.dataset_id == "upstream" && s.started_at < seen_at && s.task_id != throttler)
        .map(|s| s.task_id)
        .collect();
    let started_after: BTreeSet<i64> = after.iter().map(|s| s.task_id).collect();
    let not_yet: Vec<i64> = upstream
        .iter()
        .copied()
        .filter(|id| !before.contains(id))
        .collect();
    assert!(
        !not_yet.is_empty(),
        "every task had started when the throttle was seen ({waiting} queued)"
    );
    let missing: Vec<&i64> = not_yet
        .iter()
        .filter(|id| !started_after.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "waiting when the throttle was seen, and not started after it: {missing:?}"
    );
    let processes: BTreeSet<&str> = after.iter().map(|s| s.worker.as_str()).collect();
    assert!(
        processes.len() >= 2,
        "one process ran the rest: {processes:?}"
    );

    let row = common::task(&db, throttler).await;
    assert_eq!(
        (row.status.as_str(), row.attempts, row.runs),
        ("succeeded", 1, 2),
        "the throttled attempt is not counted"
    );
    assert_eq!(
        count_where(
            &db,
            "SELECT count(*) FROM syncq.tasks WHERE dataset_id = $1 AND status = 'succeeded'",
            "upstream",
        )
        .await,
        61
    );
}

// ---------------------------------------------------------------------
// §4: leases, fencing, checkpoints with real processes.
// ---------------------------------------------------------------------

/// The fields of a task row a late write could change.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
struct Held {
    status: String,
    attempts: i32,
    runs: i32,
    locked_by: Option<String>,
    lease_expires_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    checkpoint: Option<Value>,
    result: Option<Value>,
    last_error: Option<String>,
    errors: i64,
}

async fn held(db: &PgPool, id: i64) -> Held {
    sqlx::query_as(
        "SELECT status::text AS status, attempts, runs, locked_by, lease_expires_at,
                started_at, finished_at, checkpoint, result, last_error,
                (SELECT count(*) FROM syncq.task_errors e WHERE e.task_id = t.id) AS errors
         FROM syncq.tasks t WHERE id = $1",
    )
    .bind(id)
    .fetch_one(db)
    .await
    .expect("the task row")
}

/// Worker A (lease 1 s) runs a 1.5 s `sleep` task and is stopped
/// (SIGSTOP) past its lease; worker B rescues and claims it, and is then
/// stopped too (its 10 s lease holds), so that the row stays B's while A
/// wakes up: A's handler has finished by then, and its late outcome —
/// written once A's attempt log says the attempt ended — changes nothing
/// in the row (status, runs, attempts, holder, lease, result, errors).
/// B, resumed, finishes it: succeeded, 2 attempts, B's result.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_worker_stopped_past_its_lease_cannot_overwrite_the_rescuers_hold(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    fleet_test(stopped_past_lease(opts)).await;
}

async fn stopped_past_lease(opts: PgConnectOptions) {
    let db = common::observer(&opts, OBSERVER, 6).await;
    install_audit(&db).await;
    let a = worker(
        &opts,
        &[
            "--concurrency",
            "1",
            "--lease",
            "1s",
            "--heartbeat",
            "200ms",
            "--rescue-interval",
            "200ms",
            "--poll-interval",
            "50ms",
        ],
    );
    let id = common::insert(&db, "d", "sleep", json!({"ms": 1500})).await;
    common::wait_for("A runs the task", WAIT, || {
        let db = db.clone();
        let ran = started_here(&a, id, 1);
        async move { ran && common::status(&db, id).await == "running" }
    })
    .await;
    a.signal("-STOP").await;
    let a_id = common::task(&db, id).await.locked_by.expect("A holds it");

    let b = worker(
        &opts,
        &[
            "--concurrency",
            "1",
            "--lease",
            "10s",
            "--heartbeat",
            "1s",
            "--rescue-interval",
            "100ms",
            "--poll-interval",
            "50ms",
        ],
    );
    // Its row says so (the start of a task leased ahead is written within
    // milliseconds of its handler's).
    common::wait_for("B rescued the task and runs it", WAIT, || {
        let db = db.clone();
        let ran = started_here(&b, id, 2);
        async move {
            let row = common::task(&db, id).await;
            ran && row.runs == 2 && row.status == "running"
        }
    })
    .await;
    b.signal("-STOP").await;
    let b_row = common::task(&db, id).await;
    let b_id = b_row.locked_by.clone().expect("B holds it");
    assert_ne!(a_id, b_id);
    assert_eq!((b_row.status.as_str(), b_row.attempts), ("running", 2));

    // A's handler sleeps 1.5 s from its start: let that pass while A is
    // stopped, so that A wakes to a handler that succeeded and writes it.
    let a_started = starts(&db, None).await[0].started_at;
    common::wait_for("A's handler is due", WAIT, || {
        let db = db.clone();
        async move { db_now(&db).await > a_started + TimeDelta::milliseconds(1700) }
    })
    .await;
    let before = held(&db, id).await;
    a.signal("-CONT").await;
    common::wait_for("A's attempt ended", WAIT, || {
        let ended = ended_here(&a, id, 1).is_some();
        async move { ended }
    })
    .await;
    let (outcome, recorded) = ended_here(&a, id, 1).unwrap();
    assert!(
        !recorded,
        "A's outcome ({outcome}) was written:\n{}",
        a.log()
    );
    assert_eq!(
        held(&db, id).await,
        before,
        "A's late write changed the row"
    );

    b.signal("-CONT").await;
    common::wait_status(&db, id, "succeeded").await;
    let row = common::task(&db, id).await;
    assert_eq!((row.attempts, row.runs), (2, 2));
    assert_eq!(row.result, Some(json!({"slept_ms": 1500})));
    common::wait_for("B's attempt ended", WAIT, || {
        let ended = ended_here(&b, id, 2).is_some();
        async move { ended }
    })
    .await;
    assert_eq!(ended_here(&b, id, 2), Some(("Succeeded".to_string(), true)));
    let errors: Vec<(i32, Option<String>, String)> = sqlx::query_as(
        "SELECT attempt, worker_id, error FROM syncq.task_errors WHERE task_id = $1",
    )
    .bind(id)
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (errors[0].0, errors[0].1.as_deref()),
        (1, Some(a_id.as_str()))
    );
    assert!(errors[0].2.contains("lease expired"), "{errors:?}");
    let audited: Vec<(i32, String)> = starts(&db, None)
        .await
        .into_iter()
        .map(|s| (s.runs, s.worker))
        .collect();
    assert_eq!(audited, vec![(1, a_id), (2, b_id)]);
}

/// A `count` task (to 60, 50 ms a step) goes through three processes:
/// A is killed with SIGKILL mid-way; once its lease (1 s) expires, B
/// rescues the task (the attempt counts) and resumes from exactly A's
/// last checkpoint; B gets SIGTERM, saves, hands it back uncounted and
/// exits 0; C resumes from exactly B's checkpoint and finishes it. The
/// checkpoints written, run by run, are 1..=60 with no step lost or
/// repeated.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn kill_9_then_sigterm_each_next_process_resumes_from_exactly_the_saved_checkpoint(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    fleet_test(rescue_and_resume(opts)).await;
}

async fn rescue_and_resume(opts: PgConnectOptions) {
    let db = common::observer(&opts, OBSERVER, 6).await;
    install_audit(&db).await;
    let id = common::insert(&db, "d", "count", json!({"to": 60, "step_ms": 50})).await;
    let mut a = worker(
        &opts,
        &[
            "--concurrency",
            "1",
            "--lease",
            "1s",
            "--heartbeat",
            "200ms",
        ],
    );
    common::wait_for("A made progress", WAIT, || {
        let db = db.clone();
        async move { common::counted(&db, id).await >= 5 }
    })
    .await;
    a.signal("-KILL").await;
    a.wait_exit(WAIT).await;
    common::wait_sessions_gone(&db, OBSERVER).await;
    let saved_a = common::counted(&db, id).await;
    let row = common::task(&db, id).await;
    assert_eq!(
        (row.status.as_str(), row.runs),
        ("running", 1),
        "nobody released it"
    );
    let a_id = row.locked_by.expect("A holds it");

    let mut b = worker(
        &opts,
        &[
            "--concurrency",
            "1",
            "--lease",
            "10s",
            "--heartbeat",
            "1s",
            "--rescue-interval",
            "100ms",
        ],
    );
    common::wait_for("B rescued the task and made progress", WAIT, || {
        let db = db.clone();
        async move {
            common::task(&db, id).await.runs == 2 && common::counted(&db, id).await >= saved_a + 5
        }
    })
    .await;
    b.signal("-TERM").await;
    let status = b.wait_exit(WAIT).await;
    assert_eq!(status.code(), Some(0), "{}", b.log());
    let saved_b = common::counted(&db, id).await;
    let row = common::task(&db, id).await;
    assert_eq!(
        (row.status.as_str(), row.attempts, row.locked_by),
        ("queued", 1, None),
        "the killed attempt counts, the checkpointed one does not"
    );
    assert!(saved_b < 60, "B finished before it was stopped");

    let mut c = worker(&opts, &["--concurrency", "1", "--exit-when-idle"]);
    let status = c.wait_exit(WAIT).await;
    assert!(status.success(), "{}", c.log());
    let row = common::task(&db, id).await;
    assert_eq!(
        (row.status.as_str(), row.attempts, row.runs),
        ("succeeded", 2, 3)
    );
    assert_eq!(
        row.result,
        Some(json!({"counted": 60, "resumed_from": saved_b}))
    );

    // Run by run, every step once: A to saved_a, B on to saved_b, C on.
    let written = checkpoints(&db, id).await;
    let steps: Vec<(i32, u64)> = written
        .iter()
        .map(|(runs, c)| (*runs, c["counted"].as_u64().expect("counted")))
        .collect();
    let expected: Vec<(i32, u64)> = (1..=60)
        .map(|n| {
            let run = if n <= saved_a {
                1
            } else if n <= saved_b {
                2
            } else {
                3
            };
            (run, n)
        })
        .collect();
    assert_eq!(steps, expected, "saved_a {saved_a}, saved_b {saved_b}");
    let errors: Vec<(i32, Option<String>, String)> = sqlx::query_as(
        "SELECT attempt, worker_id, error FROM syncq.task_errors WHERE task_id = $1",
    )
    .bind(id)
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (errors[0].0, errors[0].1.as_deref()),
        (1, Some(a_id.as_str()))
    );
    assert!(errors[0].2.contains("lease expired"), "{errors:?}");
}

/// Worker A (4 slots, a 30 s grace) runs two long `sleep` tasks and a
/// long `count` task; worker B runs a `sleep` task of another dataset.
/// A `fail` task with a Fatal error then reaches A: A's other handlers
/// hear **checkpoint** — the `sleep` handlers, which save a checkpoint
/// only when told to, each store their own time left — every task of A
/// goes back to `queued` uncounted, and A exits 1 long before its grace
/// would have run out. B's task, in another process, runs on untouched.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_fatal_error_checkpoints_the_other_handlers_of_its_process_only(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    fleet_test(fatal_checkpoints_its_process(opts)).await;
}

/// How long A may take to stop after the Fatal task is inserted: the
/// claim (woken by NOTIFY), the handlers' checkpoints and releases take
/// milliseconds; 10 s leaves room for a loaded 2-core machine while still
/// far below the 30 s grace that handlers not told to checkpoint would
/// have used (and below the 60 s the sleeps would take).
const FATAL_STOP_WITHIN: Duration = Duration::from_secs(10);

async fn fatal_checkpoints_its_process(opts: PgConnectOptions) {
    let db = common::observer(&opts, OBSERVER, 6).await;
    let mut a = worker(
        &opts,
        &[
            "--concurrency",
            "4",
            "--grace",
            "30s",
            "--datasets",
            "main",
            "--poll-interval",
            "50ms",
        ],
    );
    let b = worker(
        &opts,
        &[
            "--concurrency",
            "1",
            "--datasets",
            "other",
            "--grace",
            "30s",
        ],
    );
    let sleeps = [
        common::insert(&db, "main", "sleep", json!({"ms": 60000})).await,
        common::insert(&db, "main", "sleep", json!({"ms": 60000})).await,
    ];
    let count = common::insert(&db, "main", "count", json!({"to": 100000, "step_ms": 20})).await;
    let other = common::insert(&db, "other", "sleep", json!({"ms": 60000})).await;
    common::wait_for("every handler runs", WAIT, || {
        let db = db.clone();
        let ran = sleeps
            .iter()
            .chain([&count])
            .all(|id| started_here(&a, *id, 1))
            && started_here(&b, other, 1);
        async move { ran && common::counted(&db, count).await >= 1 }
    })
    .await;

    let fatal = common::insert(&db, "main", "fail", json!({"error": "fatal", "times": 1})).await;
    let status = a.wait_exit(FATAL_STOP_WITHIN).await;
    assert_eq!(status.code(), Some(1), "{}", a.log());
    let log = a.log();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!("syncq: error: task {fatal}")) && last.contains("fatal"),
        "{log}"
    );

    for id in sleeps {
        let row = common::task(&db, id).await;
        assert_eq!(
            (row.status.as_str(), row.attempts, row.locked_by.as_deref()),
            ("queued", 0, None)
        );
        let left = row
            .checkpoint
            .as_ref()
            .and_then(|c| c["remaining_ms"].as_u64())
            .unwrap_or_else(|| panic!("task {id} saved no checkpoint: {row:?}"));
        assert!(left > 0 && left < 60000, "task {id}: {left} ms left");
    }
    let row = common::task(&db, count).await;
    assert_eq!((row.status.as_str(), row.attempts), ("queued", 0));
    assert!(common::counted(&db, count).await >= 1);
    let row = common::task(&db, fatal).await;
    assert_eq!((row.status.as_str(), row.attempts), ("queued", 0));
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("fatal")),
        "{row:?}"
    );
    // Each of A's handlers ended released and written.
    for id in sleeps.into_iter().chain([count, fatal]) {
        assert_eq!(
            ended_here(&a, id, 1),
            Some(("Released".to_string(), true)),
            "task {id}:\n{log}"
        );
    }

    // B heard nothing: its task still runs, in its name, with no checkpoint.
    let row = common::task(&db, other).await;
    assert_eq!(row.status, "running");
    assert!(
        row.locked_by.is_some() && row.checkpoint.is_none(),
        "{row:?}"
    );
    assert!(ended_here(&b, other, 1).is_none(), "{}", b.log());
    assert!(!b.log().contains("checkpoint"), "{}", b.log());
}
