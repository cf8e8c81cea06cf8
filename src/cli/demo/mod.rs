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

mod display;
mod workload;

use std::io::Write;
use std::time::Duration;

use clap::Args;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use tokio::task::JoinHandle;

use super::{CliError, DEFAULT_DATABASE_URL, io_error};
use crate::local_postgres::LocalPostgres;
use crate::{Backoff, PoolConfig, PoolHandle, TaskQueueManager, WorkerPool, store};

use display::{Display, write_summary};
use workload::{SCHEDULE, setup};

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
