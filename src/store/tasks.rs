//! Statements on `syncq.tasks` (and `syncq.task_errors`, written together).

use serde_json::Value;
use sqlx::PgExecutor;
use std::time::Duration;

use super::secs;

/// Longest throttle a rate-limited attempt sets (`TaskError::MAX_RETRY_AFTER`).
pub(crate) const MAX_THROTTLE: Duration = Duration::from_secs(24 * 60 * 60);
use super::storable_message;
use crate::task::{ClaimedTask, NewTask, RunAt, TaskId};

/// Inserts `tasks` in one statement and returns their ids in input order.
///
/// `id` is `GENERATED ALWAYS` (nobody may choose one), so ids are matched
/// to input rows afterwards: rows go in sorted by input position, and the
/// identity sequence hands out increasing values in that order, so the
/// k-th smallest id inserted belongs to the k-th input row inserted. A task
/// whose `(dataset_id, unique_key)` is already queued or running is not
/// inserted; its id is the existing task's — the one inserted earlier in
/// the same batch or the one already in the table. `None` remains only when
/// the conflicting row committed after this statement's snapshot; the
/// caller retries those.
pub async fn insert_many(
    db: impl PgExecutor<'_>,
    tasks: &[NewTask],
) -> sqlx::Result<Vec<Option<TaskId>>> {
    let n = tasks.len();
    let mut dataset_ids = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut run_ats = Vec::with_capacity(n);
    let mut delays = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut unique_keys = Vec::with_capacity(n);
    for t in tasks {
        dataset_ids.push(t.dataset_id.clone());
        kinds.push(t.kind.clone());
        payloads.push(t.payload.clone());
        priorities.push(t.priority);
        let (at, delay) = match t.run_at {
            RunAt::Now => (None, None),
            RunAt::After(d) => (None, Some(secs(d))),
            RunAt::At(at) => (Some(at), None),
        };
        run_ats.push(at);
        delays.push(delay);
        max_attempts.push(t.max_attempts);
        unique_keys.push(t.unique_key.clone());
    }
    if unique_keys.iter().all(Option::is_none) {
        // Without unique keys there is nothing to arbitrate: no ON CONFLICT,
        // whose speculative insertion per row cost most of the statement.
        let mut ids = sqlx::query_scalar!(
            r#"
            WITH input AS (
                SELECT i.*
                FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::int2[],
                            $5::timestamptz[], $6::float8[], $7::int4[])
                     WITH ORDINALITY AS i(dataset_id, kind, payload, priority, run_at, delay_secs,
                                          max_attempts, ord)
            ),
            inserted AS (
                INSERT INTO syncq.tasks (dataset_id, kind, payload, priority, run_at, max_attempts)
                SELECT dataset_id, kind, payload, priority,
                       coalesce(run_at, now() + make_interval(secs => coalesce(delay_secs, 0))),
                       max_attempts
                FROM input
                ORDER BY ord
                RETURNING id
            )
            SELECT id AS "id!" FROM inserted
            "#,
            &dataset_ids,
            &kinds,
            &payloads,
            &priorities,
            &run_ats as &[Option<chrono::DateTime<chrono::Utc>>],
            &delays as &[Option<f64>],
            &max_attempts,
        )
        .fetch_all(db)
        .await?;
        if ids.len() != n {
            return Err(sqlx::Error::Protocol(format!(
                "inserted {} tasks of {n}",
                ids.len()
            )));
        }
        ids.sort_unstable();
        return Ok(ids.into_iter().map(Some).collect());
    }
    let rows = sqlx::query!(
        r#"
        WITH input AS (
            SELECT i.*
            FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::int2[],
                        $5::timestamptz[], $6::float8[], $7::int4[], $8::text[])
                 WITH ORDINALITY AS i(dataset_id, kind, payload, priority, run_at, delay_secs,
                                      max_attempts, unique_key, ord)
        ),
        inserted AS (
            INSERT INTO syncq.tasks (dataset_id, kind, payload, priority, run_at, max_attempts, unique_key)
            SELECT dataset_id, kind, payload, priority,
                   coalesce(run_at, now() + make_interval(secs => coalesce(delay_secs, 0))),
                   max_attempts, unique_key
            FROM input
            ORDER BY ord
            ON CONFLICT (dataset_id, unique_key)
                WHERE unique_key IS NOT NULL AND status IN ('queued', 'running')
                DO NOTHING
            RETURNING id, dataset_id, unique_key
        ),
        -- Rows without a key all go in: the k-th of them in input order
        -- has the k-th smallest of their ids.
        keyless_ids AS (
            SELECT x.id, row_number() OVER (ORDER BY x.id) AS k
            FROM inserted x WHERE x.unique_key IS NULL
        ),
        keyless_rows AS (
            SELECT i.ord, row_number() OVER (ORDER BY i.ord) AS k
            FROM input i WHERE i.unique_key IS NULL
        )
        SELECT CASE
                   WHEN input.unique_key IS NULL THEN
                       (SELECT ki.id FROM keyless_rows kr JOIN keyless_ids ki ON ki.k = kr.k
                         WHERE kr.ord = input.ord)
                   ELSE coalesce(
                       -- inserted by this statement (the batch's first row with the key)
                       (SELECT x.id FROM inserted x
                         WHERE x.dataset_id = input.dataset_id AND x.unique_key = input.unique_key),
                       -- a duplicate of a task already queued or running
                       (SELECT t.id FROM syncq.tasks t
                         WHERE t.dataset_id = input.dataset_id AND t.unique_key = input.unique_key
                           AND t.status IN ('queued', 'running')
                         LIMIT 1))
               END AS "id?"
        FROM input
        ORDER BY input.ord
        "#,
        &dataset_ids,
        &kinds,
        &payloads,
        &priorities,
        &run_ats as &[Option<chrono::DateTime<chrono::Utc>>],
        &delays as &[Option<f64>],
        &max_attempts,
        &unique_keys as &[Option<String>],
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| r.id).collect())
}

