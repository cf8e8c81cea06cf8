//! Handing tasks out: the claim (`syncq.claim`, docs/claim.md) and what a
//! claimer asks around it — when work is next due, what is left.

use sqlx::PgExecutor;
use std::time::Duration;

use crate::store::{ids_of, secs};
use crate::task::{ClaimedTask, TaskId};
use chrono::{DateTime, Utc};
use serde_json::Value;

/// Claims up to `limit` ready tasks of the given kinds for `worker_id`,
/// taking turns across datasets and honouring each dataset's pause,
/// throttle, concurrency cap and rate limit. The heart of syncq: the SQL is
/// `syncq.claim()`, `src/store/sql/functions/claim.sql`, explained in
/// `docs/claim.md`. One round trip. Datasets in `skip` are left out (a
/// worker sets aside a dataset whose claim fails, see [`crate::pool`]).
pub async fn claim(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    kinds: &[String],
    datasets: Option<&[String]>,
    skip: &[String],
    limit: i64,
    lease: Duration,
) -> sqlx::Result<Vec<ClaimedTask>> {
    let limit = i32::try_from(limit).unwrap_or(i32::MAX);
    sqlx::query_as!(
        ClaimedTask,
        r#"
        SELECT id AS "id!: TaskId", dataset_id AS "dataset_id!", kind AS "kind!", payload AS "payload!",
               priority AS "priority!", attempts AS "attempts!", max_attempts AS "max_attempts!",
               runs AS "runs!", checkpoint, created_at AS "created_at!",
               started_at AS "started_at!", snoozes AS "snoozes!"
        FROM syncq.claim($1, $2, $3, $4, $5, $6)
        "#,
        worker_id,
        kinds,
        datasets,
        skip,
        limit,
        secs(lease),
    )
    .fetch_all(db)
    .await
}

/// One task of a claim that leases ahead ([`claim_ahead`]).
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The task as claimed. For one leased ahead, `attempts` and
    /// `started_at` are still its last attempt's until its handler begins
    /// (its start is written by [`complete_many`](super::complete_many)).
    pub task: ClaimedTask,
    /// Started by the claim (an attempt, `running`); otherwise leased
    /// ahead (`queued` in this worker's name, not an attempt).
    pub started: bool,
    /// Its payload or checkpoint cannot be decoded here, and why: the task
    /// fails as invalid without a handler.
    pub unreadable: Option<String>,
}

/// Claims as [`claim`] does, but starts only up to `start` tasks of
/// limited datasets (the slots held free for them); the tasks of unlimited
/// datasets, up to `limit` in all, are leased ahead without being started:
/// they stay `queued` in this worker's name, under `lease`, until their
/// start is written ([`End::Start`](super::End::Start) or with their end)
/// or [`give_back`] returns them (docs/claim.md, "Leased ahead").
#[allow(clippy::too_many_arguments)]
pub async fn claim_ahead(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    kinds: &[String],
    datasets: Option<&[String]>,
    skip: &[String],
    limit: usize,
    start: usize,
    lease: Duration,
) -> sqlx::Result<Vec<Claimed>> {
    let limit = i32::try_from(limit).unwrap_or(i32::MAX);
    let start = i32::try_from(start).unwrap_or(i32::MAX);
    let rows = sqlx::query!(
        r#"
        SELECT id AS "id!: TaskId", dataset_id AS "dataset_id!", kind AS "kind!", payload::text AS "payload!",
               priority AS "priority!", attempts AS "attempts!", max_attempts AS "max_attempts!",
               runs AS "runs!", checkpoint::text AS checkpoint, created_at AS "created_at!",
               started_at, started AS "started!", snoozes AS "snoozes!"
        FROM syncq.claim($1, $2, $3, $4, $5, $6, $7)
        "#,
        worker_id,
        kinds,
        datasets,
        skip,
        limit,
        secs(lease),
        start,
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            // Read here, row by row: a value this process cannot decode
            // (valid jsonb nested past serde_json's 128 levels, a number
            // past f64) fails its own task, not the claim of every task.
            let (payload, checkpoint, unreadable) = read_json(&r.payload, r.checkpoint.as_deref());
            Claimed {
                task: ClaimedTask {
                    id: r.id,
                    dataset_id: r.dataset_id,
                    kind: r.kind,
                    payload,
                    priority: r.priority,
                    attempts: r.attempts,
                    max_attempts: r.max_attempts,
                    runs: r.runs,
                    checkpoint,
                    created_at: r.created_at,
                    // A task leased ahead that never ran has no start yet; its
                    // start replaces this.
                    started_at: r.started_at.unwrap_or(r.created_at),
                    snoozes: r.snoozes,
                },
                started: r.started,
                unreadable,
            }
        })
        .collect())
}

