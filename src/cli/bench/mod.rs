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

mod drain;
mod enqueue;
mod latency;
mod permits;

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

/// The figures of one run, in the order they are printed.
#[derive(Debug, Default, Serialize)]
#[serde(transparent)]
struct Figures(Vec<Figure>);

impl Figures {
    /// Adds a figure; with a baseline (its name and value), the ratio to it.
    fn add(&mut self, name: &str, value: f64, unit: &'static str, baseline: Option<(&str, f64)>) {
        self.0.push(Figure {
            name: name.to_string(),
            value,
            unit,
            baseline: baseline.map(|(b, _)| b.to_string()),
            ratio: baseline.map(|(_, v)| if v > 0.0 { value / v } else { 0.0 }),
        });
    }
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
    crate::store::server::create_database(&mut conn, &name)
        .await
        .map_err(bench_error("cannot create the scratch database"))?;
    let scratch = options.clone().database(&name);
    let result = measure(&scratch, &args).await;
    crate::store::server::drop_database(&mut conn, &name)
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
    for f in &figures.0 {
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

async fn measure(scratch: &PgConnectOptions, args: &BenchArgs) -> Result<Figures, CliError> {
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
    let mut figures = Figures::default();
    enqueue::measure(&db, &mut figures).await?;
    let baseline = drain::baseline(&db, args, &mut figures).await?;
    drain::measure(&db, scratch, args, &mut figures, baseline).await?;
    latency::measure(&db, scratch, &mut figures).await?;
    permits::measure(&db, &mut figures).await?;
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
        "TRUNCATE syncq.tasks, syncq.task_errors, syncq.rate_log, syncq.ready_signals, syncq.turn_debts,
                  syncq.limit_log, bench_raw, bench_same;
         DELETE FROM syncq.datasets; DELETE FROM syncq.limits; DELETE FROM syncq.workers;",
    )
    .await
    .map_err(bench_error("cannot reset the scratch database"))?;
    Ok(())
}
