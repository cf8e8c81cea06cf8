//! The scheduler every worker process runs: enqueues each due tick of
//! `syncq.schedules` once across the fleet (see [`crate::schedule`]).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::db::Db;
use crate::schedule::{Ticks, due};
use crate::store;

/// The longest the scheduler sleeps without looking (schedules changed by
/// SQL behind a pooler, where no NOTIFY is heard).
const LOOK_AT_LEAST_EVERY: Duration = Duration::from_secs(60);

/// The scheduler of one worker process: sleeps until the earliest
/// `next_run_at` (or a change is notified), then enqueues what is due.
pub(crate) async fn schedule_loop(
    db: Db,
    changed: std::sync::Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    loop {
        let wait = match pass(&db).await {
            Ok(wait) => wait,
            Err(e) => {
                warn!(error = %e, "the scheduler's pass failed; trying again");
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait.min(LOOK_AT_LEAST_EVERY)) => {}
            _ = changed.notified() => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One pass: if a schedule is due, enqueue its ticks. Returns how long
/// until the next one is due.
async fn pass(db: &Db) -> sqlx::Result<Duration> {
    let until = store::schedules::next_due_in(db).await?;
    match until {
        Some(secs) if secs <= 0.0 => {}
        Some(secs) => return Ok(Duration::from_secs_f64(secs)),
        None => return Ok(LOOK_AT_LEAST_EVERY),
    }
    let mut tx = db.begin().await?;
    let (now, rows) = store::schedules::take_due(tx.ex()).await?;
    for row in rows {
        let ticks = match Ticks::new(row.cron.as_deref(), row.every, &row.timezone) {
            Ok(t) => t,
            Err((field, message)) => {
                warn!(schedule = %row.schedule_id, field, error = %message, "schedule cannot tick");
                store::schedules::set_error(
                    tx.ex(),
                    &row.schedule_id,
                    &format!("{field}: {message}"),
                )
                .await?;
                continue;
            }
        };
        let Some(from) = row.next_run_at else {
            // New, or its timing changed: the first tick after now.
            let next = ticks.next_after(now);
            store::schedules::advance(tx.ex(), &row.schedule_id, next, None, None, 0).await?;
            continue;
        };
        let due = due(&ticks, from, now, row.catch_up);
        let mut skipped = due.missed;
        let mut last_task = None;
        for tick in &due.enqueue {
            if !row.overlap && store::schedules::has_active_task(tx.ex(), &row.schedule_id).await? {
                skipped += 1;
                continue;
            }
            if let Some(id) = store::schedules::enqueue_tick(tx.ex(), &row, *tick).await? {
                last_task = Some(id);
            }
        }
        if due.enqueue.len() > 1 || due.missed > 0 {
            info!(schedule = %row.schedule_id, ticks = due.enqueue.len(), skipped, "schedule caught up");
        }
        debug!(schedule = %row.schedule_id, tick = %due.latest, next = ?due.next, "schedule ticked");
        store::schedules::advance(
            tx.ex(),
            &row.schedule_id,
            due.next,
            Some(due.latest),
            last_task,
            i64::try_from(skipped).unwrap_or(i64::MAX),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(Duration::ZERO)
}