/// A claimed task's payload and checkpoint, decoded from their text; when
/// one cannot be, why (naming the column), the payload then `null`.
fn read_json(payload: &str, checkpoint: Option<&str>) -> (Value, Option<Value>, Option<String>) {
    let payload = match serde_json::from_str(payload) {
        Ok(v) => v,
        Err(e) => {
            return (
                Value::Null,
                None,
                Some(format!("payload: cannot be read: {e}")),
            );
        }
    };
    match checkpoint.map(serde_json::from_str::<Value>) {
        None => (payload, None, None),
        Some(Ok(v)) => (payload, Some(v), None),
        Some(Err(e)) => (
            payload,
            None,
            Some(format!("checkpoint: cannot be read: {e}")),
        ),
    }
}

/// Gives back tasks this worker leased ahead and will not start
/// (`syncq.give_back`): claimable again at once, uncounted, and idle
/// workers woken. Returns how many were given back.
pub async fn give_back(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    ids: &[TaskId],
    runs: &[i32],
) -> sqlx::Result<usize> {
    let back = sqlx::query_scalar!(
        r#"SELECT id AS "id!" FROM syncq.give_back($1, $2, $3) AS g(id)"#,
        worker_id,
        &ids_of(ids),
        runs,
    )
    .fetch_all(db)
    .await?;
    Ok(back.len())
}

/// Claims one queued task by id, whatever its dataset's turn, limits or
/// `run_at`: for `syncq::testing`, which runs a handler against a chosen
/// task. None if it is not queued.
pub async fn claim_by_id(
    db: impl PgExecutor<'_>,
    id: TaskId,
    worker_id: &str,
    lease: Duration,
) -> sqlx::Result<Option<ClaimedTask>> {
    sqlx::query_as!(
        ClaimedTask,
        r#"
        UPDATE syncq.tasks
        SET status = 'running', attempts = attempts + 1, runs = runs % 2147483647 + 1, locked_by = $2,
            lease_expires_at = clock_timestamp() + make_interval(secs => $3),
            started_at = clock_timestamp(), finished_at = NULL
        WHERE id = $1 AND status = 'queued'
        RETURNING id AS "id: TaskId", dataset_id, kind, payload, priority, attempts, max_attempts, runs,
                  checkpoint, created_at, started_at AS "started_at!", snoozes
        "#,
        id.0,
        worker_id,
        secs(lease),
    )
    .fetch_optional(db)
    .await
}

/// How long until a claim for these kinds may succeed: `Some(ZERO)` when a
/// dataset is claimable now (an empty claim lost a race for its lock), the
/// wait for the earliest throttle, rate budget or delayed task otherwise,
/// `None` when there is nothing to wait for but new work.
pub async fn next_claim_in(
    db: impl PgExecutor<'_>,
    kinds: &[String],
    datasets: Option<&[String]>,
    skip: &[String],
) -> sqlx::Result<Option<Duration>> {
    let secs = sqlx::query_scalar!(
        r#"SELECT syncq.next_claim_in($1, $2, $3) AS "secs""#,
        kinds,
        datasets,
        skip,
    )
    .fetch_one(db)
    .await?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0))))
}

/// Moves the readiness producers appended into the dataset rows (the
/// claim's step 0, `syncq.absorb_signals()`), in a statement of its own.
/// Returns the signals absorbed.
pub async fn absorb_signals(db: impl PgExecutor<'_>) -> sqlx::Result<i32> {
    sqlx::query_scalar!(r#"SELECT syncq.absorb_signals() AS "absorbed!""#)
        .fetch_one(db)
        .await
}

/// The running tasks held in this worker's name, with their `runs`: after
/// a claim whose answer was lost, those no handler runs are handed back.
pub async fn running_as(
    db: impl PgExecutor<'_>,
    worker_id: &str,
) -> sqlx::Result<Vec<(TaskId, i32)>> {
    let rows = sqlx::query!(
        r#"
        SELECT id, runs FROM syncq.tasks
        WHERE status IN ('running', 'queued') AND locked_by = $1
        "#,
        worker_id,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (TaskId(r.id), r.runs)).collect())
}

