//! Statements on `syncq.datasets`, one row per `TaskQueue`.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

/// A dataset's settings row.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetRow {
    /// The dataset.
    pub dataset_id: String,
    /// Starts allowed per `rate_window` (None: unlimited).
    pub rate_limit: Option<i32>,
    /// The rate window, in seconds.
    pub rate_window_secs: f64,
    /// Running tasks allowed across all processes (None: unlimited).
    pub max_concurrency: Option<i32>,
    /// No new starts while true.
    pub paused: bool,
    /// No new starts before this instant.
    pub throttled_until: Option<DateTime<Utc>>,
    /// `throttled_until` is still ahead, by the database's clock.
    pub throttled: bool,
    /// Its share of starts when datasets compete (1–1000).
    pub weight: i32,
    /// Its rate limit learns from 429s without Retry-After (SPEC §6).
    pub adaptive: bool,
    /// An adaptive rate limit's effective rate now, in starts per
    /// `rate_window` (paced evenly); `None` when not adaptive.
    pub effective_rate: Option<f64>,
}

/// Reads one dataset's row.
pub async fn get(db: impl PgExecutor<'_>, dataset_id: &str) -> sqlx::Result<Option<DatasetRow>> {
    let row = sqlx::query!(
        r#"
        SELECT dataset_id, rate_limit, extract(epoch FROM rate_window)::float8 AS "rate_window_secs!",
               max_concurrency, paused, throttled_until, weight, adaptive,
               coalesce(throttled_until > now(), false) AS "throttled!",
               CASE WHEN adaptive THEN syncq.effective_rate(rate_limit, rate_window, adapted_from,
                                                            adapted_at, now()) END AS effective_rate
        FROM syncq.datasets WHERE dataset_id = $1
        "#,
        dataset_id
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(|r| DatasetRow {
        dataset_id: r.dataset_id,
        rate_limit: r.rate_limit,
        rate_window_secs: r.rate_window_secs,
        max_concurrency: r.max_concurrency,
        paused: r.paused,
        throttled_until: r.throttled_until,
        throttled: r.throttled,
        weight: r.weight,
        adaptive: r.adaptive,
        effective_rate: r.effective_rate,
    }))
}

/// Whether the dataset is known: it has a settings row, or tasks (whose
/// row is made at their first claim).
pub async fn known(db: impl PgExecutor<'_>, dataset_id: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM syncq.datasets WHERE dataset_id = $1)
               OR EXISTS (SELECT 1 FROM syncq.tasks WHERE dataset_id = $1) AS "known!""#,
        dataset_id
    )
    .fetch_one(db)
    .await
}

/// Pauses or resumes a dataset, creating its row if needed.
pub async fn set_paused(
    db: impl PgExecutor<'_>,
    dataset_id: &str,
    paused: bool,
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"
        INSERT INTO syncq.datasets (dataset_id, paused) VALUES ($1, $2)
        ON CONFLICT (dataset_id) DO UPDATE SET paused = EXCLUDED.paused
        "#,
        dataset_id,
        paused
    )
    .execute(db)
    .await?;
    Ok(())
}

/// What to change of a dataset's limits; `None` leaves a setting alone.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LimitsChange {
    /// `Some(None)` clears the rate limit; `Some(Some((n, window)))` sets it.
    pub rate: Option<Option<(i32, std::time::Duration)>>,
    /// `Some(None)` clears the concurrency cap; `Some(Some(n))` sets it.
    pub max_concurrency: Option<Option<i32>>,
    /// `Some(n)` sets the weight.
    pub weight: Option<i32>,
    /// `Some(on)` makes the rate limit adaptive, or not.
    pub adaptive: Option<bool>,
}

