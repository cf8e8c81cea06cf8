//! The `syncq` command. `main.rs` only parses and maps errors to exit codes;
//! each command writes to an injected writer so tests can run it in-process.

use std::io::Write;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

mod bench;
mod dashboard;
mod demo;
mod limits;
mod ops;
mod schedule;

use crate::QueueSettings as DatasetRow;
use crate::{
    Db, LimitsUpdate, NewTask, PoolConfig, Pooler, RateLimit, TaskQueueManager, WorkerPool,
};

/// Where the CLI connects when `DATABASE_URL` is not set.
pub use crate::db::DEFAULT_DATABASE_URL;

/// syncq: a persistent task queue backed by PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "syncq", version, about, propagate_version = true)]
pub struct Cli {
    /// PostgreSQL URL (default: the DATABASE_URL environment variable, else
    /// postgres://postgres@127.0.0.1:5432/syncq).
    #[arg(long, global = true, help_heading = "Global options")]
    pub database_url: Option<String>,

    /// What the connections go through: `none` (PostgreSQL itself, or a
    /// session-mode pooler) or `transaction` (PgBouncer in transaction
    /// mode, RDS Proxy…: no prepared statements or session state kept).
    #[arg(long, global = true, help_heading = "Global options", env = "SYNCQ_POOLER", default_value = "none", value_parser = Pooler::from_str)]
    pub pooler: Pooler,

    /// Log lines on stderr as text or as JSON objects (one per line, with
    /// the task span's fields: task_id, dataset, kind, attempt).
    #[arg(long, global = true, help_heading = "Global options", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the syncq schema (creates the database if missing).
    Migrate,
    /// Enqueue one task; prints its id (the existing task's for a duplicate unique key).
    Enqueue(EnqueueArgs),
    /// Run a worker process with the built-in kinds (noop, sleep, fail, paged, count).
    Worker(WorkerArgs),
    /// Change a dataset's rate limit, concurrency cap, weight or shared
    /// limits (only what is named).
    Limit(LimitArgs),
    /// Limits shared by datasets (one API token's budget): set, list, remove.
    #[command(subcommand)]
    Limits(limits::LimitsCommand),
    /// Stop new starts of a dataset in every process; running tasks finish.
    Pause {
        /// The dataset.
        dataset: String,
        /// Create the dataset if it does not exist yet.
        #[arg(long)]
        create: bool,
    },
    /// Let a paused dataset's tasks start again.
    Resume {
        /// The dataset.
        dataset: String,
    },
    /// Lift an upstream throttle at once: a dataset's (and forget what
    /// its adaptive rate learned), or a shared limit's, by name (with the
    /// throttles of the datasets using it).
    Unthrottle {
        /// A dataset or a shared limit.
        name: String,
    },
    /// Cancel a task (a queued one never starts; a running one is told), or
    /// every queued and running task of a dataset.
    Cancel(ops::CancelArgs),
    /// Put a failed or cancelled task back to queued (attempts and errors kept).
    Retry(ops::RetryArgs),
    /// Delete finished tasks older than a duration, in short batches.
    Prune(ops::PruneArgs),
    /// Create the NOLOGIN roles syncq_producer and syncq_worker and grant them.
    Roles,
    /// Periodic tasks: add, list, remove, pause, resume.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// Datasets with their counts and limits, live workers, unhandled kinds.
    Status(ops::StatusArgs),
    /// List tasks, newest first.
    Tasks(ops::TasksArgs),
    /// One task with its checkpoint, result and error history.
    Show(ops::ShowArgs),
    /// A one-minute tour: five datasets with limits, a flaky upstream, an
    /// upstream that throttles, a long task that checkpoints and resumes,
    /// and invalid requests, drained by two worker pools with live progress.
    Demo(demo::DemoArgs),
    /// Measure enqueue, drain, latency and scale in a scratch database,
    /// each beside a raw-SQL baseline from the same run.
    Bench(bench::BenchArgs),
    /// Serve the web dashboard: datasets, tasks, workers, schedules, live.
    /// Read-only unless SYNCQ_DASHBOARD_TOKEN is set.
    Dashboard(dashboard::DashboardArgs),
}

