//! Operator commands: cancel, retry, prune, status, tasks, show.

use std::io::Write;
use std::time::Duration;

use crate::db::Db;
use clap::Args;
use serde_json::json;

use super::{CliError, io_error};
use crate::inspect::{TaskFilter, TaskInfo};
use crate::task::TaskStatus;
use crate::{TaskId, TaskQueueManager};

fn db_error(what: &str) -> impl Fn(crate::Error) -> CliError + '_ {
    move |e| super::lib_failure(what, e)
}

fn manager(db: &Db) -> TaskQueueManager {
    TaskQueueManager::new(db.clone())
}

/// Whether an unknown dataset may be created by the command (`--create`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unknown {
    /// The command configures datasets: `--create` makes a new one.
    Create(bool),
    /// The command acts on a dataset's tasks: an unknown one has none.
    Refuse,
}

/// Refuses an unknown dataset (exit 2) unless the command may create it.
pub(super) async fn require_dataset(
    db: &Db,
    dataset: &str,
    unknown: Unknown,
) -> Result<(), CliError> {
    if unknown == Unknown::Create(true) {
        return Ok(());
    }
    let known = manager(db)
        .dataset_exists(dataset)
        .await
        .map_err(db_error("cannot read the dataset"))?;
    if known {
        return Ok(());
    }
    Err(CliError::Usage(match unknown {
        Unknown::Create(_) => {
            format!("no dataset {dataset:?}: add --create to configure it before its first task")
        }
        Unknown::Refuse => format!("no dataset {dataset:?}: it has no task and no settings"),
    }))
}

/// `syncq cancel`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["id", "dataset"])))]
pub struct CancelArgs {
    /// The task.
    pub id: Option<TaskId>,
    /// Every queued and running task of this dataset instead.
    #[arg(long)]
    pub dataset: Option<String>,
}

pub(super) async fn cancel(
    db: &Db,
    args: CancelArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    if let Some(dataset) = args.dataset {
        require_dataset(db, &dataset, Unknown::Refuse).await?;
        let n = manager(db)
            .queue(&dataset)
            .cancel_all()
            .await
            .map_err(db_error("cannot cancel"))?;
        return writeln!(out, "cancel requested for {n} task(s) of {dataset:?}").map_err(io_error);
    }
    let Some(id) = args.id else {
        return Err(CliError::Usage("give a task id or --dataset".into()));
    };
    match manager(db)
        .cancel(id)
        .await
        .map_err(db_error("cannot cancel"))?
    {
        Some(TaskStatus::Cancelled) => writeln!(out, "task {id} cancelled").map_err(io_error),
        Some(_) => {
            writeln!(out, "task {id} is running: its handler was told to cancel").map_err(io_error)
        }
        None => match manager(db)
            .task(id)
            .await
            .map_err(db_error("cannot read the task"))?
        {
            Some(task) => writeln!(
                out,
                "task {id} is already {}: nothing to cancel",
                task.status
            )
            .map_err(io_error),
            None => Err(CliError::Usage(format!("no task with id {id}"))),
        },
    }
}

/// `syncq retry`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["id", "dataset"])))]
pub struct RetryArgs {
    /// The task.
    pub id: Option<TaskId>,
    /// Every task of this dataset in --status instead.
    #[arg(long)]
    pub dataset: Option<String>,
    /// With --dataset: which tasks to retry (failed or cancelled).
    #[arg(long, default_value = "failed", value_parser = parse_retryable, requires = "dataset")]
    pub status: TaskStatus,
}

fn parse_finished(s: &str) -> Result<TaskStatus, String> {
    match s.parse() {
        Ok(status) if TaskStatus::is_final(status) => Ok(status),
        _ => Err("expected succeeded, failed or cancelled".into()),
    }
}

fn parse_retryable(s: &str) -> Result<TaskStatus, String> {
    match s.parse() {
        Ok(status @ (TaskStatus::Failed | TaskStatus::Cancelled)) => Ok(status),
        _ => Err("expected failed or cancelled".into()),
    }
}

