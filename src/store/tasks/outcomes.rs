//! Ending an attempt: the fenced writes of SPEC §3, and checkpoints.
//!
//! Every statement here is fenced by `(id, runs, locked_by, status =
//! 'running')`: a worker that lost its lease matches nothing.

use serde_json::Value;
use sqlx::PgExecutor;
use std::time::Duration;

use crate::store::{secs, storable_message};
use crate::task::TaskId;

/// Longest throttle a rate-limited attempt sets (`TaskError::MAX_RETRY_AFTER`).
pub(crate) const MAX_THROTTLE: Duration = Duration::from_secs(24 * 60 * 60);

/// Stores a checkpoint for a task this worker holds. False: fenced out.
pub async fn save_checkpoint(
    db: impl PgExecutor<'_>,
    id: TaskId,
    runs: i32,
    worker_id: &str,
    checkpoint: &Value,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        r#"
        UPDATE syncq.tasks SET checkpoint = $4
        WHERE id = $1 AND runs = $2 AND locked_by = $3 AND status IN ('running', 'queued')
        "#,
        id.0,
        runs,
        worker_id,
        checkpoint,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Takes `n` permits for task `id` held by `worker_id` in run `runs`
/// (syncq.take_permit): `Some(0.0)` granted, `Some(secs)` no room yet (ask
/// again after that long), `None` the task is no longer this run's.
pub async fn take_permit(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    id: TaskId,
    runs: i32,
    n: i32,
) -> sqlx::Result<Option<f64>> {
    sqlx::query_scalar!(
        "SELECT syncq.take_permit($1, $2, $3, $4)",
        worker_id,
        id.0,
        runs,
        n
    )
    .fetch_one(db)
    .await
}

/// The holder's identity for a fenced write.
#[derive(Debug, Clone, Copy)]
pub struct Fence<'a> {
    /// The task.
    pub id: TaskId,
    /// Its `runs` when claimed.
    pub runs: i32,
    /// The holding worker.
    pub worker_id: &'a str,
}

/// What an attempt ended in, as the one writer of outcomes takes it
/// (SPEC §3; `crate::outcome` decides which from the handler's result).
#[derive(Debug, Clone)]
pub enum End {
    /// `succeeded`, the result stored.
    Succeed(Value),
    /// A counted failure: `queued` after `backoff` while attempts are left,
    /// else `failed`.
    Retry {
        /// The attempt's error.
        error: String,
        /// The wait before the next attempt.
        backoff: Duration,
    },
    /// `failed` at once.
    Fail(String),
    /// The upstream's rate limit, with its Retry-After: `queued` now,
    /// uncounted, the dataset and its shared limits throttled for `wait`
    /// (at most [`MAX_THROTTLE`]).
    Throttle {
        /// The attempt's error.
        error: String,
        /// How long the dataset is held back.
        wait: Duration,
    },
    /// The upstream's rate limit without a Retry-After: as `Throttle`,
    /// except that adaptive limits lower their rate instead of waiting
    /// `wait` (the pool's default).
    Slowdown {
        /// The attempt's error.
        error: String,
        /// How long a limit that is not adaptive is held back.
        wait: Duration,
    },
    /// The handler asked to run again after `wait`: `queued` then,
    /// uncounted, nothing throttled; past the bound of snoozes a counted
    /// failure with `error`.
    Snooze {
        /// How long until the task runs again.
        wait: Duration,
        /// The failure recorded when the task is past its bound of snoozes.
        error: String,
    },
    /// `queued` now, uncounted, the checkpoint kept; the error recorded if
    /// given.
    Release(Option<String>),
    /// `cancelled`, as the handler reported.
    Cancel,
    /// Not an end: the start of a task leased ahead whose handler has
    /// been running a while (`running`, the attempt counted).
    Start,
}

impl End {
    /// Its name in `syncq.complete_many`'s `p_ends`.
    fn as_str(&self) -> &'static str {
        match self {
            End::Succeed(_) => "succeed",
            End::Retry { .. } => "retry",
            End::Fail(_) => "fail",
            End::Throttle { .. } => "throttle",
            End::Slowdown { .. } => "slowdown",
            End::Snooze { .. } => "snooze",
            End::Release(_) => "release",
            End::Cancel => "cancel",
            End::Start => "start",
        }
    }
}