/// Inserts one task: the plain single-row INSERT that `insert_many` would
/// do for a batch of one, at about half its cost. Returns `None` when a task
/// with the same `(dataset_id, unique_key)` is queued or running.
pub async fn insert_one(db: impl PgExecutor<'_>, t: &NewTask) -> sqlx::Result<Option<TaskId>> {
    let (at, delay) = match t.run_at {
        RunAt::Now => (None, None),
        RunAt::After(d) => (None, Some(secs(d))),
        RunAt::At(at) => (Some(at), None),
    };
    sqlx::query_scalar!(
        r#"
        INSERT INTO syncq.tasks (dataset_id, kind, payload, priority, run_at, max_attempts, unique_key)
        VALUES ($1, $2, $3, $4, coalesce($5, now() + make_interval(secs => coalesce($6::float8, 0))), $7, $8)
        ON CONFLICT (dataset_id, unique_key)
            WHERE unique_key IS NOT NULL AND status IN ('queued', 'running')
            DO NOTHING
        RETURNING id
        "#,
        t.dataset_id,
        t.kind,
        t.payload,
        t.priority,
        at,
        delay,
        t.max_attempts,
        t.unique_key,
    )
    .fetch_optional(db)
    .await
}

/// The transaction's `now()`: what a column default gives every row it
/// inserts.
pub async fn transaction_now(
    db: impl PgExecutor<'_>,
) -> sqlx::Result<chrono::DateTime<chrono::Utc>> {
    sqlx::query_scalar!(r#"SELECT now() AS "now!""#)
        .fetch_one(db)
        .await
}

/// Inserts tasks with `COPY … FROM STDIN`: the fastest way in, one
/// statement streamed in one round trip. The caller runs it in a
/// transaction whose `now()` is `now`, so `RunAt::Now` and `RunAt::After`
/// give the same `run_at` as the column default would. No `ON CONFLICT`:
/// the caller refuses tasks with a unique key. Returns the rows copied.
pub async fn copy_in(
    conn: &mut sqlx::PgConnection,
    tasks: &[NewTask],
    now: chrono::DateTime<chrono::Utc>,
) -> sqlx::Result<u64> {
    let mut copy = conn
        .copy_in_raw(
            "COPY syncq.tasks (dataset_id, kind, payload, priority, run_at, max_attempts) \
             FROM STDIN (FORMAT text)",
        )
        .await?;
    let mut buf = String::with_capacity(256 * tasks.len().min(4096));
    for chunk in tasks.chunks(4096) {
        buf.clear();
        for t in chunk {
            let run_at = match t.run_at {
                RunAt::Now => now,
                // Out of range: a timestamp PostgreSQL refuses, naming it.
                RunAt::After(d) => chrono::Duration::from_std(d)
                    .ok()
                    .and_then(|d| now.checked_add_signed(d))
                    .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC),
                RunAt::At(at) => at,
            };
            copy_field(&mut buf, &t.dataset_id);
            buf.push('\t');
            copy_field(&mut buf, &t.kind);
            buf.push('\t');
            copy_field(&mut buf, &t.payload.to_string());
            buf.push('\t');
            buf.push_str(&t.priority.to_string());
            buf.push('\t');
            buf.push_str(&run_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true));
            buf.push('\t');
            buf.push_str(&t.max_attempts.to_string());
            buf.push('\n');
        }
        if let Err(e) = copy.send(buf.as_bytes()).await {
            let _ = copy.abort(e.to_string()).await;
            return Err(e);
        }
    }
    copy.finish().await
}