pub(super) async fn retry(
    db: &Db,
    args: RetryArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let unique = |e: crate::Error| match &e {
        crate::Error::Database(d)
            if d.as_database_error().and_then(|d| d.code()).as_deref() == Some("23505") =>
        {
            CliError::Runtime(
                "cannot retry: a queued or running task already holds the same unique_key".into(),
            )
        }
        _ => super::lib_failure("cannot retry", e),
    };
    if let Some(dataset) = args.dataset {
        require_dataset(db, &dataset, Unknown::Refuse).await?;
        let n = manager(db)
            .queue(&dataset)
            .retry_all(args.status)
            .await
            .map_err(unique)?;
        return writeln!(
            out,
            "{n} {} task(s) of {dataset:?} queued again",
            args.status
        )
        .map_err(io_error);
    }
    let Some(id) = args.id else {
        return Err(CliError::Usage("give a task id or --dataset".into()));
    };
    if manager(db).retry(id).await.map_err(unique)? {
        return writeln!(out, "task {id} queued again").map_err(io_error);
    }
    match manager(db)
        .task(id)
        .await
        .map_err(db_error("cannot read the task"))?
    {
        Some(task) => Err(CliError::Usage(format!(
            "task {id} is {}: only failed or cancelled tasks can be retried",
            task.status
        ))),
        None => Err(CliError::Usage(format!("no task with id {id}"))),
    }
}

/// `syncq prune`.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// Delete tasks that finished longer ago than this (e.g. 7d, 12h; 0s to 100 years).
    #[arg(long, value_parser = |s: &str| crate::PoolConfig::PRUNE_AGE_RANGE.parse(s))]
    pub older_than: Duration,
    /// Only these finished statuses (default: succeeded, failed, cancelled).
    #[arg(long, value_delimiter = ',', value_parser = parse_finished)]
    pub status: Vec<TaskStatus>,
}

pub(super) async fn prune(
    db: &Db,
    args: PruneArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let statuses: Vec<TaskStatus> = if args.status.is_empty() {
        vec![
            TaskStatus::Succeeded,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
        ]
    } else {
        args.status
    };
    let total = manager(db)
        .prune_only(args.older_than, &statuses)
        .await
        .map_err(db_error("cannot prune"))?;
    writeln!(out, "deleted {total} finished task(s)").map_err(io_error)
}

