//! Table upkeep: how much syncq's tables churned, and the vacuum they get
//! when autovacuum lags (one process at a time, by advisory lock).

use sqlx::PgExecutor;

/// Dead and live row estimates of syncq's churning tables, from the
/// statistics collector: `(table, dead, live)`.
pub async fn churn(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i64, i64)>> {
    let rows = sqlx::query!(
        r#"
        SELECT relname AS "table!", n_dead_tup AS "dead!", n_live_tup AS "live!"
        FROM pg_stat_user_tables
        WHERE schemaname = 'syncq' AND relname IN ('tasks', 'datasets', 'rate_log', 'ready_signals', 'turn_debts')
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.table, r.dead, r.live))
        .collect())
}

/// Takes the advisory lock that makes one process at a time vacuum, on
/// this connection (session-level). False: another process holds it.
pub async fn try_vacuum_lock(conn: &mut sqlx::PgConnection) -> sqlx::Result<bool> {
    sqlx::query_scalar!(r#"SELECT pg_try_advisory_lock(hashtext('syncq.vacuum')) AS "locked!""#)
        .fetch_one(conn)
        .await
}

/// Releases [`try_vacuum_lock`].
pub async fn vacuum_unlock(conn: &mut sqlx::PgConnection) -> sqlx::Result<()> {
    sqlx::query_scalar!(r#"SELECT pg_advisory_unlock(hashtext('syncq.vacuum')) AS "unlocked!""#)
        .fetch_one(conn)
        .await?;
    Ok(())
}

/// `VACUUM (ANALYZE)` of one of syncq's tables (a fixed list: the name is
/// never user input). A role that does not own the table gets a warning
/// from PostgreSQL and nothing is done.
pub async fn vacuum(conn: &mut sqlx::PgConnection, table: &str) -> sqlx::Result<()> {
    let statement = match table {
        "tasks" => "VACUUM (ANALYZE) syncq.tasks",
        "datasets" => "VACUUM (ANALYZE) syncq.datasets",
        "rate_log" => "VACUUM (ANALYZE) syncq.rate_log",
        // Every signal is deleted soon after it is written: the claim reads
        // the whole table, so its dead rows must not pile up.
        "ready_signals" => "VACUUM (ANALYZE) syncq.ready_signals",
        // As the signals: each debt is deleted soon after it is written.
        "turn_debts" => "VACUUM (ANALYZE) syncq.turn_debts",
        _ => return Ok(()),
    };
    sqlx::raw_sql(statement).execute(conn).await?;
    Ok(())
}