/// `syncq limit`.
#[derive(Debug, Args)]
#[command(
    after_help = "An unknown dataset is refused unless --create is given (to configure a dataset before its first task)."
)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(true).args(["rate", "concurrency", "weight", "uses", "adaptive"])))]
pub struct LimitArgs {
    /// The dataset.
    pub dataset: String,
    /// Starts per window, e.g. 100/1s or 5/500ms; `none` removes the limit.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<Cleared<RateLimit>>,
    /// Running tasks at once across all processes (1 to 100000); `none`
    /// removes the cap.
    #[arg(long, value_parser = parse_concurrency)]
    pub concurrency: Option<Cleared<u32>>,
    /// Its share of starts when datasets compete, fleet-wide (1 to 1000;
    /// default 1): weights 1, 2, 4 split starts 1:2:4.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub weight: Option<u32>,
    /// The shared limits it uses (`syncq limits set`), comma-separated,
    /// replacing those it used; `none` uses none.
    #[arg(long, value_delimiter = ',')]
    pub uses: Option<Vec<String>>,
    /// `on`: its rate limit learns the upstream's rate from 429s without
    /// Retry-After (lowers it, then raises it back, pacing its starts
    /// evenly); `off`: the configured rate only.
    #[arg(long, value_parser = parse_on_off)]
    pub adaptive: Option<bool>,
    /// Create the dataset if it does not exist yet.
    #[arg(long)]
    pub create: bool,
}

/// A setting's new value, or `none` to clear it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleared<T> {
    /// Set to this.
    Set(T),
    /// Remove the setting.
    None,
}

impl<T> Cleared<T> {
    fn into_option(self) -> Option<T> {
        match self {
            Cleared::Set(v) => Some(v),
            Cleared::None => None,
        }
    }
}

/// `on` or `off`.
pub(super) fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: expected on or off")),
    }
}

fn parse_rate(s: &str) -> Result<Cleared<RateLimit>, String> {
    if s == "none" {
        return Ok(Cleared::None);
    }
    s.parse().map(Cleared::Set)
}

/// A usage error before any connection: the payload is not JSON.
pub(super) fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not valid JSON: {e}"))
}

fn parse_concurrency(s: &str) -> Result<Cleared<u32>, String> {
    if s == "none" {
        return Ok(Cleared::None);
    }
    match s.parse::<u32>() {
        Ok(n) if (1..=100_000).contains(&n) => Ok(Cleared::Set(n)),
        _ => Err(format!("{s:?} is not a number from 1 to 100000 (or none)")),
    }
}

/// `syncq enqueue`.
#[derive(Debug, Args)]
pub struct EnqueueArgs {
    /// The dataset (created with default settings if new).
    #[arg(long)]
    pub dataset: String,
    /// The task kind.
    #[arg(long)]
    pub kind: String,
    /// The payload, as JSON.
    #[arg(long, default_value = "{}", value_parser = parse_json)]
    pub payload: serde_json::Value,
    /// Lower runs first within the dataset.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i16,
    /// Do not start before this delay has passed (e.g. 30s, 5m; at most 100 years).
    #[arg(long, value_parser = |s: &str| NewTask::DELAY_RANGE.parse(s), conflicts_with = "run_at")]
    pub delay: Option<Duration>,
    /// Do not start before this instant (RFC 3339).
    #[arg(long, value_parser = parse_rfc3339)]
    pub run_at: Option<DateTime<Utc>>,
    /// Attempts allowed (1 to 10000).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(i32).range(1..=NewTask::MAX_ATTEMPTS_LIMIT as i64))]
    pub max_attempts: i32,
    /// At most one queued or running task per dataset and unique key.
    #[arg(long)]
    pub unique_key: Option<String>,
}

