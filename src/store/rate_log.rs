//! `syncq.rate_log`: one row per start of a rate-limited dataset's task,
//! written by the claim (see [`crate::rate_limit`]).

use sqlx::PgExecutor;

/// Deletes up to `batch` rate-log rows that can no longer count.
pub(crate) async fn prune_rate_log(db: impl PgExecutor<'_>, batch: i32) -> sqlx::Result<i64> {
    let n = sqlx::query_scalar!(r#"SELECT syncq.prune_rate_log($1) AS "n!""#, batch)
        .fetch_one(db)
        .await?;
    Ok(n)
}