/// `syncq status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn status(
    db: &Db,
    args: StatusArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let failed = db_error("cannot read the status");
    let manager = manager(db);
    let datasets = manager.dataset_stats().await.map_err(&failed)?;
    let workers = manager.live_workers().await.map_err(&failed)?;
    let stale = manager.stale_workers().await.map_err(&failed)?;
    let unhandled = manager.unhandled_kinds().await.map_err(&failed)?;
    let schedules = manager.schedules().await.map_err(&failed)?;
    let limits = manager.limits().await.map_err(&failed)?;
    if args.json {
        let stale: Vec<_> = stale
            .iter()
            .map(|w| json!({ "host": w.host, "pid": w.pid, "heartbeat_age_secs": w.silent_secs }))
            .collect();
        let doc = json!({
            "datasets": datasets,
            "workers": workers,
            "stale_workers": stale,
            "unhandled_kinds": unhandled,
            "schedules": schedules,
            "limits": limits,
        });
        return writeln!(out, "{doc:#}").map_err(io_error);
    }
    let rows: Vec<Vec<String>> = datasets
        .iter()
        .map(|d| {
            let rate = match (d.rate_limit, d.adaptive, d.effective_rate) {
                (Some(n), true, Some(e)) => {
                    format!(
                        "{n}/{}s adaptive, now {}",
                        d.rate_window_secs,
                        rate_figure(e)
                    )
                }
                (Some(n), _, _) => format!("{n}/{}s", d.rate_window_secs),
                (None, _, _) => "-".into(),
            };
            // Held by the upstream: its own throttle, or a shared limit's.
            let held_by = limits
                .iter()
                .filter(|l| l.datasets.contains(&d.dataset_id))
                .filter_map(|l| Some((l.throttled_until.filter(|_| l.throttled)?, &l.limit_id)))
                .max();
            let state = match (d.paused, d.throttled_until.filter(|_| d.throttled), held_by) {
                (true, _, _) => "paused".to_string(),
                (false, Some(t), _) => format!("throttled until {} (upstream)", until(t)),
                (false, None, Some((t, l))) => {
                    format!(
                        "throttled until {} (limit {})",
                        until(t),
                        printable(l, CELL_MAX)
                    )
                }
                _ => "active".to_string(),
            };
            vec![
                d.dataset_id.clone(),
                d.queued.to_string(),
                d.running.to_string(),
                d.succeeded.to_string(),
                d.failed.to_string(),
                d.cancelled.to_string(),
                d.oldest_ready_age_secs
                    .map_or("-".into(), |s| format!("{s:.1}s")),
                rate,
                d.max_concurrency.map_or("-".into(), |n| n.to_string()),
                state,
            ]
        })
        .collect();
    let mut text = table(
        &[
            "DATASET",
            "QUEUED",
            "RUNNING",
            "SUCCEEDED",
            "FAILED",
            "CANCELLED",
            "OLDEST READY",
            "RATE",
            "MAX RUNNING",
            "STATE",
        ],
        &rows,
    );
    let rows: Vec<Vec<String>> = workers
        .iter()
        .map(|w| {
            vec![
                w.host.clone(),
                w.pid.to_string(),
                format!("{}/{}", w.running, w.concurrency),
                format!(
                    "{:.1}s ago (every {}s)",
                    w.heartbeat_age_secs, w.heartbeat_every_secs
                ),
                w.kinds.join(","),
            ]
        })
        .collect();
    if !limits.is_empty() {
        let rows: Vec<Vec<String>> = limits
            .iter()
            .map(|l| {
                let rates: Vec<String> = l
                    .rates
                    .iter()
                    .map(|r| format!("{}/{}/{}s", r.used, r.rate_limit, r.rate_window_secs))
                    .collect();
                vec![
                    l.limit_id.clone(),
                    if rates.is_empty() {
                        "-".into()
                    } else {
                        rates.join(" ")
                    },
                    l.max_concurrency
                        .map_or("-".into(), |c| format!("{}/{c}", l.running)),
                    match (l.throttled_until.filter(|_| l.throttled), l.effective_rate) {
                        (Some(t), _) => format!("throttled until {} (upstream)", until(t)),
                        (None, Some(e)) => format!("adaptive, now {}", rate_figure(e)),
                        (None, None) => "active".into(),
                    },
                    l.datasets.join(","),
                ]
            })
            .collect();
        text.push_str("\nshared limits:\n");
        text.push_str(&table(
            &[
                "LIMIT",
                "USED/RATE/WINDOW",
                "RUNNING/CAP",
                "STATE",
                "DATASETS",
            ],
            &rows,
        ));
    }
    text.push_str(&format!("\nlive workers: {}\n", workers.len()));
    if !workers.is_empty() {
        text.push_str(&table(
            &["HOST", "PID", "RUNNING", "HEARTBEAT", "KINDS"],
            &rows,
        ));
    }
    if !stale.is_empty() {
        let list: Vec<String> = stale
            .iter()
            .map(|w| {
                format!(
                    "{}:{} (last beat {:.0}s ago)",
                    printable(&w.host, CELL_MAX),
                    w.pid,
                    w.silent_secs
                )
            })
            .collect();
        text.push_str(&format!(
            "\nstale workers (no heartbeat for two intervals; their tasks come back when their leases expire): {}\n",
            list.join(", ")
        ));
    }
    if !unhandled.is_empty() {
        text.push_str(&format!(
            "\nqueued kinds no live worker handles: {}\n",
            unhandled
                .iter()
                .map(|k| printable(k, CELL_MAX))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if !schedules.is_empty() {
        let paused = schedules.iter().filter(|s| s.paused).count();
        let failing: Vec<&str> = schedules
            .iter()
            .filter(|s| s.error.is_some())
            .map(|s| s.schedule_id.as_str())
            .collect();
        let next = schedules
            .iter()
            .filter(|s| !s.paused && s.error.is_none())
            .filter_map(|s| s.next_run_at.map(|t| (t, s.schedule_id.as_str())))
            .min();
        text.push_str(&format!(
            "\nschedules: {} ({paused} paused){}{} — `syncq schedule list` for each\n",
            schedules.len(),
            next.map_or(String::new(), |(t, id)| format!(
                ", next tick {} ({id})",
                t.format("%Y-%m-%d %H:%M:%S")
            )),
            if failing.is_empty() {
                String::new()
            } else {
                format!(", cannot tick: {}", failing.join(", "))
            },
        ));
    }
    write!(out, "{text}").map_err(io_error)
}

/// `syncq tasks`.
#[derive(Debug, Args)]
pub struct TasksArgs {
    /// Only this dataset.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Only this status.
    #[arg(long)]
    pub status: Option<TaskStatus>,
    /// At most this many (newest first).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub limit: u32,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn tasks(
    db: &Db,
    args: TasksArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    if let Some(dataset) = &args.dataset {
        require_dataset(db, dataset, Unknown::Refuse).await?;
    }
    let filter = TaskFilter {
        dataset_id: args.dataset.clone(),
        status: args.status,
        limit: Some(args.limit),
        ..TaskFilter::default()
    };
    let tasks = manager(db)
        .tasks(&filter)
        .await
        .map_err(db_error("cannot list tasks"))?;
    if args.json {
        return writeln!(out, "{:#}", json!(tasks)).map_err(io_error);
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t.id.to_string(),
                t.dataset_id.clone(),
                t.kind.clone(),
                t.status.to_string(),
                format!("{}/{}", t.attempts, t.max_attempts),
                t.run_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                match (t.last_error.as_deref(), t.status.as_str()) {
                    (None, _) => String::new(),
                    // It succeeded after all: the error is an earlier attempt's.
                    (Some(e), "succeeded") => format!("(earlier attempt) {}", truncate(e, 44)),
                    (Some(e), _) => truncate(e, 60),
                },
            ]
        })
        .collect();
    write!(
        out,
        "{}",
        table(
            &[
                "ID",
                "DATASET",
                "KIND",
                "STATUS",
                "ATTEMPTS",
                "RUN AT",
                "LAST ERROR"
            ],
            &rows
        )
    )
    .map_err(io_error)
}

