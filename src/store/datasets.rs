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
}

/// Reads one dataset's row.
pub async fn get(db: impl PgExecutor<'_>, dataset_id: &str) -> sqlx::Result<Option<DatasetRow>> {
    let row = sqlx::query!(
        r#"
        SELECT dataset_id, rate_limit, extract(epoch FROM rate_window)::float8 AS "rate_window_secs!",
               max_concurrency, paused, throttled_until
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
    }))
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
