//! Statements on `syncq.tasks` (and `syncq.task_errors`, written together):
//! taking tasks in (here), handing them out (`claim`), ending attempts
//! (`outcomes`), leases (`leases`), and operator actions (`operations`).

mod claim;
mod leases;
mod operations;
mod outcomes;

pub use claim::{
    Claimed, Leftover, absorb_signals, claim, claim_ahead, claim_by_id, claim_candidates,
    give_back, leftover, next_claim_in, refresh_ready, running_as,
};
pub use leases::{Rescued, renew_leases, rescue_expired, still_held};
pub use operations::{cancel, cancel_dataset, prune_batch, retry, retry_dataset};
pub(crate) use outcomes::MAX_THROTTLE;
pub use outcomes::{
    End, Ended, Fence, complete_many, complete_one, release, save_checkpoint, take_permit,
};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;

use crate::store::secs;
use crate::task::{NewTask, RunAt, TaskId};

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
    let columns = Columns::of(tasks);
    if columns.unique_keys.iter().all(Option::is_none) {
        // Without unique keys there is nothing to arbitrate: no ON CONFLICT,
        // whose speculative insertion per row costs most of the statement.
        insert_keyless(db, &columns).await
    } else {
        insert_deduplicated(db, &columns).await
    }
}

/// A batch of tasks as the columns a statement binds (`unnest`).
struct Columns {
    dataset_ids: Vec<String>,
    kinds: Vec<String>,
    payloads: Vec<Value>,
    priorities: Vec<i16>,
    run_ats: Vec<Option<DateTime<Utc>>>,
    delays: Vec<Option<f64>>,
    max_attempts: Vec<i32>,
    unique_keys: Vec<Option<String>>,
}

impl Columns {
    fn of(tasks: &[NewTask]) -> Self {
        let (run_ats, delays) = tasks
            .iter()
            .map(|t| match t.run_at {
                RunAt::Now => (None, None),
                RunAt::After(d) => (None, Some(secs(d))),
                RunAt::At(at) => (Some(at), None),
            })
            .unzip();
        Columns {
            dataset_ids: tasks.iter().map(|t| t.dataset_id.clone()).collect(),
            kinds: tasks.iter().map(|t| t.kind.clone()).collect(),
            payloads: tasks.iter().map(|t| t.payload.clone()).collect(),
            priorities: tasks.iter().map(|t| t.priority).collect(),
            run_ats,
            delays,
            max_attempts: tasks.iter().map(|t| t.max_attempts).collect(),
            unique_keys: tasks.iter().map(|t| t.unique_key.clone()).collect(),
        }
    }
}

/// [`insert_many`] of a batch without unique keys: every row goes in.
async fn insert_keyless(db: impl PgExecutor<'_>, c: &Columns) -> sqlx::Result<Vec<Option<TaskId>>> {
    let n = c.dataset_ids.len();
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
        &c.dataset_ids,
        &c.kinds,
        &c.payloads,
        &c.priorities,
        &c.run_ats as &[Option<DateTime<Utc>>],
        &c.delays as &[Option<f64>],
        &c.max_attempts,
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
    Ok(ids.into_iter().map(|id| Some(TaskId(id))).collect())
}

/// [`insert_many`] of a batch with unique keys: a key already queued or
/// running (or earlier in the batch) is not inserted again; its id is
/// returned instead.
async fn insert_deduplicated(
    db: impl PgExecutor<'_>,
    c: &Columns,
) -> sqlx::Result<Vec<Option<TaskId>>> {
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
        &c.dataset_ids,
        &c.kinds,
        &c.payloads,
        &c.priorities,
        &c.run_ats as &[Option<DateTime<Utc>>],
        &c.delays as &[Option<f64>],
        &c.max_attempts,
        &c.unique_keys as &[Option<String>],
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| r.id.map(TaskId)).collect())
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
        RETURNING id AS "id: TaskId"
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
pub async fn transaction_now(db: impl PgExecutor<'_>) -> sqlx::Result<DateTime<Utc>> {
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
    now: DateTime<Utc>,
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
                    .unwrap_or(DateTime::<Utc>::MAX_UTC),
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
