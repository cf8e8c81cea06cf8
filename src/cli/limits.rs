//! `syncq limits`: limits shared by datasets (SPEC §2 Shared limits).

use std::io::Write;

use clap::Subcommand;
use serde_json::json;

use super::ops::printable;
use super::{CliError, io_error, lib_failure};
use crate::TaskQueueManager;
use crate::db::Db;
use crate::rate_limit::RateLimit;

/// `syncq limits …`.
#[derive(Debug, Subcommand)]
pub enum LimitsCommand {
    /// Create a shared limit, or replace its rates: e.g. `syncq limits set
    /// github-token --rate 5000/1h --rate 10/1s`. Datasets use it with
    /// `syncq limit D --uses github-token`.
    Set {
        /// The limit's name.
        name: String,
        /// Starts and permits per window, e.g. 10/1s; give one per window.
        #[arg(long, value_parser = parse_rate, required_unless_present = "concurrency")]
        rate: Vec<RateLimit>,
        /// Running tasks at once across every dataset using it (1 to 100000).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        concurrency: Option<u32>,
        /// `on`: its shortest window's rate learns the upstream's from 429s
        /// without Retry-After (lowered, then raised back; starts paced
        /// evenly); `off`: the configured rates only. Kept when not given.
        #[arg(long, value_parser = super::parse_on_off)]
        adaptive: Option<bool>,
    },
    /// Every shared limit: its windows' use now, throttle, datasets.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a shared limit (refused while a dataset uses it).
    Remove {
        /// The limit's name.
        name: String,
    },
}

fn parse_rate(s: &str) -> Result<RateLimit, String> {
    s.parse::<RateLimit>().map_err(|e| e.to_string())
}

pub(super) async fn run(
    db: &Db,
    command: LimitsCommand,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let manager = TaskQueueManager::new(db.clone());
    match command {
        LimitsCommand::Set {
            name,
            rate,
            concurrency,
            adaptive,
        } => {
            if adaptive == Some(true) && rate.is_empty() {
                return Err(CliError::Usage(
                    "--adaptive on needs a --rate to adapt".into(),
                ));
            }
            manager
                .set_limit_capped(&name, &rate, concurrency)
                .await
                .map_err(|e| lib_failure("cannot set the limit", e))?;
            if let Some(on) = adaptive {
                manager
                    .set_limit_adaptive(&name, on)
                    .await
                    .map_err(|e| lib_failure("cannot set the limit", e))?;
            }
            let mut parts: Vec<String> = rate.iter().map(ToString::to_string).collect();
            if let Some(n) = concurrency {
                parts.push(format!("at most {n} running"));
            }
            if adaptive == Some(true) {
                parts.push("adaptive".into());
            }
            writeln!(out, "limit {:?}: {}", name, parts.join(" and ")).map_err(io_error)
        }
        LimitsCommand::Remove { name } => {
            let removed =
                manager
                    .remove_limit(&name)
                    .await
                    .map_err(|e| match e.refused_reference() {
                        Some(why) => CliError::Usage(format!("cannot remove the limit: {why}")),
                        None => lib_failure("cannot remove the limit", e),
                    })?;
            if !removed {
                return Err(CliError::Usage(format!("no limit {name:?}")));
            }
            writeln!(out, "removed limit {name:?}").map_err(io_error)
        }
        LimitsCommand::List { json } => {
            let limits = manager
                .limits()
                .await
                .map_err(|e| lib_failure("cannot read the limits", e))?;
            if json {
                return writeln!(out, "{:#}", json!(limits)).map_err(io_error);
            }
            if limits.is_empty() {
                return writeln!(out, "no shared limit").map_err(io_error);
            }
            for l in &limits {
                let rates: Vec<String> = l
                    .rates
                    .iter()
                    .map(|r| format!("{}/{}s used {}", r.rate_limit, r.rate_window_secs, r.used))
                    .collect();
                let mut throttled = l
                    .throttled_until
                    .filter(|_| l.throttled)
                    .map_or(String::new(), |t| {
                        format!(", throttled until {} (upstream)", super::ops::until(t))
                    });
                if let Some(e) = l.effective_rate {
                    throttled.push_str(&format!(", adaptive, now {}", super::ops::rate_figure(e)));
                }
                let datasets: Vec<String> = l.datasets.iter().map(|d| printable(d, 120)).collect();
                let cap = l
                    .max_concurrency
                    .map_or(String::new(), |c| format!(", running {}/{c}", l.running));
                writeln!(
                    out,
                    "{}: {}{cap}{throttled}; used by {}",
                    printable(&l.limit_id, 120),
                    if rates.is_empty() {
                        "no rate".to_string()
                    } else {
                        rates.join(", ")
                    },
                    if datasets.is_empty() {
                        "no dataset".to_string()
                    } else {
                        datasets.join(", ")
                    }
                )
                .map_err(io_error)?;
            }
            Ok(())
        }
    }
}