/// The datasets a claim of these kinds would pick first, in turn order:
/// step 1 of `syncq.claim()`, read from the same rule
/// (`syncq.claimable_datasets`, `src/store/sql/functions/claimable_datasets.sql`), so the
/// dataset that makes claims fail is among them.
pub async fn claim_candidates(
    db: impl PgExecutor<'_>,
    kinds: &[String],
    datasets: Option<&[String]>,
    skip: &[String],
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        r#"
        SELECT d.dataset_id AS "dataset_id!"
        FROM syncq.claimable_datasets($1, $2, $3) d
        ORDER BY d.last_claimed_at NULLS FIRST, d.served_at NULLS FIRST, d.dataset_id
        LIMIT $4
        "#,
        kinds,
        datasets,
        skip,
        limit,
    )
    .fetch_all(db)
    .await
}

/// What is left for a draining worker (`exit_when_idle`): tasks of these
/// kinds and datasets running anywhere, queued and claimable within
/// `horizon_secs` (ready, or delayed or throttled until no later than
/// that; rate budgets free within their window, so their tasks count),
/// and the ones that will not be: in paused datasets, or due later.
#[derive(Debug, Clone, PartialEq)]
pub struct Leftover {
    pub running: i64,
    pub soon: i64,
    pub paused: i64,
    pub paused_datasets: Vec<String>,
    pub later: i64,
    pub later_from: Option<DateTime<Utc>>,
}

/// See [`Leftover`].
pub async fn leftover(
    db: impl PgExecutor<'_>,
    kinds: &[String],
    datasets: Option<&[String]>,
    horizon_secs: f64,
) -> sqlx::Result<Leftover> {
    let r = sqlx::query!(
        r#"
        WITH left_ AS (
            SELECT t.status, t.dataset_id, coalesce(d.paused, false) AS paused,
                   greatest(t.run_at, coalesce(d.throttled_until, t.run_at)) AS due
            FROM syncq.tasks t LEFT JOIN syncq.datasets d ON d.dataset_id = t.dataset_id
            -- The live tasks: queued without a holder (tasks_claim_idx)
            -- and held (tasks_held_idx), never the finished rows.
            WHERE ((t.status = 'queued' AND t.locked_by IS NULL)
                   OR (t.locked_by IS NOT NULL AND t.status IN ('queued', 'running')))
              AND t.kind = ANY ($1)
              AND ($2::text[] IS NULL OR t.dataset_id = ANY ($2))
              AND NOT (t.status = 'queued' AND t.cancel_requested)
        )
        SELECT count(*) FILTER (WHERE status = 'running') AS "running!",
               count(*) FILTER (WHERE status = 'queued' AND NOT paused
                                  AND due <= now() + make_interval(secs => $3)) AS "soon!",
               count(*) FILTER (WHERE status = 'queued' AND paused) AS "paused!",
               coalesce(array_agg(DISTINCT dataset_id) FILTER (WHERE status = 'queued' AND paused),
                        '{}') AS "paused_datasets!",
               count(*) FILTER (WHERE status = 'queued' AND NOT paused
                                  AND due > now() + make_interval(secs => $3)) AS "later!",
               min(due) FILTER (WHERE status = 'queued' AND NOT paused
                                  AND due > now() + make_interval(secs => $3)) AS later_from
        FROM left_
        "#,
        kinds,
        datasets,
        horizon_secs,
    )
    .fetch_one(db)
    .await?;
    Ok(Leftover {
        running: r.running,
        soon: r.soon,
        paused: r.paused,
        paused_datasets: r.paused_datasets,
        later: r.later,
        later_from: r.later_from,
    })
}

/// Repairs `ready_at` of datasets marked ready that have no ready task
/// (`syncq.refresh_ready()`, `src/store/sql/functions/refresh_ready.sql`); returns how many.
pub async fn refresh_ready(
    db: impl PgExecutor<'_>,
    datasets: Option<&[String]>,
) -> sqlx::Result<i32> {
    sqlx::query_scalar!(r#"SELECT syncq.refresh_ready($1) AS "repaired!""#, datasets)
        .fetch_one(db)
        .await
}
