//! Drains: the raw SKIP LOCKED ceiling, then real `syncq worker` processes
//! draining one dataset, 1,000 datasets half rate-limited, and the scale
//! runs (10,000 datasets; 1,000,000 queued).

use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{Executor, PgPool};

use super::{BenchArgs, Figures, bench_error, rate, reset, timed};
use crate::cli::CliError;

/// The practical ceiling: claim k rows with SKIP LOCKED, complete them.
/// Returns the rate, the baseline of the drains.
pub(super) async fn baseline(
    db: &PgPool,
    args: &BenchArgs,
    figures: &mut Figures,
) -> Result<f64, CliError> {
    reset(db).await?;
    sqlx::query("INSERT INTO bench_raw (payload) SELECT '{}' FROM generate_series(1, $1)")
        .bind(i64::from(args.tasks))
        .execute(db)
        .await
        .map_err(bench_error("baseline rows"))?;
    db.execute("VACUUM ANALYZE bench_raw")
        .await
        .map_err(bench_error("vacuum"))?;
    let workers = (args.processes * 2).clamp(2, 16);
    let k = i64::from(args.concurrency.clamp(1, 1000));
    let before = writes(db).await?;
    let baseline = rate(
        args.tasks,
        timed(async {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..workers {
                let db = db.clone();
                set.spawn(async move {
                    loop {
                        let ids: Vec<i64> = sqlx::query_scalar(
                            "UPDATE bench_raw SET status = 'running' WHERE id IN (
                             SELECT id FROM bench_raw WHERE status = 'queued'
                             ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                         RETURNING id",
                        )
                        .bind(k)
                        .fetch_all(&db)
                        .await?;
                        if ids.is_empty() {
                            return Ok::<_, sqlx::Error>(());
                        }
                        sqlx::query("UPDATE bench_raw SET status = 'done' WHERE id = ANY ($1)")
                            .bind(&ids)
                            .execute(&db)
                            .await?;
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                r.map_err(|e| sqlx::Error::Protocol(e.to_string()))??;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("baseline drain"))?,
    );
    figures.add(
        &format!("baseline: raw SKIP LOCKED claim+complete, {workers} conns x {k}"),
        baseline,
        "rows/s",
        None,
    );
    writes(db)
        .await?
        .since(&before, args.tasks, "baseline", figures);
    Ok(baseline)
}

/// The drains by worker processes, each beside `baseline`.
pub(super) async fn measure(
    db: &PgPool,
    scratch: &PgConnectOptions,
    args: &BenchArgs,
    figures: &mut Figures,
    baseline: f64,
) -> Result<(), CliError> {
    let base = Some(("raw claim+complete", baseline));
    reset(db).await?;
    let before = writes(db).await?;
    let plain = drain(db, scratch, args, args.tasks, 1, false).await?;
    figures.add("drain: noop, 1 dataset", plain, "tasks/s", base);
    writes(db)
        .await?
        .since(&before, args.tasks, "drain", figures);
    reset(db).await?;
    let before = writes(db).await?;
    let fair = drain(db, scratch, args, args.tasks, 1000, true).await?;
    figures.add(
        "fair drain: 1,000 datasets, half rate-limited",
        fair,
        "tasks/s",
        base,
    );
    writes(db)
        .await?
        .since(&before, args.tasks, "fair drain", figures);
    figures.add("fair drain / drain", fair / plain.max(1.0), "ratio", None);
    reset(db).await?;
    let retried = drain_of(db, scratch, args, Work::FailTwice).await?;
    figures.add(
        "drain: each task fails twice (retried, then failed)",
        retried,
        "tasks/s",
        Some(("drain, 1 dataset", plain)),
    );
    if !args.no_scale {
        reset(db).await?;
        let many = drain(db, scratch, args, args.tasks, 10_000, false).await?;
        figures.add(
            "scale: drain over 10,000 datasets",
            many,
            "tasks/s",
            Some(("drain, 1 dataset", plain)),
        );
        reset(db).await?;
        let deep = drain(db, scratch, args, 1_000_000, 1, false).await?;
        figures.add(
            "scale: drain with 1,000,000 queued",
            deep,
            "tasks/s",
            Some(("drain, 1 dataset", plain)),
        );
    }
    Ok(())
}

/// Where the server's write-ahead log is and the next transaction id: two
/// readings around a drain give its WAL bytes and write transactions (as
/// the peers' bench counts them: xids assigned).
struct Writes {
    wal: i64,
    xid: i64,
}

async fn writes(db: &PgPool) -> Result<Writes, CliError> {
    let (wal, xid): (i64, i64) =
        sqlx::query_as("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8, txid_current()::int8")
            .fetch_one(db)
            .await
            .map_err(bench_error("cannot read the WAL position"))?;
    Ok(Writes { wal, xid })
}

impl Writes {
    /// Adds what was written since `before`, per task of `tasks`. Every
    /// process on the server counts (the bench runs alone on a quiet
    /// one); the reading's own transaction is left out.
    fn since(&self, before: &Writes, tasks: u32, what: &str, figures: &mut Figures) {
        let n = f64::from(tasks.max(1));
        figures.add(
            &format!("{what}: WAL per task"),
            (self.wal - before.wal) as f64 / n,
            "bytes",
            None,
        );
        figures.add(
            &format!("{what}: write transactions per task"),
            (self.xid - before.xid - 1) as f64 / n,
            "xacts",
            None,
        );
    }
}

pub(super) fn worker_command(
    scratch: &PgConnectOptions,
    concurrency: u32,
) -> Result<tokio::process::Command, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Runtime(format!("bench: cannot find the syncq binary: {e}")))?;
    let url = format!(
        "postgres://{}@{}:{}/{}",
        scratch.get_username(),
        scratch.get_host(),
        scratch.get_port(),
        scratch.get_database().unwrap_or_default()
    );
    let mut cmd = tokio::process::Command::new(exe);
    cmd.env("DATABASE_URL", url)
        .env("RUST_LOG", "syncq=error")
        .args(["worker", "--concurrency", &concurrency.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    Ok(cmd)
}

/// What the tasks of a drain do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// `noop`: succeed at once.
    Noop,
    /// `fail` with `{"error": "retryable"}` and `max_attempts = 2`: a
    /// counted failure, retried at once (the workers run with `--backoff
    /// 0s`), then a failure that ends it — two attempts and two outcomes
    /// per task, both failures. (Not `"times": 1`, which then succeeds: it
    /// saves a checkpoint per attempt, one connection per running handler,
    /// and a pool of 500 slots then measures waiting for connections.)
    FailTwice,
}

async fn drain(
    db: &PgPool,
    scratch: &PgConnectOptions,
    args: &BenchArgs,
    queued: u32,
    datasets: u32,
    limited: bool,
) -> Result<f64, CliError> {
    drain_over(db, scratch, args, queued, datasets, limited, Work::Noop).await
}

async fn drain_of(
    db: &PgPool,
    scratch: &PgConnectOptions,
    args: &BenchArgs,
    work: Work,
) -> Result<f64, CliError> {
    drain_over(db, scratch, args, args.tasks, 1, false, work).await
}

/// Queues `queued` tasks over `datasets` (half rate-limited far above
/// what they can use, when `limited`), lets the worker processes run
/// `args.tasks` of them, and returns tasks/s from the database's clock.
async fn drain_over(
    db: &PgPool,
    scratch: &PgConnectOptions,
    args: &BenchArgs,
    queued: u32,
    datasets: u32,
    limited: bool,
    work: Work,
) -> Result<f64, CliError> {
    // What each task runs, its max_attempts, and how every task ends.
    let (kind, payload, attempts, ends) = match work {
        Work::Noop => ("noop", "{}", 1, "succeeded"),
        Work::FailTwice => ("fail", r#"{"error": "retryable"}"#, 2, "failed"),
    };
    let max_attempts = if ends == "failed" { attempts } else { 5 };
    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind, payload, max_attempts)
         SELECT 'bench-' || (i % $2), $3, $4::jsonb, $5 FROM generate_series(1, $1) i",
    )
    .bind(i64::from(queued))
    .bind(i64::from(datasets))
    .bind(kind)
    .bind(payload)
    .bind(max_attempts)
    .execute(db)
    .await
    .map_err(bench_error("cannot queue tasks"))?;
    if limited {
        sqlx::query(
            "UPDATE syncq.datasets SET rate_limit = 100000, rate_window = interval '1 second'
             WHERE right(dataset_id, 1) IN ('0', '2', '4', '6', '8')",
        )
        .execute(db)
        .await
        .map_err(bench_error("cannot set limits"))?;
    }
    for table in [
        "VACUUM ANALYZE syncq.tasks",
        "VACUUM ANALYZE syncq.datasets",
    ] {
        db.execute(table).await.map_err(bench_error("vacuum"))?;
    }
    let all = queued == args.tasks;
    let mut children = Vec::new();
    for _ in 0..args.processes {
        let mut cmd = worker_command(scratch, args.concurrency)?;
        if all {
            cmd.arg("--exit-when-idle");
        }
        if work == Work::FailTwice {
            cmd.args(["--backoff", "0s"]);
        }
        children.push(
            cmd.spawn()
                .map_err(|e| CliError::Runtime(format!("bench: cannot start a worker: {e}")))?,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM syncq.tasks WHERE status::text = $1")
                .bind(ends)
                .fetch_one(db)
                .await
                .map_err(bench_error("cannot count"))?;
        let exited = children
            .iter_mut()
            .all(|c| matches!(c.try_wait(), Ok(Some(_))));
        if done >= i64::from(args.tasks) || exited || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for child in &mut children {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    let (n, secs, bad): (i64, Option<f64>, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status::text = $2),
                extract(epoch FROM max(finished_at) - min(started_at))::float8,
                count(*) FILTER (WHERE status IN ('succeeded', 'failed')
                                   AND (status::text <> $2 OR attempts <> $1))
         FROM syncq.tasks",
    )
    .bind(attempts)
    .bind(ends)
    .fetch_one(db)
    .await
    .map_err(bench_error("cannot read the drain"))?;
    if bad > 0 || n < i64::from(args.tasks.min(queued)) {
        return Err(CliError::Runtime(format!(
            "bench: drain check failed: {n} {ends}, {bad} not {ends} after {attempts} attempt(s)"
        )));
    }
    Ok(n as f64 / secs.unwrap_or(f64::INFINITY).max(1e-9))
}
