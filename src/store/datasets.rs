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
    /// Its share of starts when datasets compete (1–1000).
    pub weight: i32,
}

/// Reads one dataset's row.
pub async fn get(db: impl PgExecutor<'_>, dataset_id: &str) -> sqlx::Result<Option<DatasetRow>> {
    let row = sqlx::query!(
        r#"
        SELECT dataset_id, rate_limit, extract(epoch FROM rate_window)::float8 AS "rate_window_secs!",
               max_concurrency, paused, throttled_until, weight
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
        weight: r.weight,
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
        INSERT INTO syncq.datasets AS d (dataset_id, rate_limit, rate_window, max_concurrency, weight)
        VALUES ($1, $3, coalesce(make_interval(secs => $4), interval '1 second'), $6,
                coalesce($7, 1))
        ON CONFLICT (dataset_id) DO UPDATE SET
            rate_limit = CASE WHEN $2 THEN EXCLUDED.rate_limit ELSE d.rate_limit END,
            rate_window = CASE WHEN $2 AND $4::float8 IS NOT NULL THEN EXCLUDED.rate_window
                               ELSE d.rate_window END,
            max_concurrency = CASE WHEN $5 THEN EXCLUDED.max_concurrency ELSE d.max_concurrency END,
            weight = coalesce($7, d.weight)
        RETURNING dataset_id, rate_limit, extract(epoch FROM rate_window)::float8 AS "rate_window_secs!",
                  max_concurrency, paused, throttled_until, weight
        "#,
        dataset_id,
        set_rate,
        rate.map(|(n, _)| n),
        rate.map(|(_, w)| super::secs(w)),
        set_concurrency,
        change.max_concurrency.flatten(),
        change.weight,
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
        weight: r.weight,
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
          (SELECT count(*) FROM syncq.tasks WHERE dataset_id = $1 AND status = 'queued') AS "queued!",
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