/// `syncq worker`.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// Handlers running at once (1 to 10000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,
    /// Only these datasets, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub datasets: Option<Vec<String>>,
    /// How long a task is held without a heartbeat (100ms to 1d).
    #[arg(long, env = "SYNCQ_LEASE", default_value = "30s", value_parser = |s: &str| PoolConfig::LEASE_RANGE.parse(s))]
    pub lease: Duration,
    /// How often leases are renewed (10ms to 1d, shorter than the lease).
    #[arg(long, env = "SYNCQ_HEARTBEAT", default_value = "10s", value_parser = |s: &str| PoolConfig::HEARTBEAT_RANGE.parse(s))]
    pub heartbeat: Duration,
    /// How often an idle worker looks for work it was not woken for (1ms to 1h).
    #[arg(long, default_value = "1s", value_parser = |s: &str| PoolConfig::POLL_INTERVAL_RANGE.parse(s))]
    pub poll_interval: Duration,
    /// Never LISTEN; poll only (wake-ups every --poll-interval, cancels
    /// heard at the heartbeat).
    #[arg(long)]
    pub poll_only: bool,
    /// A direct PostgreSQL URL, past the transaction-mode pooler, for what
    /// needs a session: LISTEN (instant wake-ups and cancels) and the
    /// vacuum lock. Without it, a worker behind a pooler polls.
    #[arg(long, env = "SYNCQ_LISTEN_URL", hide_env_values = true)]
    pub listen_url: Option<String>,
    /// The first retry's delay; each further retry doubles it, with
    /// jitter, up to 1h (0s to 1h).
    #[arg(long, default_value = "1s", value_parser = |s: &str| PoolConfig::BACKOFF_BASE_RANGE.parse(s))]
    pub backoff: Duration,
    /// How long handlers get to checkpoint on shutdown (0s to 1h).
    #[arg(long, default_value = "10s", value_parser = |s: &str| PoolConfig::SHUTDOWN_GRACE_RANGE.parse(s))]
    pub grace: Duration,
    /// How often this process looks for expired leases (10ms to 1h).
    #[arg(long, default_value = "5s", value_parser = |s: &str| PoolConfig::RESCUE_INTERVAL_RANGE.parse(s))]
    pub rescue_interval: Duration,
    /// Exit 0 once no task this worker could run is queued or running.
    #[arg(long)]
    pub exit_when_idle: bool,
    /// Delete finished tasks this long after they finish (1s to 100 years); `none` keeps them.
    #[arg(long, default_value = "7d", value_parser = parse_retention)]
    pub retention: Cleared<Duration>,
    /// Never VACUUM syncq's tables from this worker (leave it to autovacuum).
    #[arg(long)]
    pub no_vacuum: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// How long to leave out a dataset whose claims fail because of its own
    /// rows, so the others keep being served (10ms to 1h).
    #[arg(long, default_value = "60s", value_parser = |s: &str| PoolConfig::SET_ASIDE_RANGE.parse(s))]
    pub set_aside: Duration,
    /// Tasks leased ahead of free slots, at most (0 to 10000; 0: none). The
    /// worker takes about 50 ms of its own recent pace, so slow tasks are
    /// never left waiting here.
    #[arg(long, default_value_t = PoolConfig::DEFAULT_PREFETCH as u32, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    pub prefetch: u32,
}

fn parse_retention(s: &str) -> Result<Cleared<Duration>, String> {
    if s == "none" {
        return Ok(Cleared::None);
    }
    PoolConfig::RETENTION_RANGE
        .parse(s)
        .map(Cleared::Set)
        .map_err(|e| format!("{e}, or none to keep finished tasks"))
}

fn parse_rfc3339(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|d| d.with_timezone(&Utc))
        .map_err(|e| format!("{e} (expected RFC 3339, e.g. 2026-01-31T12:00:00Z)"))
}

/// Why a command failed: usage errors exit 2, runtime errors exit 1.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The arguments are wrong.
    #[error("{0}")]
    Usage(String),
    /// Something failed while running.
    #[error("{0}")]
    Runtime(String),
    /// Standard output was closed by its reader (`syncq status | head`):
    /// a normal end, exit 0 without a message.
    #[error("standard output closed")]
    PipeClosed,
}