/// Appends `value` to a COPY text-format row, escaping what the format
/// gives a meaning to (backslash, tab, newline, carriage return).
fn copy_field(buf: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => buf.push_str("\\\\"),
            '\t' => buf.push_str("\\t"),
            '\n' => buf.push_str("\\n"),
            '\r' => buf.push_str("\\r"),
            c => buf.push(c),
        }
    }
}

/// Claims up to `limit` ready tasks of the given kinds for `worker_id`,
/// taking turns across datasets and honouring each dataset's pause,
/// throttle, concurrency cap and rate limit. The heart of syncq: the SQL is
/// `syncq.claim()` in `migrations/0003_claim.sql`, explained in
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
        SELECT id AS "id!", dataset_id AS "dataset_id!", kind AS "kind!", payload AS "payload!",
               priority AS "priority!", attempts AS "attempts!", max_attempts AS "max_attempts!",
               runs AS "runs!", checkpoint, created_at AS "created_at!",
               started_at AS "started_at!"
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
        RETURNING id, dataset_id, kind, payload, priority, attempts, max_attempts, runs,
                  checkpoint, created_at, started_at AS "started_at!"
        "#,
        id,
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
        WHERE status = 'running' AND locked_by = $1
        "#,
        worker_id,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.id, r.runs)).collect())
}

