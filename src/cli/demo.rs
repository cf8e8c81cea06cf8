//! `syncq demo`: what syncq is for, in under a minute.
//!
//! Five datasets behind five pretend upstreams, drained by two worker pools
//! (two "hosts") in this process, sharing every limit through the rows:
//!
//! - `demo-github`: 10 starts/s, 5 at once — pages that take 50–200 ms;
//! - `demo-jira`: a flaky upstream: every request fails twice (retryable),
//!   then works — backoff and retries;
//! - `demo-stripe`: answers "rate limit exceeded, retry after 2 s" a few
//!   times — the whole dataset pauses, in both pools;
//! - `demo-archive`: two long exports that checkpoint every step; the host
//!   running one is restarted half-way and it resumes where it was;
//! - `demo-crm`: quick tasks and a few invalid requests that fail at once.
//!
//! A live display (or plain lines when stdout is not a terminal) shows each
//! dataset's done / running / queued and its start rate against its limit;
//! the closing table is read back from the database.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::task::JoinHandle;

use super::{CliError, DEFAULT_DATABASE_URL, io_error};
use crate::local_postgres::LocalPostgres;
use crate::store::demo::{Progress, Summary};
use crate::{
    Backoff, NewTask, PoolConfig, PoolHandle, RateLimit, Schedule, TaskQueueManager, Timing,
    WorkerPool, store,
};

/// Every dataset of the demo starts with this.
pub const PREFIX: &str = "demo-";

/// `syncq demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Multiply the number of tasks (0.1 to 10).
    #[arg(long, default_value_t = 1.0, value_parser = parse_scale)]
    pub scale: f64,
    /// Run on a private, throwaway PostgreSQL even if a server answers.
    #[arg(long)]
    pub private_postgres: bool,
}

fn sql(e: sqlx::Error) -> CliError {
    CliError::from(crate::Error::from(e))
}

fn parse_scale(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if (0.1..=10.0).contains(&x) => Ok(x),
        _ => Err(format!("{s:?} is not a number from 0.1 to 10")),
    }
}

/// The database to run on: the given one, or — when it is the default
/// address and nothing answers there, or when asked — a private cluster
/// that lives as long as the returned guard.
pub(super) async fn database(
    options: &PgConnectOptions,
    url: &str,
    private: bool,
    out: &mut (dyn Write + Send),
) -> Result<(PgConnectOptions, Option<LocalPostgres>), CliError> {
    use sqlx::ConnectOptions;
    if !private {
        if url != DEFAULT_DATABASE_URL {
            return Ok((options.clone(), None));
        }
        // The default address: use it if a server answers there.
        let server = options.clone().database("postgres");
        if let Ok(conn) = server.connect().await {
            let _ = sqlx::Connection::close(conn).await;
            return Ok((options.clone(), None));
        }
        writeln!(
            out,
            "no PostgreSQL answers at 127.0.0.1:5432: starting a private one for this demo…"
        )
        .map_err(io_error)?;
    }
    let local = tokio::task::spawn_blocking(LocalPostgres::start)
        .await
        .map_err(|e| CliError::Runtime(format!("starting PostgreSQL: {e}")))??;
    writeln!(
        out,
        "private PostgreSQL on 127.0.0.1:{} (removed when the demo ends)",
        local.port()
    )
    .map_err(io_error)?;
    let options = local
        .url("syncq")
        .parse::<PgConnectOptions>()
        .map_err(|e| CliError::Runtime(format!("private PostgreSQL URL: {e}")))?;
    Ok((options, Some(local)))
}