impl CliError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
            CliError::PipeClosed => 0,
        }
    }
}

impl From<crate::Error> for CliError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Config { .. } | crate::Error::InvalidTask(_) => {
                CliError::Usage(e.to_string())
            }
            crate::Error::Database(e) if schema_missing(&e) => CliError::Runtime(format!(
                "syncq's schema is not in this database ({}): run `syncq migrate` first",
                describe(&e)
            )),
            crate::Error::Database(e) => {
                CliError::Runtime(format!("database error: {}", describe(&e)))
            }
            other => CliError::Runtime(one_line(&other.to_string())),
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs a parsed command, writing its output to `out`.
pub async fn run(cli: Cli, out: &mut (dyn Write + Send)) -> Result<(), CliError> {
    // Read here, not by clap: an `env` argument shows in the usage line as
    // if it were required whenever the variable is set.
    let url = match cli
        .database_url
        .or_else(|| std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()))
    {
        Some(url) => url,
        None => {
            note(&format!(
                "DATABASE_URL is not set; using {DEFAULT_DATABASE_URL}"
            ));
            DEFAULT_DATABASE_URL.to_string()
        }
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(CliError::Runtime(
            "invalid DATABASE_URL: expected postgres://user@host:port/database".into(),
        ));
    }
    let options = PgConnectOptions::from_str(&url).map_err(|e| {
        CliError::Runtime(format!(
            "invalid DATABASE_URL: {}",
            one_line(&e.to_string())
        ))
    })?;
    let pooler = cli.pooler;
    if pooler == Pooler::Transaction {
        let session = match &cli.command {
            Command::Migrate => Some("migrate"),
            Command::Demo(_) => Some("demo"),
            Command::Bench(_) => Some("bench"),
            _ => None,
        };
        if let Some(name) = session {
            return Err(CliError::Usage(format!(
                "`syncq {name}` needs a direct connection to PostgreSQL (it keeps session state): run it with --pooler none and the server's own address"
            )));
        }
    }
    let connect = |options: &PgConnectOptions, n: u32| {
        let options = options.clone();
        async move { connect_db(&options, pooler, n).await }
    };
    match cli.command {
        Command::Migrate => {
            let db = connect_creating(&options).await?;
            let done = crate::schema::migrate_reporting(&db).await?;
            let latest = done.version;
            if let Some(build) = done.rewrote_earlier {
                writeln!(
                    out,
                    "rewrote the migration history of {build} to the current baseline (same tables)"
                )
                .map_err(io_error)?;
            }
            match (done.applied.first(), done.applied.last()) {
                (Some(first), Some(last)) if first == last => writeln!(
                    out,
                    "applied migration {first}: syncq schema is now at version {latest}"
                ),
                (Some(first), Some(last)) => writeln!(
                    out,
                    "applied migrations {first}–{last}: syncq schema is now at version {latest}"
                ),
                _ => writeln!(out, "syncq schema is up to date (version {latest})"),
            }
            .map_err(io_error)?;
            if !done.objects.is_empty() {
                writeln!(
                    out,
                    "applied {} of {} function, trigger and view files",
                    done.objects.len(),
                    crate::schema::sql_objects().len()
                )
            } else {
                Ok(())
            }
            .map_err(io_error)?;
            Ok(())
        }
        Command::Enqueue(args) => enqueue(connect(&options, 1).await?, args, out).await,
        Command::Demo(args) => {
            // Held to the end: a private cluster is removed when it drops.
            let (options, _private) =
                demo::database(&options, &url, args.private_postgres, out).await?;
            connect_creating(&options).await?.close().await;
            let db = connect_pool(&options, 40).await?;
            crate::migrate(&db).await?;
            let result = demo::run(db.clone(), &args, out).await;
            db.close().await;
            result
        }
        Command::Worker(args) => worker(&options, pooler, args).await,
        Command::Limit(args) => limit(connect(&options, 1).await?, args, out).await,
        Command::Limits(command) => limits::run(&connect(&options, 1).await?, command, out).await,
        Command::Pause { dataset, create } => {
            let db = connect(&options, 1).await?;
            ops::require_dataset(&db, &dataset, ops::Unknown::Create(create)).await?;
            TaskQueueManager::new(db)
                .queue(dataset.as_str())
                .pause()
                .await?;
            writeln!(out, "paused {dataset:?}").map_err(io_error)
        }
        Command::Resume { dataset } => {
            let db = connect(&options, 1).await?;
            ops::require_dataset(&db, &dataset, ops::Unknown::Refuse).await?;
            let manager = TaskQueueManager::new(db);
            manager.queue(dataset.as_str()).resume().await?;
            writeln!(out, "resumed {dataset:?}").map_err(io_error)?;
            // Resumed is not running: say what still holds it back.
            match ops::throttle_left(&manager, &dataset).await? {
                None => Ok(()),
                Some((until, by)) => writeln!(
                    out,
                    "still throttled by {by} until {} (`syncq unthrottle {}` lifts it)",
                    ops::until(until),
                    match &by {
                        ops::HeldBy::Upstream => dataset.clone(),
                        ops::HeldBy::Limit(l) => l.clone(),
                    }
                )
                .map_err(io_error),
            }
        }
        Command::Unthrottle { name } => {
            ops::unthrottle(&connect(&options, 1).await?, &name, out).await
        }
        Command::Cancel(args) => ops::cancel(&connect(&options, 1).await?, args, out).await,
        Command::Retry(args) => ops::retry(&connect(&options, 1).await?, args, out).await,
        Command::Prune(args) => ops::prune(&connect(&options, 1).await?, args, out).await,
        Command::Roles => {
            crate::schema::create_roles(connect(&options, 1).await?)
                .await
                .map_err(|e| lib_failure("cannot create the roles", e))?;
            writeln!(
                out,
                "roles syncq_producer and syncq_worker are ready; grant them to logins"
            )
            .map_err(io_error)
        }
        Command::Schedule(command) => {
            schedule::run(&connect(&options, 1).await?, command, out).await
        }
        Command::Status(args) => ops::status(&connect(&options, 1).await?, args, out).await,
        Command::Tasks(args) => ops::tasks(&connect(&options, 1).await?, args, out).await,
        Command::Show(args) => ops::show(&connect(&options, 1).await?, args, out).await,
        Command::Bench(args) => bench::run(&options, args, out).await,
        Command::Dashboard(args) => {
            // The dashboard opens a pool of its own (statement timeout
            // included); this one only checks the database first.
            dashboard::run(connect(&options, 1).await?, args, out).await
        }
    }
}