/// The datasets a claim of these kinds would pick first, in turn order:
/// step 1 of `syncq.claim()`, with the same filters (pause, throttle, cap,
/// rate budget), so the dataset that makes claims fail is among them.
pub async fn claim_candidates(
    db: impl PgExecutor<'_>,
    kinds: &[String],
    datasets: Option<&[String]>,
    skip: &[String],
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        r#"
        SELECT d.dataset_id FROM syncq.datasets d
        WHERE d.ready_at IS NOT NULL AND d.ready_at <= now() AND NOT d.paused
          AND (d.throttled_until IS NULL OR d.throttled_until <= now())
          AND ($2::text[] IS NULL OR d.dataset_id = ANY ($2))
          AND NOT (d.dataset_id = ANY ($3))
          AND (d.max_concurrency IS NULL OR d.max_concurrency > (
                SELECT count(*) FROM syncq.tasks r
                WHERE r.dataset_id = d.dataset_id AND r.status = 'running'))
          AND (d.rate_limit IS NULL OR d.rate_limit > (
                SELECT count(*) FROM syncq.rate_log l
                WHERE l.dataset_id = d.dataset_id AND l.started_at > now() - d.rate_window))
          AND (SELECT true FROM syncq.tasks t
               WHERE t.dataset_id = d.dataset_id AND t.status = 'queued'
                 AND t.run_at <= now() AND t.kind = ANY ($1) AND NOT t.cancel_requested
               ORDER BY t.priority, t.run_at, t.id
               LIMIT 1)
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
    pub later_from: Option<chrono::DateTime<chrono::Utc>>,
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
            WHERE t.status IN ('queued', 'running') AND t.kind = ANY ($1)
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
        WHERE id = $1 AND runs = $2 AND locked_by = $3 AND status = 'running'
        "#,
        id,
        runs,
        worker_id,
        checkpoint,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
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

/// `succeeded` with `result`. False: fenced out.
pub async fn succeed(db: impl PgExecutor<'_>, f: Fence<'_>, result: &Value) -> sqlx::Result<bool> {
    let done = succeed_many(db, f.worker_id, &[(f.id, f.runs, result.clone())]).await?;
    Ok(done.contains(&f.id))
}

/// Marks many tasks `succeeded` in one statement (one commit): the hot path
/// of a busy pool. Each is fenced on its own `(id, runs)` and the holder, so
/// a task whose lease was lost is left alone while the rest are written.
/// Returns the ids written. Atomic: on error nothing was written.
pub async fn succeed_many(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    done: &[(TaskId, i32, Value)],
) -> sqlx::Result<Vec<TaskId>> {
    let mut sorted: Vec<&(TaskId, i32, Value)> = done.iter().collect();
    // One lock order for every writer of a batch: fewer deadlocks.
    sorted.sort_by_key(|d| d.0);
    let ids: Vec<TaskId> = sorted.iter().map(|d| d.0).collect();
    let runs: Vec<i32> = sorted.iter().map(|d| d.1).collect();
    let results: Vec<Value> = sorted.iter().map(|d| d.2.clone()).collect();
    // A row locked elsewhere (an operator's cancel in an open transaction)
    // is waited for at most 100 ms, then left out: the caller tells such
    // rows from lost ones (still_held) and writes them again.
    sqlx::query_scalar!(
        r#"SELECT id AS "id!" FROM syncq.succeed_many($1, $2, $3, $4) AS s(id)"#,
        worker_id,
        &ids,
        &runs,
        &results,
    )
    .fetch_all(db)
    .await
}

/// A counted failed attempt: back to `queued` after `backoff`, or `failed`
/// when no attempt is left or `retry` is false. The error is recorded in
/// `last_error` and `syncq.task_errors`. A task whose cancel was requested
/// meanwhile ends `cancelled`. False: fenced out.
pub async fn fail_attempt(
    db: impl PgExecutor<'_>,
    f: Fence<'_>,
    error: &str,
    retry: bool,
    backoff: Duration,
) -> sqlx::Result<bool> {
    let error = storable_message(error);
    let done = sqlx::query!(
        r#"
        WITH done AS (
            UPDATE syncq.tasks t
            SET status = CASE
                    WHEN t.cancel_requested THEN 'cancelled'
                    WHEN $5 AND t.attempts < t.max_attempts THEN 'queued'
                    ELSE 'failed' END::syncq.task_status,
                run_at = CASE WHEN $5 AND t.attempts < t.max_attempts
                              THEN now() + make_interval(secs => $6) ELSE t.run_at END,
                finished_at = CASE WHEN t.cancel_requested OR NOT $5 OR t.attempts >= t.max_attempts
                                   THEN now() END,
                last_error = $4, locked_by = NULL, lease_expires_at = NULL
            WHERE t.id = $1 AND t.runs = $2 AND t.locked_by = $3 AND t.status = 'running'
            RETURNING t.id, t.attempts
        )
        INSERT INTO syncq.task_errors (task_id, attempt, worker_id, error)
        SELECT id, attempts, $3, $4 FROM done
        "#,
        f.id,
        f.runs,
        f.worker_id,
        error.as_ref(),
        retry,
        secs(backoff),
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// An attempt that does not count: back to `queued` now, its checkpoint kept
/// (checkpoints are saved as they are made). Used for checkpoint/shutdown,
/// `Fatal` (whose message is recorded as `error`), and aborted handlers.
/// False: fenced out.
pub async fn release(
    db: impl PgExecutor<'_>,
    f: Fence<'_>,
    error: Option<&str>,
) -> sqlx::Result<bool> {
    let error = error.map(storable_message);
    let done = sqlx::query_scalar!(
        r#"
        WITH released AS (
            UPDATE syncq.tasks t
            SET status = CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'queued' END::syncq.task_status,
                finished_at = CASE WHEN t.cancel_requested THEN now() END,
                attempts = greatest(t.attempts - 1, 0),
                last_error = coalesce($4, t.last_error),
                run_at = now(), locked_by = NULL, lease_expires_at = NULL
            WHERE t.id = $1 AND t.runs = $2 AND t.locked_by = $3 AND t.status = 'running'
            RETURNING t.id, t.attempts
        ),
        logged AS (
            INSERT INTO syncq.task_errors (task_id, attempt, worker_id, error)
            SELECT id, attempts + 1, $3, $4 FROM released WHERE $4 IS NOT NULL
        )
        SELECT count(*) AS "released!" FROM released
        "#,
        f.id,
        f.runs,
        f.worker_id,
        error.as_deref(),
    )
    .fetch_one(db)
    .await?;
    Ok(done == 1)
}

/// The upstream said "rate limit exceeded": the task goes back to `queued`
/// with its attempt not counted, and its dataset is throttled until
/// `now() + retry_after` (keeping a later existing throttle), for every
/// process. The error is recorded. False: fenced out.
pub async fn rate_limited(
    db: impl PgExecutor<'_>,
    f: Fence<'_>,
    error: &str,
    retry_after: Duration,
) -> sqlx::Result<bool> {
    let error = storable_message(error);
    let retry_after = retry_after.min(MAX_THROTTLE);
    let done = sqlx::query!(
        r#"
        WITH released AS (
            UPDATE syncq.tasks t
            SET status = CASE WHEN t.cancel_requested THEN 'cancelled' ELSE 'queued' END::syncq.task_status,
                finished_at = CASE WHEN t.cancel_requested THEN now() END,
                attempts = greatest(t.attempts - 1, 0),
                run_at = now(), last_error = $4, locked_by = NULL, lease_expires_at = NULL
            WHERE t.id = $1 AND t.runs = $2 AND t.locked_by = $3 AND t.status = 'running'
            RETURNING t.id, t.dataset_id, t.attempts
        ),
        throttled AS (
            UPDATE syncq.datasets d
            SET throttled_until = greatest(d.throttled_until, now() + make_interval(secs => $5))
            FROM released r WHERE d.dataset_id = r.dataset_id
        )
        INSERT INTO syncq.task_errors (task_id, attempt, worker_id, error)
        SELECT id, attempts + 1, $3, $4 FROM released
        "#,
        f.id,
        f.runs,
        f.worker_id,
        error.as_ref(),
        secs(retry_after),
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// `cancelled`, as the handler reported. False: fenced out.
pub async fn cancel_running(db: impl PgExecutor<'_>, f: Fence<'_>) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        r#"
        UPDATE syncq.tasks
        SET status = 'cancelled', finished_at = now(), locked_by = NULL, lease_expires_at = NULL
        WHERE id = $1 AND runs = $2 AND locked_by = $3 AND status = 'running'
        "#,
        f.id,
        f.runs,
        f.worker_id,
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A held task's lease, as renewed by a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewed {
    /// The task.
    pub id: TaskId,
    /// Whether its cancel was requested.
    pub cancel_requested: bool,
}

/// Extends the leases of the tasks this worker holds (`ids` with their
/// `runs`). A task missing from the answer is no longer held, or its row
/// was locked by another transaction at that moment: [`still_held`] tells.
pub async fn renew_leases(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    ids: &[TaskId],
    runs: &[i32],
    lease: Duration,
) -> sqlx::Result<Vec<Renewed>> {
    sqlx::query_as!(
        Renewed,
        r#"
        WITH held AS (
            -- SKIP LOCKED, as succeed_many: one row locked elsewhere must
            -- not hold up every other lease of this worker.
            SELECT l.id FROM syncq.tasks l
            WHERE l.id = ANY ($2) AND l.locked_by = $1 AND l.status = 'running'
            ORDER BY l.id
            FOR NO KEY UPDATE SKIP LOCKED
        )
        UPDATE syncq.tasks t
        SET lease_expires_at = now() + make_interval(secs => $4)
        WHERE t.id = ANY (ARRAY(SELECT held.id FROM held))
          AND t.runs = ($3::int4[])[array_position($2::int8[], t.id)]
          AND t.locked_by = $1 AND t.status = 'running'
        RETURNING t.id, t.cancel_requested
        "#,
        worker_id,
        ids,
        runs,
        secs(lease),
    )
    .fetch_all(db)
    .await
}

/// Of `ids` (with their `runs`), those this worker still holds, with
/// their `cancel_requested`, read without locking: a row another
/// transaction has locked is still read. Tells a lost lease from a row
/// locked elsewhere, and answers a cancel notification (the row decides,
/// not the message).
pub async fn still_held(
    db: impl PgExecutor<'_>,
    worker_id: &str,
    ids: &[TaskId],
    runs: &[i32],
) -> sqlx::Result<Vec<Renewed>> {
    sqlx::query_as!(
        Renewed,
        r#"
        SELECT t.id, t.cancel_requested FROM syncq.tasks t
        WHERE t.id = ANY ($2) AND t.locked_by = $1 AND t.status = 'running'
          AND t.runs = ($3::int4[])[array_position($2::int8[], t.id)]
        "#,
        worker_id,
        ids,
        runs,
    )
    .fetch_all(db)
    .await
}

/// A task taken back from a silent holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescued {
    /// The task.
    pub id: TaskId,
    /// The worker that stopped heartbeating.
    pub locked_by: Option<String>,
    /// Where it went: `queued`, `failed` (no attempt left) or `cancelled`.
    pub status: String,
}

/// Takes back up to `batch` running tasks whose lease expired: the attempt
/// counts, so they go back to `queued`, or to `failed` when none is left
/// (`cancelled` if a cancel was requested). Each is recorded in
/// `syncq.task_errors`. Idempotent and safe in every process at once.
pub async fn rescue_expired(db: impl PgExecutor<'_>, batch: i64) -> sqlx::Result<Vec<Rescued>> {
    sqlx::query_as!(
        Rescued,
        r#"
        WITH expired AS (
            SELECT id, locked_by FROM syncq.tasks
            WHERE status = 'running' AND lease_expires_at < now()
            ORDER BY lease_expires_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        ),
        rescued AS (
            UPDATE syncq.tasks t
            SET status = CASE
                    WHEN t.cancel_requested THEN 'cancelled'
                    WHEN t.attempts < t.max_attempts THEN 'queued'
                    ELSE 'failed' END::syncq.task_status,
                finished_at = CASE WHEN t.cancel_requested OR t.attempts >= t.max_attempts
                                   THEN now() END,
                run_at = now(),
                last_error = 'lease expired: worker ' || e.locked_by || ' stopped heartbeating',
                locked_by = NULL, lease_expires_at = NULL
            FROM expired e
            WHERE t.id = e.id
            RETURNING t.id, e.locked_by, t.attempts, t.status::text AS status, t.last_error
        ),
        logged AS (
            INSERT INTO syncq.task_errors (task_id, attempt, worker_id, error)
            SELECT id, attempts, locked_by, last_error FROM rescued
        )
        SELECT id AS "id!", locked_by, status AS "status!" FROM rescued
        "#,
        batch,
    )
    .fetch_all(db)
    .await
}

/// Repairs `ready_at` of datasets marked ready that have no ready task
/// (`syncq.refresh_ready()`, in `migrations/0002_readiness.sql`); returns how many.
pub async fn refresh_ready(
    db: impl PgExecutor<'_>,
    datasets: Option<&[String]>,
) -> sqlx::Result<i32> {
    sqlx::query_scalar!(r#"SELECT syncq.refresh_ready($1) AS "repaired!""#, datasets)
        .fetch_one(db)
        .await
}