/// Runs the demo on `db` (migrated).
pub(super) async fn run(
    db: PgPool,
    args: &DemoArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let cleared = store::demo::clear(&db.clone().into(), PREFIX)
        .await
        .map_err(sql)?;
    if cleared > 0 {
        writeln!(out, "cleared {cleared} tasks of an earlier demo").map_err(io_error)?;
    }
    let since = store::tasks::transaction_now(&db).await.map_err(sql)?;
    let total = setup(&db, args.scale).await?;
    writeln!(
        out,
        "{total} tasks over 5 datasets, and a schedule enqueueing one every 2 s; two worker pools (two hosts) share the limits through the database\n"
    )
    .map_err(io_error)?;

    let config = PoolConfig {
        concurrency: 12,
        datasets: None,
        backoff: Backoff {
            base: Duration::from_millis(300),
            max: Duration::from_secs(2),
            jitter: 0.2,
        },
        heartbeat: Duration::from_secs(2),
        lease: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(5),
        retention: None,
        ..PoolConfig::default()
    };
    let mut hosts = vec![
        (
            "demo-host-a".to_string(),
            start_pool(&db, "demo-host-a", &config)?,
        ),
        (
            "demo-host-b".to_string(),
            start_pool(&db, "demo-host-b", &config)?,
        ),
    ];

    let mut display = Display::new();
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut restarted = false;
    let mut interrupted = false;
    let mut unscheduled = false;
    loop {
        let rows = store::demo::progress(&db, PREFIX).await.map_err(sql)?;
        display.update(&rows, out)?;
        if !unscheduled
            && rows
                .iter()
                .filter(|r| r.dataset_id != "demo-cron")
                .all(|r| r.done == r.total)
        {
            // The seeded work is done: no more ticks; the last one's task
            // (if any) still runs before the demo ends.
            unscheduled = true;
            TaskQueueManager::new(db.clone())
                .remove_schedule(SCHEDULE)
                .await
                .map_err(|e| super::lib_failure("cannot remove the demo schedule", e))?;
            continue;
        }
        if unscheduled && rows.iter().all(|r| r.done == r.total) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            display.finish();
            let _ = TaskQueueManager::new(db.clone())
                .remove_schedule(SCHEDULE)
                .await;
            for (_, host) in hosts {
                stop_pool(host).await;
            }
            return Err(CliError::Runtime(
                "demo: tasks still unfinished after 2 minutes (see `syncq status`)".into(),
            ));
        }
        // Half-way through the long exports, the host running one of them
        // "restarts": it broadcasts a checkpoint, running tasks save their
        // progress and are released, and a fresh pool takes over.
        if !restarted && started.elapsed() > Duration::from_secs(4) {
            restarted = true;
            let holder = store::demo::holder_of_running(&db, "demo-archive")
                .await
                .map_err(sql)?;
            let index = hosts
                .iter()
                .position(|(name, _)| Some(name) == holder.as_ref())
                .unwrap_or(0);
            let (name, host) = hosts.remove(index);
            display.note(
                &format!("{name} restarts: checkpoint, release, resume"),
                out,
            )?;
            stop_pool(host).await;
            let name = format!("{name}-restarted");
            let host = start_pool(&db, &name, &config)?;
            hosts.push((name, host));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = tokio::signal::ctrl_c() => {
                interrupted = true;
                break;
            }
        }
    }
    display.finish();
    // Interrupted or not, the demo leaves no schedule ticking behind it.
    if let Err(e) = TaskQueueManager::new(db.clone())
        .remove_schedule(SCHEDULE)
        .await
    {
        tracing::warn!(error = %e, "could not remove the demo's schedule");
    }
    for (_, host) in hosts {
        stop_pool(host).await;
    }
    if interrupted {
        writeln!(
            out,
            "\ninterrupted: running tasks checkpointed and released; run `syncq demo` again to start over"
        )
        .map_err(io_error)?;
        return Ok(());
    }
    let rows = store::demo::summary(&db, PREFIX, since)
        .await
        .map_err(sql)?;
    write_summary(&rows, out)
}