/// Installs the Prometheus exporter, serving `/metrics` on `addr`.
fn install_metrics(addr: std::net::SocketAddr) -> Result<(), CliError> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    let builder = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            Matcher::Full("syncq_task_duration_seconds".into()),
            crate::metrics::TASK_DURATION_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("syncq_claim_duration_seconds".into()),
                crate::metrics::CLAIM_DURATION_BUCKETS,
            )
        })
        .map_err(|e| CliError::Runtime(format!("metrics: {e}")))?;
    builder
        .install()
        .map_err(|e| CliError::Runtime(format!("cannot serve metrics on {addr}: {e}")))?;
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

pub(crate) fn io_error(e: std::io::Error) -> CliError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // `syncq status | head -1`: the reader has what it wanted.
        return CliError::PipeClosed;
    }
    CliError::Runtime(format!("cannot write output: {e}"))
}

/// A `Db` for the commands that work through a transaction-mode pooler.
async fn connect_db(
    options: &PgConnectOptions,
    pooler: Pooler,
    max_connections: u32,
) -> Result<Db, CliError> {
    Ok(Db::new(connect_pool(options, max_connections).await?).with_pooler(pooler))
}

async fn connect_pool(
    options: &PgConnectOptions,
    max_connections: u32,
) -> Result<PgPool, CliError> {
    // One direct connection first: a pool would retry until its acquire
    // timeout and hide the real reason (refused, unknown database, …).
    let probe = options
        .connect()
        .await
        .map_err(|e| connect_error(options, &e))?;
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.clone())
        .await
        .map_err(|e| connect_error(options, &e))
}