/// Changes a dataset's limits in one statement, creating its row if needed;
/// returns the resulting row. Out-of-range values are refused by the
/// table's constraints (named after the column).
pub async fn set_limits(
    db: impl PgExecutor<'_>,
    dataset_id: &str,
    change: LimitsChange,
) -> sqlx::Result<DatasetRow> {
    let set_rate = change.rate.is_some();
    let rate = change.rate.flatten();
    let set_concurrency = change.max_concurrency.is_some();
    let r = sqlx::query!(
        r#"
        INSERT INTO syncq.datasets AS d (dataset_id, rate_limit, rate_window, max_concurrency, weight,
                                         adaptive)
        VALUES ($1, $3, coalesce(make_interval(secs => $4), interval '1 second'), $6,
                coalesce($7, 1), coalesce($8, false))
        ON CONFLICT (dataset_id) DO UPDATE SET
            rate_limit = CASE WHEN $2 THEN EXCLUDED.rate_limit ELSE d.rate_limit END,
            rate_window = CASE WHEN $2 AND $4::float8 IS NOT NULL THEN EXCLUDED.rate_window
                               ELSE d.rate_window END,
            max_concurrency = CASE WHEN $5 THEN EXCLUDED.max_concurrency ELSE d.max_concurrency END,
            weight = coalesce($7, d.weight),
            -- Clearing the rate limit ends its adapting, unless asked for
            -- (then refused: adaptive needs a rate limit).
            adaptive = coalesce($8, CASE WHEN $2 AND $3::int IS NULL THEN false ELSE d.adaptive END)
        RETURNING dataset_id, rate_limit, extract(epoch FROM rate_window)::float8 AS "rate_window_secs!",
                  max_concurrency, paused, throttled_until, weight, adaptive,
                  coalesce(throttled_until > now(), false) AS "throttled!",
                  CASE WHEN adaptive THEN syncq.effective_rate(rate_limit, rate_window, adapted_from,
                                                               adapted_at, now()) END AS effective_rate
        "#,
        dataset_id,
        set_rate,
        rate.map(|(n, _)| n),
        rate.map(|(_, w)| super::secs(w)),
        set_concurrency,
        change.max_concurrency.flatten(),
        change.weight,
        change.adaptive,
    )
    .fetch_one(db)
    .await?;
    Ok(DatasetRow {
        dataset_id: r.dataset_id,
        rate_limit: r.rate_limit,
        rate_window_secs: r.rate_window_secs,
        max_concurrency: r.max_concurrency,
        paused: r.paused,
        throttled_until: r.throttled_until,
        throttled: r.throttled,
        weight: r.weight,
        adaptive: r.adaptive,
        effective_rate: r.effective_rate,
    })
}

/// Live counts of a dataset, for inspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DatasetCounts {
    /// Queued tasks (ready or not).
    pub queued: i64,
    /// Running tasks, across all processes.
    pub running: i64,
    /// Starts inside the current rate window (rate-limited datasets only).
    pub starts_in_window: i64,
}

/// Counts a dataset's queued and running tasks and its recent starts.
pub async fn counts(db: impl PgExecutor<'_>, dataset_id: &str) -> sqlx::Result<DatasetCounts> {
    let r = sqlx::query!(
        r#"
        SELECT
          (SELECT q.queued FROM syncq.queued_count($1) AS q(queued)) AS "queued!",
          (SELECT r.running FROM syncq.running_count($1) AS r(running)) AS "running!",
          coalesce((SELECT u.used FROM syncq.datasets d
                    CROSS JOIN LATERAL syncq.rate_used(d.dataset_id, d.rate_window, now()) AS u(used)
                    WHERE d.dataset_id = $1), 0) AS "starts!"
        "#,
        dataset_id
    )
    .fetch_one(db)
    .await?;
    Ok(DatasetCounts {
        queued: r.queued,
        running: r.running,
        starts_in_window: r.starts,
    })
}

/// What lifting a dataset's throttle left: the shared limits it uses that
/// are still throttled, each with until when.
#[derive(Debug, Clone, PartialEq)]
pub struct Unthrottled {
    /// Whether the dataset had a throttle in force (or a learned rate).
    pub was_throttled: bool,
    /// Shared limits of it still throttled: `(name, until)`.
    pub still_by: Vec<(String, DateTime<Utc>)>,
}

/// Lifts a dataset's upstream throttle and forgets what its adaptive rate
/// limit learned; `None` if it has no row. Its shared limits keep theirs
/// (they hold other datasets too): they are returned.
pub async fn unthrottle(
    db: impl PgExecutor<'_>,
    dataset_id: &str,
) -> sqlx::Result<Option<Unthrottled>> {
    let row = sqlx::query!(
        r#"
        WITH before AS (
            SELECT d.dataset_id,
                   (d.throttled_until > now() OR d.adapted_at IS NOT NULL) AS was
            FROM syncq.datasets d WHERE d.dataset_id = $1 FOR NO KEY UPDATE
        ),
        lifted AS (
            UPDATE syncq.datasets d SET throttled_until = NULL, adapted_from = NULL, adapted_at = NULL
            FROM before b WHERE d.dataset_id = b.dataset_id
            RETURNING d.shared_limits
        )
        SELECT coalesce((SELECT b.was FROM before b), false) AS "was!",
               EXISTS (SELECT 1 FROM lifted) AS "found!",
               coalesce((SELECT array_agg(l.limit_id ORDER BY l.limit_id) FROM syncq.limits l, lifted u
                         WHERE l.limit_id = ANY (u.shared_limits) AND l.throttled_until > now()),
                        '{}') AS "limits!: Vec<String>",
               coalesce((SELECT array_agg(l.throttled_until ORDER BY l.limit_id) FROM syncq.limits l, lifted u
                         WHERE l.limit_id = ANY (u.shared_limits) AND l.throttled_until > now()),
                        '{}') AS "until!: Vec<DateTime<Utc>>"
        "#,
        dataset_id
    )
    .fetch_one(db)
    .await?;
    if !row.found {
        return Ok(None);
    }
    Ok(Some(Unthrottled {
        was_throttled: row.was,
        still_by: row.limits.into_iter().zip(row.until).collect(),
    }))
}