/// `syncq show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The task.
    pub id: TaskId,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn show(
    db: &Db,
    args: ShowArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let failed = db_error("cannot read the task");
    let manager = manager(db);
    let Some(task) = manager.task(args.id).await.map_err(&failed)? else {
        return Err(CliError::Usage(format!("no task with id {}", args.id)));
    };
    if args.json {
        let errors = manager.task_errors(args.id).await.map_err(&failed)?;
        let mut doc = json!(task);
        doc["errors"] = json!(errors);
        return writeln!(out, "{doc:#}").map_err(io_error);
    }
    // The latest SHOWN_ERRORS, oldest of them first; --json has them all.
    let (mut errors, total) = manager
        .task_errors_page(args.id, SHOWN_ERRORS, 0)
        .await
        .map_err(&failed)?;
    errors.reverse();
    let mut text = describe_task(&task);
    text.push_str(&format!("errors ({total}):\n"));
    if total > errors.len() as i64 {
        text.push_str(&format!(
            "  … {} earlier not shown (syncq show {} --json has them all)\n",
            total - errors.len() as i64,
            args.id
        ));
    }
    for e in &errors {
        text.push_str(&format!(
            "  attempt {} at {} by {}: {}\n",
            e.attempt,
            e.at.format("%Y-%m-%d %H:%M:%S%.3f"),
            printable(e.worker_id.as_deref().unwrap_or("-"), CELL_MAX),
            printable(&e.error, SHOWN_MAX)
        ));
    }
    write!(out, "{text}").map_err(io_error)
}

