//! `syncq bench`: enqueue, drain, latency and scale figures, each beside a
//! raw-SQL baseline measured in the same run (this machine is shared and
//! noisy, so ratios mean more than absolute rates).
//!
//! Everything runs in a scratch database `syncq_bench_<pid>` on the
//! `DATABASE_URL` server, created and dropped by the command. Drains use
//! real `syncq worker` processes (this binary); rates come from the
//! database's own `started_at` / `finished_at`, and every drain is checked
//! by SQL (all succeeded, `attempts = 1`).

use std::io::Write;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgPool};

use super::{CliError, describe, io_error};
use crate::{NewTask, TaskQueueManager};

/// `syncq bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Tasks per drain.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(100..=10_000_000))]
    pub tasks: u32,
    /// Worker processes per drain.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub processes: u32,
    /// Slots per worker process.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Skip the scale runs (1,000,000 queued; 10,000 datasets).
    #[arg(long)]
    pub no_scale: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Figure {
    name: String,
    value: f64,
    unit: &'static str,
    /// The baseline this figure is compared with, and the ratio.
    baseline: Option<String>,
    ratio: Option<f64>,
}

fn bench_error(what: &str) -> impl Fn(sqlx::Error) -> CliError + '_ {
    move |e| CliError::Runtime(format!("bench: {what}: {}", describe(&e)))
}

pub(super) async fn run(
    options: &PgConnectOptions,
    args: BenchArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let name = format!("syncq_bench_{}", std::process::id());
    let admin = options.clone().database("postgres");
    let mut conn = admin
        .connect()
        .await
        .map_err(|e| super::connect_error(&admin, &e))?;
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .await
        .map_err(bench_error("cannot create the scratch database"))?;
    let scratch = options.clone().database(&name);
    let result = measure(&scratch, &args).await;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .await
    .map_err(bench_error("cannot drop the scratch database"))?;
    let _ = conn.close().await;
    let figures = result?;
    if args.json {
        return writeln!(out, "{:#}", json!({ "figures": figures })).map_err(io_error);
    }
    let mut text = format!(
        "syncq bench: {} tasks per drain, {} processes x {}\n\n{:<52} {:>12}  {:<8} {}\n",
        args.tasks,
        args.processes,
        args.concurrency,
        "measure",
        "value",
        "unit",
        "ratio to baseline"
    );
    for f in &figures {
        let ratio = match (&f.baseline, f.ratio) {
            (Some(b), Some(r)) => format!("{r:.2}x {b}"),
            _ => String::new(),
        };
        text.push_str(&format!(
            "{:<52} {:>12.2}  {:<8} {}\n",
            f.name, f.value, f.unit, ratio
        ));
    }
    write!(out, "{text}").map_err(io_error)
}