/// Creates the demo's datasets and tasks; returns how many tasks.
async fn setup(db: &PgPool, scale: f64) -> Result<usize, CliError> {
    let n = |base: usize| ((base as f64 * scale).round() as usize).max(1);
    let manager = TaskQueueManager::new(db.clone());
    let limits: [(&str, Option<RateLimit>, Option<u32>); 5] = [
        ("demo-github", Some(RateLimit::per_second(10)?), Some(5)),
        ("demo-jira", Some(RateLimit::per_second(6)?), Some(3)),
        ("demo-stripe", Some(RateLimit::per_second(10)?), None),
        ("demo-archive", None, Some(2)),
        ("demo-crm", None, Some(4)),
    ];
    for (dataset, rate, cap) in limits {
        let queue = manager.queue(dataset);
        queue.set_rate_limit(rate).await?;
        queue.set_max_concurrency(cap).await?;
    }
    let mut tasks = Vec::new();
    for i in 0..n(80) {
        tasks.push(
            NewTask::new("demo-github", "sleep")
                .payload(json!({ "ms": 50 + (i * 37) % 150, "page": i + 1 })),
        );
    }
    for i in 0..n(24) {
        tasks.push(
            NewTask::new("demo-jira", "fail")
                .payload(json!({ "error": "retryable", "times": 2, "issue": i + 1 })),
        );
    }
    for i in 0..n(45) {
        tasks.push(
            NewTask::new("demo-stripe", "sleep").payload(json!({ "ms": 80, "charge": i + 1 })),
        );
    }
    for i in 0..n(3) {
        tasks.push(NewTask::new("demo-stripe", "fail").payload(json!({
            "error": "rate_limited", "times": 1, "retry_after_ms": 2000, "burst": i + 1
        })));
    }
    for i in 0..n(2) {
        tasks.push(
            NewTask::new("demo-archive", "count")
                .payload(json!({ "to": 80, "step_ms": 100, "export": i + 1 })),
        );
    }
    for i in 0..n(30) {
        tasks.push(NewTask::new("demo-crm", "noop").payload(json!({ "contact": i + 1 })));
    }
    for i in 0..n(4) {
        tasks.push(
            NewTask::new("demo-crm", "fail")
                .payload(json!({ "error": "invalid", "contact": format!("bad-{}", i + 1) })),
        );
    }
    let total = tasks.len();
    manager.enqueue_many(tasks).await?;
    // A periodic sync: one task every 2 s, enqueued by whichever pool's
    // scheduler takes the tick; removed when the rest is done.
    manager
        .schedule(
            Schedule::new(
                SCHEDULE,
                "demo-cron",
                "noop",
                Timing::Every(Duration::from_secs(2)),
            )
            .payload(json!({ "sync": "periodic" })),
        )
        .await?;
    Ok(total)
}

/// The demo's schedule (and its dataset, `demo-cron`).
const SCHEDULE: &str = "demo-cron-every-2s";

fn start_pool(
    db: &PgPool,
    worker_id: &str,
    config: &PoolConfig,
) -> Result<(PoolHandle, JoinHandle<crate::Result<()>>), CliError> {
    let pool = WorkerPool::builder(db.clone())
        .register_builtins()
        .worker_id(worker_id)
        .config(config.clone())
        .build()?;
    let handle = pool.handle();
    Ok((handle, tokio::spawn(pool.run())))
}

async fn stop_pool((handle, run): (PoolHandle, JoinHandle<crate::Result<()>>)) {
    handle.checkpoint();
    match run.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "a demo pool stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "a demo pool panicked"),
    }
}

/// Live progress: bars on a terminal, a line per dataset every 2 s
/// otherwise.
struct Display {
    multi: Option<MultiProgress>,
    bars: Vec<ProgressBar>,
    last_lines: Option<tokio::time::Instant>,
}

impl Display {
    fn new() -> Display {
        let multi = std::io::stdout()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        Display {
            multi,
            bars: Vec::new(),
            last_lines: None,
        }
    }

