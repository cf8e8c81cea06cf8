//! The demo's live display and its closing summary, read back from the
//! database.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::{CliError, io_error};
use crate::store::demo::{Progress, Summary};

/// Live progress: bars on a terminal, a line per dataset every 2 s
/// otherwise.
pub(super) struct Display {
    multi: Option<MultiProgress>,
    bars: Vec<ProgressBar>,
    last_lines: Option<tokio::time::Instant>,
}

impl Display {
    pub(super) fn new() -> Display {
        let multi = std::io::stdout()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        Display {
            multi,
            bars: Vec::new(),
            last_lines: None,
        }
    }

    pub(super) fn update(
        &mut self,
        rows: &[Progress],
        out: &mut (dyn Write + Send),
    ) -> Result<(), CliError> {
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

    pub(super) fn note(&self, text: &str, out: &mut (dyn Write + Send)) -> Result<(), CliError> {
        match &self.multi {
            Some(multi) => {
                let _ = multi.println(format!("  * {text}"));
                Ok(())
            }
            None => writeln!(out, "* {text}").map_err(io_error),
        }
    }

    pub(super) fn finish(&self) {
        for bar in &self.bars {
            bar.finish();
        }
    }
}

pub(super) fn describe(row: &Progress) -> String {
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

pub(super) fn write_summary(
    rows: &[Summary],
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
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