async fn measure(scratch: &PgConnectOptions, args: &BenchArgs) -> Result<Vec<Figure>, CliError> {
    let db = PgPoolOptions::new()
        .max_connections(args.concurrency.clamp(4, 64) + 2)
        .connect_with(scratch.clone())
        .await
        .map_err(bench_error("cannot connect to the scratch database"))?;
    crate::migrate(&db).await?;
    db.execute(
        "CREATE TABLE bench_raw (id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'queued',
                                 payload jsonb NOT NULL DEFAULT '{}');
         CREATE INDEX bench_raw_queued ON bench_raw (id) WHERE status = 'queued';
         CREATE TABLE bench_same (LIKE syncq.tasks INCLUDING ALL);",
    )
    .await
    .map_err(bench_error("cannot create the baseline table"))?;
    let mut figures = Vec::new();
    let mut add = |name: &str, value: f64, unit: &'static str, baseline: Option<(&str, f64)>| {
        figures.push(Figure {
            name: name.to_string(),
            value,
            unit,
            baseline: baseline.map(|(b, _)| b.to_string()),
            ratio: baseline.map(|(_, v)| if v > 0.0 { value / v } else { 0.0 }),
        });
    };

    // Enqueue.
    let single = 2_000u32;
    let raw_single = rate(
        single,
        timed(async {
            for _ in 0..single {
                sqlx::query("INSERT INTO bench_raw (payload) VALUES ('{}')")
                    .execute(&db)
                    .await?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("baseline insert"))?,
    );
    add(
        "baseline: raw single-row INSERT, 1 connection",
        raw_single,
        "rows/s",
        None,
    );
    let manager = TaskQueueManager::new(db.clone());
    let api_single = rate(
        single,
        timed(async {
            for _ in 0..single {
                manager
                    .enqueue(NewTask::new("bench", "noop"))
                    .await
                    .map_err(to_sqlx)?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("single enqueue"))?,
    );
    add(
        "enqueue: API, one task per call",
        api_single,
        "tasks/s",
        Some(("raw single-row INSERT", raw_single)),
    );
    let batches = 20u32;
    let api_batch = rate(
        batches * 1000,
        timed(async {
            for _ in 0..batches {
                manager
                    .enqueue_many((0..1000).map(|_| NewTask::new("bench", "noop")))
                    .await
                    .map_err(to_sqlx)?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("batch enqueue"))?,
    );
    let raw_batch = rate(
        batches * 1000,
        timed(async {
            for _ in 0..batches {
                sqlx::query(
                    "INSERT INTO bench_raw (payload) SELECT '{}' FROM generate_series(1, 1000)",
                )
                .execute(&db)
                .await?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("baseline batch insert"))?,
    );
    add("baseline: raw 1,000-row INSERT", raw_batch, "rows/s", None);
    add(
        "enqueue: API, 1,000 tasks per call",
        api_batch,
        "tasks/s",
        Some(("raw 1,000-row INSERT", raw_batch)),
    );
    // Plain SQL into syncq.tasks against the same INSERT into a copy of
    // the table without its triggers (same columns, defaults, constraints
    // and indexes): what the insert trigger costs. Alternated batch by
    // batch, so both see the same machine.
    let mut sql_took = Duration::ZERO;
    let mut same_took = Duration::ZERO;
    for _ in 0..batches {
        for (table, took) in [
            ("syncq.tasks", &mut sql_took),
            ("bench_same", &mut same_took),
        ] {
            let statement = format!(
                "INSERT INTO {table} (dataset_id, kind) SELECT 'bench', 'noop' FROM generate_series(1, 1000)"
            );
            *took += timed(async {
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(&db)
                    .await
                    .map(|_| ())
            })
            .await
            .map_err(bench_error("SQL enqueue"))?;
        }
    }
    let sql_batch = rate(batches * 1000, sql_took);
    let same_batch = rate(batches * 1000, same_took);
    add(
        "baseline: 1,000-row INSERT, tasks' copy without triggers",
        same_batch,
        "rows/s",
        None,
    );
    add(
        "enqueue: plain SQL, 1,000-row INSERT",
        sql_batch,
        "tasks/s",
        Some(("the copy without triggers", same_batch)),
    );

    let bulk_calls = 5u32;
    let api_bulk = rate(
        bulk_calls * 10_000,
        timed(async {
            for _ in 0..bulk_calls {
                manager
                    .enqueue_bulk((0..10_000).map(|_| NewTask::new("bench", "noop")))
                    .await
                    .map_err(to_sqlx)?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("bulk enqueue"))?,
    );
    let raw_copy = rate(
        bulk_calls * 10_000,
        timed(async {
            let rows = "{}\n".repeat(10_000);
            for _ in 0..bulk_calls {
                let mut conn = db.acquire().await?;
                let mut copy = conn
                    .copy_in_raw("COPY bench_raw (payload) FROM STDIN")
                    .await?;
                copy.send(rows.as_bytes()).await?;
                copy.finish().await?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("baseline COPY"))?,
    );
    add("baseline: raw COPY, 10,000 rows", raw_copy, "rows/s", None);
    add(
        "enqueue: API COPY (enqueue_bulk), 10,000 per call",
        api_bulk,
        "tasks/s",
        Some(("raw COPY", raw_copy)),
    );

    // The practical ceiling: claim k rows with SKIP LOCKED, complete them.
    reset(&db).await?;
    sqlx::query("INSERT INTO bench_raw (payload) SELECT '{}' FROM generate_series(1, $1)")
        .bind(i64::from(args.tasks))
        .execute(&db)
        .await
        .map_err(bench_error("baseline rows"))?;
    db.execute("VACUUM ANALYZE bench_raw")
        .await
        .map_err(bench_error("vacuum"))?;
    let workers = (args.processes * 2).clamp(2, 16);
    let k = i64::from(args.concurrency.clamp(1, 1000));
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
    add(
        &format!("baseline: raw SKIP LOCKED claim+complete, {workers} conns x {k}"),
        baseline,
        "rows/s",
        None,
    );
    let base = Some(("raw claim+complete", baseline));

    // Drains by worker processes.
    reset(&db).await?;
    let plain = drain(&db, scratch, args, args.tasks, 1, false).await?;
    add("drain: noop, 1 dataset", plain, "tasks/s", base);
    reset(&db).await?;
    let fair = drain(&db, scratch, args, args.tasks, 1000, true).await?;
    add(
        "fair drain: 1,000 datasets, half rate-limited",
        fair,
        "tasks/s",
        base,
    );
    add("fair drain / drain", fair / plain.max(1.0), "ratio", None);
    if !args.no_scale {
        reset(&db).await?;
        let many = drain(&db, scratch, args, args.tasks, 10_000, false).await?;
        add(
            "scale: drain over 10,000 datasets",
            many,
            "tasks/s",
            Some(("drain, 1 dataset", plain)),
        );
        reset(&db).await?;
        let deep = drain(&db, scratch, args, 1_000_000, 1, false).await?;
        add(
            "scale: drain with 1,000,000 queued",
            deep,
            "tasks/s",
            Some(("drain, 1 dataset", plain)),
        );
    }

    // Latency of an idle worker.
    reset(&db).await?;
    let (p50, p95, p99) = latency(&db, scratch).await?;
    add("latency: insert->start p50 (idle worker)", p50, "ms", None);
    add("latency: insert->start p95", p95, "ms", None);
    add("latency: insert->start p99", p99, "ms", None);
    db.close().await;
    Ok(figures)
}

fn to_sqlx(e: crate::Error) -> sqlx::Error {
    match e {
        crate::Error::Database(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

async fn timed(work: impl Future<Output = sqlx::Result<()>>) -> sqlx::Result<Duration> {
    let start = Instant::now();
    work.await?;
    Ok(start.elapsed())
}

fn rate(n: u32, took: Duration) -> f64 {
    f64::from(n) / took.as_secs_f64().max(1e-9)
}

async fn reset(db: &PgPool) -> Result<(), CliError> {
    db.execute(
        "TRUNCATE syncq.tasks, syncq.task_errors, syncq.rate_log, syncq.ready_signals, bench_raw, bench_same;
         DELETE FROM syncq.datasets; DELETE FROM syncq.workers;",
    )
    .await
    .map_err(bench_error("cannot reset the scratch database"))?;
    Ok(())
}

fn worker_command(
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

/// Queues `queued` noop tasks over `datasets` (half rate-limited far above
/// what they can use, when `limited`), lets the worker processes run
/// `args.tasks` of them, and returns tasks/s from the database's clock.
async fn drain(
    db: &PgPool,
    scratch: &PgConnectOptions,
    args: &BenchArgs,
    queued: u32,
    datasets: u32,
    limited: bool,
) -> Result<f64, CliError> {
    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind)
         SELECT 'bench-' || (i % $2), 'noop' FROM generate_series(1, $1) i",
    )
    .bind(i64::from(queued))
    .bind(i64::from(datasets))
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
        children.push(
            cmd.spawn()
                .map_err(|e| CliError::Runtime(format!("bench: cannot start a worker: {e}")))?,
        );
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM syncq.tasks WHERE status = 'succeeded'")
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
        "SELECT count(*) FILTER (WHERE status = 'succeeded'),
                extract(epoch FROM max(finished_at) - min(started_at))::float8,
                count(*) FILTER (WHERE status = 'failed' OR attempts > 1 AND status = 'succeeded')
         FROM syncq.tasks",
    )
    .fetch_one(db)
    .await
    .map_err(bench_error("cannot read the drain"))?;
    if bad > 0 || n < i64::from(args.tasks.min(queued)) {
        return Err(CliError::Runtime(format!(
            "bench: drain check failed: {n} succeeded, {bad} failed or retried"
        )));
    }
    Ok(n as f64 / secs.unwrap_or(f64::INFINITY).max(1e-9))
}

/// 200 single inserts at ~50/s into an idle worker; insert→start percentiles.
async fn latency(db: &PgPool, scratch: &PgConnectOptions) -> Result<(f64, f64, f64), CliError> {
    let mut child = worker_command(scratch, 4)?
        .spawn()
        .map_err(|e| CliError::Runtime(format!("bench: cannot start a worker: {e}")))?;
    let mut conn = scratch
        .connect()
        .await
        .map_err(bench_error("cannot connect"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..200 {
        sqlx::query("INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('latency', 'noop')")
            .execute(&mut conn)
            .await
            .map_err(bench_error("cannot insert"))?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM syncq.tasks WHERE status <> 'succeeded'")
                .fetch_one(&mut conn)
                .await
                .map_err(bench_error("cannot count"))?;
        if left == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = conn.close().await;
    let p: (Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.95) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
         FROM (SELECT extract(epoch FROM started_at - created_at) * 1000 AS ms
               FROM syncq.tasks WHERE started_at IS NOT NULL) t",
    )
    .fetch_one(db)
    .await
    .map_err(bench_error("cannot read latencies"))?;
    Ok((
        p.0.unwrap_or(f64::NAN),
        p.1.unwrap_or(f64::NAN),
        p.2.unwrap_or(f64::NAN),
    ))
}
