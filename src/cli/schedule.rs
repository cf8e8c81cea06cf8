//! `syncq schedule`: periodic tasks (SPEC §5).

use std::io::Write;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;

use super::{CliError, io_error, lib_failure};
use crate::TaskQueueManager;
use crate::db::Db;
use crate::schedule::{Schedule, Timing};

/// `syncq schedule …`.
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Create (or replace) a schedule: one task per tick, enqueued once
    /// across the fleet by the workers.
    Add(AddArgs),
    /// Every schedule: next and last run, the last task's status, skipped ticks.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a schedule (its tasks stay).
    Remove {
        /// The schedule.
        name: String,
    },
    /// Stop a schedule's ticks (no catch-up when resumed).
    Pause {
        /// The schedule.
        name: String,
    },
    /// Let a paused schedule tick again, from its next tick after now.
    Resume {
        /// The schedule.
        name: String,
    },
}

/// `syncq schedule add`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("timing").required(true).args(["cron", "every"])))]
pub struct AddArgs {
    /// The schedule's name.
    pub name: String,
    /// The dataset its tasks go to.
    #[arg(long)]
    pub dataset: String,
    /// The kind of its tasks.
    #[arg(long)]
    pub kind: String,
    /// A cron expression: 5 fields, or 6 with seconds first, or @hourly,
    /// @daily, … (in --timezone).
    #[arg(long)]
    pub cron: Option<String>,
    /// An interval instead, e.g. 15m (1s to 100 years).
    #[arg(long, value_parser = parse_every)]
    pub every: Option<Duration>,
    /// The payload of each tick's task, as JSON.
    #[arg(long, default_value = "{}", value_parser = super::parse_json)]
    pub payload: serde_json::Value,
    /// The IANA time zone the cron expression is read in.
    #[arg(long, default_value = "UTC")]
    pub timezone: String,
    /// Ticks missed while no worker ran are dropped instead of coalesced
    /// into one catch-up task.
    #[arg(long)]
    pub no_catch_up: bool,
    /// Enqueue a tick even while the previous task is still queued or running.
    #[arg(long)]
    pub overlap: bool,
}

fn parse_every(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 15m, 1h, 30s)"))?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(36_500 * 86_400) {
        return Err("must be between 1s and 100 years".into());
    }
    Ok(d)
}

pub(super) async fn run(
    db: &Db,
    command: ScheduleCommand,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let manager = TaskQueueManager::new(db.clone());
    match command {
        ScheduleCommand::Add(args) => {
            let timing = match (args.cron, args.every) {
                (Some(cron), _) => Timing::Cron(cron),
                (None, Some(every)) => Timing::Every(every),
                (None, None) => return Err(CliError::Usage("give --cron or --every".into())),
            };
            let mut schedule = Schedule::new(&args.name, &args.dataset, &args.kind, timing)
                .payload(args.payload)
                .timezone(args.timezone);
            schedule.catch_up = !args.no_catch_up;
            schedule.overlap = args.overlap;
            manager
                .schedule(schedule)
                .await
                .map_err(|e| lib_failure("cannot save the schedule", e))?;
            writeln!(out, "schedule {:?} saved", args.name).map_err(io_error)
        }
        ScheduleCommand::List { json } => {
            let all = manager
                .schedules()
                .await
                .map_err(|e| lib_failure("cannot list the schedules", e))?;
            if json {
                return writeln!(out, "{:#}", json!(all)).map_err(io_error);
            }
            let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
                t.map_or("-".to_string(), |t| {
                    t.format("%Y-%m-%d %H:%M:%S").to_string()
                })
            };
            let rows: Vec<Vec<String>> = all
                .iter()
                .map(|s| {
                    vec![
                        s.schedule_id.clone(),
                        s.dataset_id.clone(),
                        s.kind.clone(),
                        match (&s.cron, s.every_secs) {
                            (Some(c), _) => format!("{c} ({})", s.timezone),
                            (None, Some(e)) => format!("every {e}s"),
                            _ => "-".into(),
                        },
                        match (&s.error, s.paused) {
                            (Some(e), _) => format!("error: {e}"),
                            (None, true) => "paused".into(),
                            (None, false) => time(s.next_run_at),
                        },
                        time(s.last_run_at),
                        match (s.last_task_id, &s.last_task_status) {
                            (Some(id), Some(status)) => format!("{id} {status}"),
                            (Some(id), None) => format!("{id} (pruned)"),
                            _ => "-".into(),
                        },
                        s.skipped_ticks.to_string(),
                    ]
                })
                .collect();
            write!(
                out,
                "{}",
                super::ops::table(
                    &[
                        "SCHEDULE",
                        "DATASET",
                        "KIND",
                        "WHEN",
                        "NEXT RUN",
                        "LAST RUN",
                        "LAST TASK",
                        "SKIPPED"
                    ],
                    &rows
                )
            )
            .map_err(io_error)
        }
        ScheduleCommand::Remove { name } => {
            let removed = manager
                .remove_schedule(&name)
                .await
                .map_err(|e| lib_failure("cannot remove the schedule", e))?;
            found(removed, &name)?;
            writeln!(out, "schedule {name:?} removed").map_err(io_error)
        }
        ScheduleCommand::Pause { name } => {
            let done = manager
                .pause_schedule(&name, true)
                .await
                .map_err(|e| lib_failure("cannot pause the schedule", e))?;
            found(done, &name)?;
            writeln!(out, "schedule {name:?} paused").map_err(io_error)
        }
        ScheduleCommand::Resume { name } => {
            let done = manager
                .pause_schedule(&name, false)
                .await
                .map_err(|e| lib_failure("cannot resume the schedule", e))?;
            found(done, &name)?;
            writeln!(out, "schedule {name:?} resumed").map_err(io_error)
        }
    }
}

fn found(yes: bool, name: &str) -> Result<(), CliError> {
    if yes {
        Ok(())
    } else {
        Err(CliError::Usage(format!("no schedule {name:?}")))
    }
}
