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

/// Most schedules one pass ticks before it looks at the time again.
const PASS_MOST: usize = 100;

/// One pass: enqueues the ticks of every due schedule, each in a
/// transaction of its own. A schedule whose tick cannot be enqueued — its
/// row holds something the tasks table refuses, or a trigger of the
/// operator's fails — is marked with the error (`error`, shown by
/// `syncq schedule list` and the dashboard) and left out until changed;
/// the others tick. Returns how long until the next one is due.
async fn pass(db: &Db) -> sqlx::Result<Duration> {
    let until = store::schedules::next_due_in(db).await?;
    match until {
        Some(secs) if secs <= 0.0 => {}
        Some(secs) => return Ok(Duration::from_secs_f64(secs)),
        None => return Ok(LOOK_AT_LEAST_EVERY),
    }
    // Schedules this pass failed on: not taken again before it ends.
    let mut failed: Vec<String> = Vec::new();
    for _ in 0..PASS_MOST {
        let mut tx = db.begin().await?;
        let Some((now, row)) = store::schedules::take_due(tx.ex(), &failed).await? else {
            tx.rollback().await?;
            return Ok(Duration::ZERO);
        };
        let id = row.schedule_id.clone();
        match tick(&mut tx, now, &row).await {
            Ok(()) => tx.commit().await?,
            Err(e) => {
                // The database is gone: the pass fails, and is retried.
                if crate::db::is_transient(&e) {
                    return Err(e);
                }
                let _ = tx.rollback().await;
                let message = format!("enqueueing its tick failed: {}", database_message(&e));
                warn!(schedule = %id, error = %message, "schedule cannot tick: marked, the others go on");
                store::schedules::set_error(db, &id, &message).await?;
                failed.push(id);
            }
        }
    }
    Ok(Duration::ZERO)
}

/// A database error's own message (and, for a constraint, its name).
fn database_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => match d.constraint() {
            Some(c) => format!("{} (constraint {c})", d.message()),
            None => d.message().to_string(),
        },
        e => e.to_string(),
    }
}

/// Enqueues the due ticks of one schedule, locked in `tx`, and moves it on.
async fn tick(
    tx: &mut crate::db::Tx,
    now: chrono::DateTime<chrono::Utc>,
    row: &store::schedules::DueRow,
) -> sqlx::Result<()> {
    let ticks = match Ticks::new(row.cron.as_deref(), row.every, &row.timezone) {
        Ok(t) => t,
        Err((field, message)) => {
            warn!(schedule = %row.schedule_id, field, error = %message, "schedule cannot tick");
            return store::schedules::set_error(
                tx.ex(),
                &row.schedule_id,
                &format!("{field}: {message}"),
            )
            .await;
        }
    };
    let Some(from) = row.next_run_at else {
        // New, or its timing changed: the first tick after now.
        let next = ticks.next_after(now);
        return store::schedules::advance(tx.ex(), &row.schedule_id, next, None, None, 0).await;
    };
    let due = due(&ticks, from, now, row.catch_up);
    let mut skipped = due.missed;
    let mut last_task = None;
    for tick in &due.enqueue {
        if !row.overlap && store::schedules::has_active_task(tx.ex(), &row.schedule_id).await? {
            skipped += 1;
            continue;
        }
        if let Some(id) = store::schedules::enqueue_tick(tx.ex(), row, *tick).await? {
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
    .await
}