/// The most errors `syncq show` prints: the latest.
const SHOWN_ERRORS: u32 = 100;

/// The longest value `syncq show` prints (longer ones end in "…").
const SHOWN_MAX: usize = 4000;

fn describe_task(t: &TaskInfo) -> String {
    let time = |v: Option<chrono::DateTime<chrono::Utc>>| {
        v.map_or("-".to_string(), |t| {
            t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
        })
    };
    let json_or_dash = |v: &Option<serde_json::Value>| {
        v.as_ref()
            .map_or("-".to_string(), |v| printable(&v.to_string(), SHOWN_MAX))
    };
    let text = |v: &str| printable(v, SHOWN_MAX);
    format!(
        "task {}\n  dataset:    {}\n  kind:       {}\n  status:     {}{}\n  priority:   {}\n  attempts:   {}/{}{}\n  \
         unique key: {}\n  created:    {}\n  run at:     {}\n  started:    {}\n  finished:   {}\n  \
         locked by:  {}\n  lease till: {}\n  payload:    {}\n  checkpoint: {}\n  result:     {}\n  last error: {}\n{}",
        t.id,
        text(&t.dataset_id),
        text(&t.kind),
        t.status,
        if t.cancel_requested {
            " (cancel requested)"
        } else {
            ""
        },
        t.priority,
        t.attempts,
        t.max_attempts,
        // Snoozes are not attempts: said apart.
        match t.snoozes {
            0 => String::new(),
            1 => " (and 1 snooze)".to_string(),
            n => format!(" (and {n} snoozes)"),
        },
        text(t.unique_key.as_deref().unwrap_or("-")),
        time(Some(t.created_at)),
        time(Some(t.run_at)),
        time(t.started_at),
        time(t.finished_at),
        text(t.locked_by.as_deref().unwrap_or("-")),
        time(t.lease_expires_at),
        text(&t.payload.to_string()),
        json_or_dash(&t.checkpoint),
        json_or_dash(&t.result),
        match (t.last_error.as_deref(), t.status.as_str()) {
            (None, _) => "-".to_string(),
            (Some(e), "succeeded") => {
                format!("{} (an earlier attempt's; the last succeeded)", text(e))
            }
            (Some(e), _) => text(e),
        },
        // A value a JSON decoder refuses is shown as its text, and why.
        t.unreadable.as_deref().map_or(String::new(), |why| format!(
            "  unreadable: {} (shown as text)\n",
            text(why)
        )),
    )
}

fn truncate(s: &str, max: usize) -> String {
    let one_line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        format!("{}…", one_line.chars().take(max - 1).collect::<String>())
    }
}

/// The longest cell a table prints (longer ones end in "…").
const CELL_MAX: usize = 120;

/// Text a producer wrote, safe for an operator's terminal: control and
/// bidirectional-override characters shown escaped (`\u{1b}`), never
/// sent raw (an `ESC ]0;…` in a dataset id would retitle the terminal,
/// `ESC [2J` clear it), and at most `max` characters, then "…".
pub(super) fn printable(s: &str, max: usize) -> String {
    let mut out = String::new();
    let mut n = 0;
    for c in s.chars() {
        let hidden = c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        let piece = if hidden {
            c.escape_unicode().to_string()
        } else {
            c.to_string()
        };
        let len = piece.chars().count();
        if n + len > max {
            out.push('…');
            return out;
        }
        out.push_str(&piece);
        n += len;
    }
    out
}