pub(crate) fn connect_error(options: &PgConnectOptions, e: &sqlx::Error) -> CliError {
    let target = format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or("")
    );
    let hint = match e.as_database_error().and_then(|d| d.code()) {
        Some(code) if code == "3D000" => " (run `syncq migrate` to create it)",
        _ => "",
    };
    CliError::Runtime(format!(
        "cannot connect to PostgreSQL at {target}: {}{hint}",
        describe(e)
    ))
}

/// A sqlx error on one line; for a server error, just the server's message.
/// A one-line note on stderr (not `eprintln!`, which panics when stderr
/// is closed).
fn note(text: &str) {
    let _ = writeln!(std::io::stderr(), "syncq: {text}");
}

/// The database has no (or an older) syncq schema: a relation, schema or
/// function of syncq's is missing.
pub(crate) fn schema_missing(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|db| {
        matches!(db.code().as_deref(), Some("42P01" | "3F000" | "42883"))
            && db.message().contains("syncq")
    })
}

/// A database error while doing `what`, one line; with the hint to
/// migrate when syncq's schema is missing.
pub(crate) fn db_failure(what: &str, e: &sqlx::Error) -> CliError {
    if schema_missing(e) {
        return CliError::Runtime(format!(
            "{what}: syncq's schema is not in this database ({}): run `syncq migrate` first",
            describe(e)
        ));
    }
    CliError::Runtime(format!("{what}: {}", describe(e)))
}

/// [`db_failure`] for what the library returns.
/// Invalid input (a value out of range, a bad task) is a usage error
/// (exit 2), as it is when clap refuses an argument.
pub(crate) fn lib_failure(what: &str, e: crate::Error) -> CliError {
    match e {
        crate::Error::Database(e) => db_failure(what, &e),
        crate::Error::Config { .. } | crate::Error::InvalidTask(_) => {
            CliError::Usage(format!("{what}: {}", one_line(&e.to_string())))
        }
        other => CliError::Runtime(format!("{what}: {}", one_line(&other.to_string()))),
    }
}

pub(crate) fn describe(e: &sqlx::Error) -> String {
    match e.as_database_error() {
        Some(db) => one_line(db.message()),
        None => one_line(&e.to_string()),
    }
}

/// Connects, creating the database first if it does not exist yet.
async fn connect_creating(options: &PgConnectOptions) -> Result<PgPool, CliError> {
    match connect_pool(options, 2).await {
        Ok(db) => Ok(db),
        Err(first) => match crate::store::server::create_database_if_missing(options).await {
            Ok(true) => {
                let name = options.get_database().unwrap_or("postgres");
                note(&format!("created database {name:?}"));
                connect_pool(options, 2).await
            }
            // It exists (the first error stands), or the server's
            // `postgres` database cannot be reached either.
            Ok(false)
            | Err(sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut) => {
                Err(first)
            }
            Err(e) => Err(CliError::Runtime(format!(
                "cannot create database {:?}: {}",
                options.get_database().unwrap_or("postgres"),
                one_line(&e.to_string())
            ))),
        },
    }
}

async fn enqueue(db: Db, args: EnqueueArgs, out: &mut (dyn Write + Send)) -> Result<(), CliError> {
    let mut task = NewTask::new(args.dataset, args.kind)
        .payload(args.payload)
        .priority(args.priority)
        .max_attempts(args.max_attempts);
    if let Some(delay) = args.delay {
        task = task.delay(delay);
    }
    if let Some(at) = args.run_at {
        task = task.run_at(at);
    }
    if let Some(key) = args.unique_key {
        task = task.unique_key(key);
    }
    task.validate()?;
    let id = TaskQueueManager::new(db).enqueue(task).await?;
    writeln!(out, "{id}").map_err(io_error)?;
    Ok(())
}