    fn update(&mut self, rows: &[Progress], out: &mut (dyn Write + Send)) -> Result<(), CliError> {
        let Some(multi) = &self.multi else {
            let now = tokio::time::Instant::now();
            if self
                .last_lines
                .is_some_and(|t| now.duration_since(t) < Duration::from_secs(2))
            {
                return Ok(());
            }
            self.last_lines = Some(now);
            for row in rows {
                writeln!(
                    out,
                    "{:<13} {:>3}/{:<3} done  {}",
                    row.dataset_id,
                    row.done,
                    row.total,
                    describe(row)
                )
                .map_err(io_error)?;
            }
            return writeln!(out).map_err(io_error);
        };
        while self.bars.len() < rows.len() {
            let style = ProgressStyle::with_template(
                "{prefix:<13} [{bar:28.cyan/blue}] {pos:>3}/{len:<3} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            self.bars
                .push(multi.add(ProgressBar::new(0).with_style(style)));
        }
        for (bar, row) in self.bars.iter().zip(rows) {
            bar.set_prefix(row.dataset_id.clone());
            bar.set_length(u64::try_from(row.total).unwrap_or(0));
            bar.set_position(u64::try_from(row.done).unwrap_or(0));
            bar.set_message(describe(row));
        }
        Ok(())
    }

    fn note(&self, text: &str, out: &mut (dyn Write + Send)) -> Result<(), CliError> {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(format!("  * {text}"));
                Ok(())
            }
            None => writeln!(out, "* {text}").map_err(io_error),
        }
    }

    fn finish(&self) {
        for bar in &self.bars {
            bar.finish();
        }
    }
}

fn describe(row: &Progress) -> String {
    let mut s = format!(
        "running {:>2}{} queued {:>3}  {:>4.1}/s",
        row.running,
        row.max_concurrency
            .map_or(String::new(), |c| format!(" (cap {c})")),
        row.queued,
        row.starts_last_second as f64
    );
    if let Some(limit) = row.limit_per_second {
        s.push_str(&format!(" of {limit:.0}/s limit"));
    }
    if row.throttled {
        s.push_str("  THROTTLED by upstream");
    }
    s
}

fn write_summary(rows: &[Summary], out: &mut (dyn Write + Send)) -> Result<(), CliError> {
    let mut text = String::from("\nsummary (read back from the database)\n");
    text.push_str(&format!(
        "{:<13} {:>5} {:>5} {:>6} {:>8} {:>7} {:>9} {:>7} {:>8} {:>15}\n",
        "dataset",
        "tasks",
        "ok",
        "failed",
        "attempts",
        "retries",
        "throttles",
        "resumed",
        "elapsed",
        "starts/s"
    ));
    for r in rows {
        // A sliding-window limit of L per W allows N starts no faster
        // than ceil(N / L) windows: runs / (span to the last start + one
        // window) stays at or below the limit exactly when it held.
        let rate = r.runs as f64 / (r.last_start_secs.max(0.0) + r.window_secs);
        let limit = r
            .limit_per_second
            .map_or(String::from("no limit"), |l| format!("limit {l:.0}"));
        text.push_str(&format!(
            "{:<13} {:>5} {:>5} {:>6} {:>8} {:>7} {:>9} {:>7} {:>7.1}s {:>5.1} {:<9}\n",
            r.dataset_id,
            r.tasks,
            r.succeeded,
            r.failed,
            r.attempts,
            r.retries,
            r.throttles,
            r.resumed,
            r.elapsed_secs,
            rate,
            limit
        ));
    }
    text.push_str(
        "\nattempts   counted runs\n\
         retries    attempts after a failure (backoff in between)\n\
         throttles  runs answered \"rate limit exceeded\": the dataset paused in both pools;\n\
         \x20          not counted as attempts\n\
         resumed    tasks that continued from their checkpoint after their host restarted\n\
         starts/s   runs / (time to the last start + one rate window): at most the limit\n\
         \x20          when the limit held\n\
         \nLook around: `syncq status`, `syncq tasks --dataset demo-jira`, `syncq show <id>`.\n",
    );
    write!(out, "{text}").map_err(io_error)
}