/// A plain aligned table; every cell [`printable`], at most [`CELL_MAX`]
/// characters (a 65,536-character value once overflowed the width).
pub(super) fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|c| printable(c, CELL_MAX)).collect())
        .collect();
    let rows = &rows;
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// A throttle's end as `syncq status` and `resume` print it (UTC, to the
/// second).
pub(super) fn until(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%SZ").to_string()
}

/// An effective rate, to two decimals without trailing zeros.
pub(super) fn rate_figure(rate: f64) -> String {
    let s = format!("{rate:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// What holds a dataset back for the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum HeldBy {
    /// Its own throttle.
    Upstream,
    /// A shared limit's throttle, by name.
    Limit(String),
}

impl std::fmt::Display for HeldBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeldBy::Upstream => write!(f, "the upstream"),
            HeldBy::Limit(l) => write!(f, "shared limit {:?}", printable(l, CELL_MAX)),
        }
    }
}

/// The throttle in force on a dataset that ends last, and whose it is:
/// its own, or one of its shared limits'.
pub(super) async fn throttle_left(
    manager: &TaskQueueManager,
    dataset: &str,
) -> Result<Option<(chrono::DateTime<chrono::Utc>, HeldBy)>, CliError> {
    let failed = db_error("cannot read the dataset's throttle");
    // "Still throttled" by the database's clock (the rows' `throttled`).
    let own = manager
        .queue(dataset)
        .settings()
        .await
        .map_err(&failed)?
        .and_then(|s| s.throttled_until.filter(|_| s.throttled))
        .map(|t| (t, HeldBy::Upstream));
    let shared = manager
        .limits()
        .await
        .map_err(&failed)?
        .into_iter()
        .filter(|l| l.datasets.iter().any(|d| d == dataset))
        .filter_map(|l| {
            Some((
                l.throttled_until.filter(|_| l.throttled)?,
                HeldBy::Limit(l.limit_id),
            ))
        })
        .max_by_key(|(t, _)| *t);
    Ok(match (own, shared) {
        (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
        (a, b) => a.or(b),
    })
}

/// `syncq unthrottle NAME`: a dataset's throttle, a shared limit's, or
/// both when both are so named.
pub(super) async fn unthrottle(
    db: &Db,
    name: &str,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let failed = db_error("cannot lift the throttle");
    let manager = manager(db);
    let dataset = manager.queue(name).unthrottle().await.map_err(&failed)?;
    let limit = manager.unthrottle_limit(name).await.map_err(&failed)?;
    if dataset.is_none() && limit.is_none() {
        let known = manager.dataset_exists(name).await.map_err(&failed)?;
        if !known {
            return Err(CliError::Usage(format!(
                "no dataset or shared limit {:?}",
                printable(name, CELL_MAX)
            )));
        }
        // Tasks but no settings row yet: nothing can hold it.
        return writeln!(out, "{name:?} was not throttled").map_err(io_error);
    }
    if let Some(n) = limit {
        writeln!(
            out,
            "unthrottled shared limit {name:?} and the {n} dataset{} using it",
            if n == 1 { "" } else { "s" }
        )
        .map_err(io_error)?;
    }
    if let Some(d) = dataset {
        let mut line = if d.was_throttled || limit.is_some() {
            format!("unthrottled {name:?}")
        } else {
            format!("{name:?} was not throttled")
        };
        let still: Vec<String> = d
            .still_by
            .iter()
            .filter(|(l, _)| l != name)
            .map(|(l, t)| {
                format!(
                    "shared limit {:?} until {}",
                    printable(l, CELL_MAX),
                    until(*t)
                )
            })
            .collect();
        if !still.is_empty() {
            line.push_str(&format!(
                "; still throttled by {} (`syncq unthrottle LIMIT` lifts it)",
                still.join(", ")
            ));
        }
        writeln!(out, "{line}").map_err(io_error)?;
    }
    Ok(())
}