/// One attempt's end, for the task a worker holds under `runs`.
#[derive(Debug, Clone)]
pub struct Ended {
    /// The task.
    pub id: TaskId,
    /// Its `runs` when claimed: the fence.
    pub runs: i32,
    /// What the attempt ended in.
    pub end: End,
    /// For a task leased ahead whose start is not written yet: how long
    /// ago its handler began (written with this end). None: its start is
    /// written already, or its handler never began.
    pub began_ago: Option<Duration>,
}

/// Writes many attempts' outcomes, of any kinds, in one statement (one
/// commit): `syncq.complete_many`, the one writer of SPEC §3. Each row is
/// fenced on its own `(id, runs)` and the holder, so a task whose lease
/// was lost is left alone while the rest are written. A row locked
/// elsewhere (an operator's cancel in an open transaction) is waited for
/// at most 100 ms, then left out: the caller tells such rows from lost ones
/// (`still_held`) and writes them again. Returns the ids written. Atomic:
/// on error nothing was written. A task may appear once.
pub async fn complete_many(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    ended: &[Ended],
) -> sqlx::Result<Vec<TaskId>> {
    let mut sorted: Vec<&Ended> = ended.iter().collect();
    // One lock order for every writer of a batch: fewer deadlocks.
    sorted.sort_by_key(|e| e.id);
    let ids: Vec<i64> = sorted.iter().map(|e| e.id.0).collect();
    let runs: Vec<i32> = sorted.iter().map(|e| e.runs).collect();
    let ends: Vec<&str> = sorted.iter().map(|e| e.end.as_str()).collect();
    let results: Vec<Option<Value>> = sorted
        .iter()
        .map(|e| match &e.end {
            End::Succeed(v) => Some(v.clone()),
            _ => None,
        })
        .collect();
    let errors: Vec<Option<String>> = sorted
        .iter()
        .map(|e| match &e.end {
            End::Retry { error, .. }
            | End::Fail(error)
            | End::Throttle { error, .. }
            | End::Slowdown { error, .. }
            | End::Snooze { error, .. } => Some(storable_message(error).into_owned()),
            End::Release(error) => error.as_deref().map(|m| storable_message(m).into_owned()),
            End::Succeed(_) | End::Cancel | End::Start => None,
        })
        .collect();
    let waits: Vec<f64> = sorted
        .iter()
        .map(|e| match &e.end {
            End::Retry { backoff, .. } => secs(*backoff),
            End::Throttle { wait, .. } | End::Slowdown { wait, .. } | End::Snooze { wait, .. } => {
                secs((*wait).min(MAX_THROTTLE))
            }
            _ => 0.0,
        })
        .collect();
    let ago: Vec<Option<f64>> = sorted.iter().map(|e| e.began_ago.map(secs)).collect();
    sqlx::query_scalar!(
        r#"SELECT id AS "id!: TaskId" FROM syncq.complete_many($1, $2, $3, $4, $5, $6, $7, $8) AS s(id)"#,
        worker_id,
        &ids,
        &runs,
        &ends as &[&str],
        &results as &[Option<Value>],
        &errors as &[Option<String>],
        &waits,
        &ago as &[Option<f64>],
    )
    .fetch_all(db)
    .await
}

/// One outcome through [`complete_many`]. A row locked elsewhere is tried
/// again (for about 5 s) while this worker still holds the task. False:
/// fenced out.
pub async fn complete_one(
    db: impl PgExecutor<'_> + Copy,
    f: Fence<'_>,
    end: End,
) -> sqlx::Result<bool> {
    let row = [Ended {
        id: f.id,
        runs: f.runs,
        end,
        began_ago: None,
    }];
    for _ in 0..50 {
        if complete_many(db, f.worker_id, &row).await?.contains(&f.id) {
            return Ok(true);
        }
        if super::still_held(db, f.worker_id, &[f.id], &[f.runs])
            .await?
            .is_empty()
        {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(false)
}

/// An attempt that does not count: back to `queued` now, its checkpoint kept
/// (checkpoints are saved as they are made). Used for checkpoint/shutdown,
/// `Fatal` (whose message is recorded as `error`), and aborted handlers.
/// False: fenced out.
pub async fn release(
    db: impl PgExecutor<'_> + Copy,
    f: Fence<'_>,
    error: Option<&str>,
) -> sqlx::Result<bool> {
    complete_one(db, f, End::Release(error.map(str::to_string))).await
}
