//! Statements on the shared limits (`syncq.limits`, `syncq.limit_rates`,
//! a dataset's `shared_limits`; migrations/0008).

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::db::Db;

/// A shared limit as `syncq limits list` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitInfo {
    /// Its name.
    pub limit_id: String,
    /// Its rates: `(starts and permits allowed, window in seconds, used in
    /// the current window)`.
    pub rates: Vec<LimitRate>,
    /// No start or permit under it before this (a 429 set it).
    pub throttled_until: Option<DateTime<Utc>>,
    /// `throttled_until` is still ahead, by the database's clock.
    pub throttled: bool,
    /// It learns from 429s without Retry-After (SPEC §6).
    pub adaptive: bool,
    /// An adaptive limit's effective rate now, per the window of its
    /// shortest rate (paced evenly); `None` when not adaptive.
    pub effective_rate: Option<f64>,
    /// At most this many running tasks across its datasets, if capped.
    pub max_concurrency: Option<i32>,
    /// Running tasks of its datasets now.
    pub running: i64,
    /// The datasets that use it.
    pub datasets: Vec<String>,
}

/// One window of a shared limit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LimitRate {
    /// Starts and permits allowed in any window.
    pub rate_limit: i32,
    /// The window, in seconds.
    pub rate_window_secs: f64,
    /// Starts and permits in the window that ends now.
    pub used: i64,
}

/// Creates limit `limit_id` or replaces its rates with `rates` (`(rate,
/// window in seconds)`) and its cap with `max_concurrency`, in one
/// transaction; `adaptive` `Some` sets whether it adapts (kept when
/// `None`). New rates start again from the configured ones: what an
/// adaptive limit learned is forgotten.
pub async fn set(
    db: &Db,
    limit_id: &str,
    rates: &[(i32, f64)],
    max_concurrency: Option<i32>,
    adaptive: Option<bool>,
) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query!(
        "INSERT INTO syncq.limits AS l (limit_id, max_concurrency, adaptive)
         VALUES ($1, $2, coalesce($3, false))
         ON CONFLICT (limit_id) DO UPDATE SET max_concurrency = EXCLUDED.max_concurrency,
             adaptive = coalesce($3, l.adaptive), adapted_from = NULL, adapted_at = NULL",
        limit_id,
        max_concurrency,
        adaptive
    )
    .execute(tx.ex())
    .await?;
    sqlx::query!(
        "DELETE FROM syncq.limit_rates WHERE limit_id = $1",
        limit_id
    )
    .execute(tx.ex())
    .await?;
    let counts: Vec<i32> = rates.iter().map(|r| r.0).collect();
    let windows: Vec<f64> = rates.iter().map(|r| r.1).collect();
    sqlx::query!(
        "INSERT INTO syncq.limit_rates (limit_id, rate_limit, rate_window)
         SELECT $1, r, make_interval(secs => w) FROM unnest($2::int[], $3::float8[]) AS u(r, w)",
        limit_id,
        &counts,
        &windows
    )
    .execute(tx.ex())
    .await?;
    tx.commit().await
}

/// Removes limit `limit_id`; false if there is none. Refused (by a
/// trigger, naming a dataset) while a dataset uses it.
pub async fn remove(db: &Db, limit_id: &str) -> sqlx::Result<bool> {
    let done = sqlx::query!("DELETE FROM syncq.limits WHERE limit_id = $1", limit_id)
        .execute(db)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Sets the shared limits dataset `dataset_id` uses (creating its row if
/// needed); an unknown name is refused by a trigger naming the column.
/// Returns them as stored (sorted, without repeats).
pub async fn set_uses(db: &Db, dataset_id: &str, limits: &[String]) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        r#"INSERT INTO syncq.datasets AS d (dataset_id, shared_limits) VALUES ($1, $2)
           ON CONFLICT (dataset_id) DO UPDATE SET shared_limits = EXCLUDED.shared_limits
           RETURNING d.shared_limits AS "shared_limits!""#,
        dataset_id,
        limits
    )
    .fetch_one(db)
    .await
}

/// Every shared limit, by name, with its use (syncq.limit_stats).
pub async fn list(db: &Db) -> sqlx::Result<Vec<LimitInfo>> {
    let rows = sqlx::query!(
        r#"
        SELECT limit_id AS "limit_id!", rate_limit, extract(epoch FROM rate_window)::float8 AS rate_window_secs,
               used AS "used!", throttled_until, datasets AS "datasets!", max_concurrency,
               running AS "running!", adaptive AS "adaptive!", effective_rate,
               coalesce(throttled_until > now(), false) AS "throttled!"
        FROM syncq.limit_stats ORDER BY limit_id, rate_window
        "#
    )
    .fetch_all(db)
    .await?;
    let mut out: Vec<LimitInfo> = Vec::new();
    for r in rows {
        if out.last().is_none_or(|l| l.limit_id != r.limit_id) {
            out.push(LimitInfo {
                limit_id: r.limit_id.clone(),
                rates: Vec::new(),
                throttled_until: r.throttled_until,
                throttled: r.throttled,
                adaptive: r.adaptive,
                effective_rate: r.effective_rate,
                datasets: r.datasets.clone(),
                max_concurrency: r.max_concurrency,
                running: r.running,
            });
        }
        if let (Some(rate), Some(window), Some(last)) =
            (r.rate_limit, r.rate_window_secs, out.last_mut())
        {
            last.rates.push(LimitRate {
                rate_limit: rate,
                rate_window_secs: window,
                used: r.used,
            });
        }
    }
    Ok(out)
}

/// Lifts limit `limit_id`'s throttle and forgets what it learned, and
/// lifts the throttles of the datasets using it (set by the same 429s);
/// `None` if there is no such limit, else how many datasets use it. The
/// datasets' rows first, then the limit's: the order a 429's write locks
/// them in, so the two cannot deadlock.
pub async fn unthrottle(db: &Db, limit_id: &str) -> sqlx::Result<Option<i64>> {
    let mut tx = db.begin().await?;
    sqlx::query!(
        "UPDATE syncq.datasets d SET throttled_until = NULL
         WHERE d.dataset_id = ANY (SELECT unnest(l.datasets) FROM syncq.limits l WHERE l.limit_id = $1)
           AND d.throttled_until IS NOT NULL",
        limit_id
    )
    .execute(tx.ex())
    .await?;
    let used_by = sqlx::query_scalar!(
        r#"UPDATE syncq.limits l SET throttled_until = NULL, adapted_from = NULL, adapted_at = NULL
           WHERE l.limit_id = $1
           RETURNING cardinality(l.datasets)::bigint AS "n!""#,
        limit_id
    )
    .fetch_optional(tx.ex())
    .await?;
    tx.commit().await?;
    Ok(used_by)
}

/// Makes limit `limit_id` adaptive or not, forgetting what it learned;
/// false if there is no such limit.
pub async fn set_adaptive(db: &Db, limit_id: &str, adaptive: bool) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "UPDATE syncq.limits SET adaptive = $2, adapted_from = NULL, adapted_at = NULL
         WHERE limit_id = $1",
        limit_id,
        adaptive
    )
    .execute(db)
    .await?;
    Ok(done.rows_affected() > 0)
}
