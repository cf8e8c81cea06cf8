//! The maintenance sweep every process runs: rescue, prune, vacuum.

use crate::maintenance::pruner::Pruner;
use crate::maintenance::rescuer::Rescuer;
use crate::maintenance::vacuumer::Vacuumer;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use super::{Event, Shared};

/// The maintenance sweep of every process. Every `rescue_interval` it
/// takes back tasks whose holders went silent. The tidying — pruning old
/// finished tasks, the rate log and dead workers, and the vacuum check —
/// runs when this process has finished tasks since it last tidied (or is
/// behind), and otherwise only every [`IDLE_TIDY_EVERY`]: an idle fleet
/// costs the database next to nothing.
pub(super) async fn rescue_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let rescuer = Rescuer::new(shared.config.rescue_interval);
    let pruner = Pruner::new(shared.config.retention);
    let vacuumer = Vacuumer::default();
    let mut last_vacuum_check: Option<(tokio::time::Instant, u64)> = None;
    let mut last_tidy: Option<(tokio::time::Instant, u64)> = None;
    let mut behind = false;
    loop {
        // A pruner that is behind (a fast drain finishes more tasks per
        // interval than one sweep deletes) sweeps again soon, so the table
        // stays bounded.
        let delay = if behind {
            Duration::from_millis(100)
        } else {
            rescuer.next_delay()
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return,
        }
        match rescuer.run_once(&shared.db).await {
            Ok(rescued) if !rescued.is_empty() => {
                for task in rescued {
                    shared.emit(Event::Rescued { task_id: task.id });
                }
                shared.wake.notify_one();
            }
            Ok(_) => {}
            Err(e) => shared.outage.failed("rescuing expired leases", &e),
        }
        let finished = shared.finished.load(std::sync::atomic::Ordering::Relaxed);
        let due = |last: Option<(tokio::time::Instant, u64)>, busy_every: Duration| match last {
            None => true,
            Some((at, seen)) => {
                at.elapsed() >= IDLE_TIDY_EVERY || (seen != finished && at.elapsed() >= busy_every)
            }
        };
        if behind || due(last_tidy, Duration::ZERO) {
            last_tidy = Some((tokio::time::Instant::now(), finished));
            behind = match pruner.run_once(&shared.db).await {
                Ok(report) => report.more,
                Err(e) => {
                    shared.outage.failed("pruning", &e);
                    false
                }
            };
        }
        if shared.config.vacuum && due(last_vacuum_check, Duration::from_secs(1)) {
            last_vacuum_check = Some((tokio::time::Instant::now(), finished));
            if let Err(e) = vacuumer.run_once(&shared.db, shared.direct.as_ref()).await {
                shared.outage.failed("vacuuming", &e);
            }
        }
    }
}

/// How often an idle process (one that finished no task since) prunes and
/// checks for vacuuming.
pub(super) const IDLE_TIDY_EVERY: Duration = Duration::from_secs(60);
