//! LISTEN: wake-ups on inserts, schedules changed, cancels heard at once.
//!
//! A notification is a hint to read the rows, never a command: anyone who
//! can connect may NOTIFY (SPEC §2 Privileges).

use crate::control::Command;
use crate::store;
use crate::task::TaskId;
use sqlx::postgres::{PgConnectOptions, PgListener};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Shared, retry_pause};

/// The channel an insert trigger notifies.
pub(crate) const CHANNEL_INSERTED: &str = "syncq_task_inserted";

/// The channel the cancel trigger notifies (payload: the task id).
pub(crate) const CHANNEL_CANCEL: &str = "syncq_cancel";

/// A dataset paused, throttled or given a limit (payload: its id, or
/// empty for any; `src/store/sql/triggers/datasets_held.sql`).
pub(crate) const CHANNEL_HELD: &str = "syncq_dataset_held";

/// The most dataset names held back at once; past it, every dataset's
/// tasks leased ahead are given back.
const HELD_NAMES: usize = 1000;

/// Schedules added or changed (`src/store/sql/triggers/schedules_changed.sql`).
pub(crate) const CHANNEL_SCHEDULES: &str = "syncq_schedules";

/// LISTEN for inserts (wake the dispatcher) and cancels (tell the handler).
/// Reconnects on failure; wakes the dispatcher after a reconnect in case a
/// notification was missed meanwhile.
pub(super) async fn listen_loop(
    shared: Arc<Shared>,
    options: PgConnectOptions,
    stop: CancellationToken,
) {
    let mut failures = 0u32;
    loop {
        // Raced against the stop: connecting during an outage can take
        // the whole acquire timeout.
        let connected = tokio::select! {
            connected = connect_listener(&options) => connected,
            _ = stop.cancelled() => return,
        };
        let mut listener = match connected {
            Ok(l) => {
                if failures > 0 {
                    info!("LISTEN re-established");
                }
                failures = 0;
                l
            }
            Err(e) => {
                failures += 1;
                let pause = retry_pause(failures, Duration::from_secs(5));
                if failures == 1 {
                    warn!(error = %e, "LISTEN failed: polling until it is back");
                } else {
                    debug!(error = %e, retry_in = ?pause, "LISTEN failed again");
                }
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = stop.cancelled() => return,
                }
            }
        };
        shared.wake.notify_one();
        loop {
            let notification = tokio::select! {
                n = listener.try_recv() => n,
                _ = stop.cancelled() => return,
            };
            match notification {
                // Anyone who can connect can NOTIFY: a hint to read the
                // rows, never a command (SPEC §2 Privileges).
                Ok(Some(n)) if n.channel() == CHANNEL_SCHEDULES => {
                    shared.schedules_changed.notify_one();
                }
                // A false hint only gives tasks leased ahead back to the
                // fleet.
                Ok(Some(n)) if n.channel() == CHANNEL_HELD => {
                    let mut given_back = shared.given_back();
                    if given_back.len() >= HELD_NAMES {
                        // A flood of names (anyone may NOTIFY): any dataset.
                        given_back.clear();
                        given_back.insert(String::new());
                    } else {
                        given_back.insert(n.payload().to_string());
                    }
                    drop(given_back);
                    shared.held_back.notify_one();
                }
                Ok(Some(n)) if n.channel() == CHANNEL_CANCEL => {
                    if let Ok(id) = n.payload().parse::<TaskId>()
                        && shared.holds(id)
                        && !shared.held().cancel_hinted(id)
                    {
                        shared.cancel_check.notify_one();
                    }
                }
                Ok(Some(_)) => shared.wake.notify_one(),
                // Connection lost: reconnect (and wake, in case we missed one).
                Ok(None) => {
                    shared.wake.notify_one();
                    continue;
                }
                Err(e) => {
                    debug!(error = %e, "LISTEN connection failed: reconnecting");
                    break;
                }
            }
        }
    }
}

/// Tells handlers whose task's row says `cancel_requested`, when a cancel
/// notification names a task this pool holds. One query answers for every
/// held task; a flood of notifications costs at most one query per
/// [`CANCEL_CHECK_EVERY`]. The heartbeat reads the same column, so a missed
/// notification delays a cancel by one heartbeat at most.
pub(super) async fn cancel_check_loop(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = shared.cancel_check.notified() => {}
            _ = stop.cancelled() => return,
        }
        let (ids, runs): (Vec<TaskId>, Vec<i32>) = shared
            .held()
            .iter()
            .filter(|(_, h)| !h.superseded)
            .map(|(key, _)| *key)
            .unzip();
        if !ids.is_empty() {
            match store::tasks::still_held(&shared.db, &shared.worker_id, &ids, &runs).await {
                Ok(held) => {
                    for task in held.into_iter().filter(|t| t.cancel_requested) {
                        shared.held().cancel_heard(task.id);
                        let _ = shared.commands.send(Command::Cancel(task.id));
                    }
                }
                Err(e) => warn!(error = %e, "reading cancel requests failed"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CANCEL_CHECK_EVERY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Shortest pause between two cancel checks.
pub(super) const CANCEL_CHECK_EVERY: Duration = Duration::from_millis(50);

pub(super) async fn connect_listener(options: &PgConnectOptions) -> sqlx::Result<PgListener> {
    // A pool of one of its own, as `PgListener::connect` makes: it only
    // serves reconnecting, and it keeps the session off the main pool
    // (which may go through a transaction-mode pooler).
    let session = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .max_lifetime(None)
        .idle_timeout(None)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options.clone())
        .await?;
    let mut listener = PgListener::connect_with(&session).await?;
    listener.ignore_pool_close_event(true);
    listener
        .listen_all([
            CHANNEL_INSERTED,
            CHANNEL_CANCEL,
            CHANNEL_SCHEDULES,
            CHANNEL_HELD,
        ])
        .await?;
    Ok(listener)
}