async fn worker(
    options: &PgConnectOptions,
    pooler: Pooler,
    args: WorkerArgs,
) -> Result<(), CliError> {
    let config = PoolConfig {
        concurrency: args.concurrency as usize,
        datasets: args.datasets,
        lease: args.lease,
        heartbeat: args.heartbeat,
        poll_interval: args.poll_interval,
        listen: !args.poll_only,
        shutdown_grace: args.grace,
        rescue_interval: args.rescue_interval,
        exit_when_idle: args.exit_when_idle,
        retention: args.retention.into_option(),
        vacuum: !args.no_vacuum,
        metrics_sample_interval: args.metrics_addr.map(|_| Duration::from_secs(5)),
        set_aside: args.set_aside,
        prefetch: args.prefetch as usize,
        backoff: crate::backoff::Backoff {
            base: args.backoff,
            ..crate::backoff::Backoff::default()
        },
        ..PoolConfig::default()
    };
    if let Some(addr) = args.metrics_addr {
        install_metrics(addr)?;
    }
    config.validate()?;
    let direct = match &args.listen_url {
        Some(url) => Some(PgConnectOptions::from_str(url).map_err(|e| {
            CliError::Usage(format!(
                "invalid --listen-url: {}",
                one_line(&e.to_string())
            ))
        })?),
        None => None,
    };
    let connections = args.concurrency.saturating_add(4);
    let db = connect_db(options, pooler, connections).await?;
    let mut builder = WorkerPool::builder(db).register_builtins().config(config);
    if let Some(direct) = direct {
        builder = builder.direct(direct);
    }
    let pool = builder.build()?;
    pool.run_with_signals().await?;
    Ok(())
}

async fn limit(db: Db, args: LimitArgs, out: &mut (dyn Write + Send)) -> Result<(), CliError> {
    let update = LimitsUpdate {
        rate_limit: args.rate.map(Cleared::into_option),
        max_concurrency: args.concurrency.map(Cleared::into_option),
        weight: args.weight,
        adaptive: args.adaptive,
    };
    ops::require_dataset(&db, &args.dataset, ops::Unknown::Create(args.create)).await?;
    let queue = TaskQueueManager::new(db).queue(&args.dataset);
    let row = queue
        .update_limits(update)
        .await
        .map_err(|e| lib_failure("cannot change the limits", e))?;
    let mut line = describe_limits(&row);
    if let Some(uses) = args.uses {
        let uses: Vec<String> = uses
            .into_iter()
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty() && u != "none")
            .collect();
        let stored = queue.use_limits(&uses).await.map_err(|e| {
            // An unknown limit (the trigger names the column): usage.
            match e.refused_reference() {
                Some(why) => CliError::Usage(format!("cannot change the limits: {why}")),
                None => lib_failure("cannot change the limits", e),
            }
        })?;
        line.push_str(&format!(
            ", shared limits {}",
            if stored.is_empty() {
                "none".to_string()
            } else {
                stored.join(", ")
            }
        ));
    }
    writeln!(out, "{line}").map_err(io_error)
}

fn describe_limits(row: &DatasetRow) -> String {
    let rate = match row.rate_limit {
        Some(n) => RateLimit::new(
            u32::try_from(n).unwrap_or(0),
            Duration::from_secs_f64(row.rate_window_secs.max(0.0)),
        )
        .map_or_else(
            |_| format!("{n}/{}s", row.rate_window_secs),
            |r| r.to_string(),
        ),
        None => "none".to_string(),
    };
    let concurrency = row
        .max_concurrency
        .map_or_else(|| "none".to_string(), |n| n.to_string());
    let adaptive = match (row.adaptive, row.effective_rate) {
        (true, Some(e)) => format!(" adaptive (now {})", ops::rate_figure(e)),
        (true, None) => " adaptive".to_string(),
        (false, _) => String::new(),
    };
    format!(
        "{:?}: rate {rate}{adaptive}, concurrency {concurrency}, weight {}{}",
        row.dataset_id,
        row.weight,
        if row.paused { ", paused" } else { "" }
    )
}
