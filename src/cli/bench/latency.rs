//! Insert-to-start latency of an idle worker.

use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use std::time::{Duration, Instant};

use super::drain::worker_command;
use super::{Figures, bench_error, reset};
use crate::cli::CliError;

/// p50, p95 and p99 of insert→start with an idle worker.
pub(super) async fn measure(
    db: &PgPool,
    scratch: &PgConnectOptions,
    figures: &mut Figures,
) -> Result<(), CliError> {
    reset(db).await?;
    let (p50, p95, p99) = latency(db, scratch).await?;
    figures.add("latency: insert->start p50 (idle worker)", p50, "ms", None);
    figures.add("latency: insert->start p95", p95, "ms", None);
    figures.add("latency: insert->start p99", p99, "ms", None);
    Ok(())
}

/// 200 single inserts at ~50/s into an idle worker; insert→start percentiles.
async fn latency(db: &PgPool, scratch: &PgConnectOptions) -> Result<(f64, f64, f64), CliError> {
    let mut child = worker_command(scratch, 4)?
        .spawn()
        .map_err(|e| CliError::Runtime(format!("bench: cannot start a worker: {e}")))?;
    let mut conn = scratch
        .connect()
        .await
        .map_err(bench_error("cannot connect"))?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..200 {
        sqlx::query("INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('latency', 'noop')")
            .execute(&mut conn)
            .await
            .map_err(bench_error("cannot insert"))?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM syncq.tasks WHERE status <> 'succeeded'")
                .fetch_one(&mut conn)
                .await
                .map_err(bench_error("cannot count"))?;
        if left == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = conn.close().await;
    let p: (Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.95) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
         FROM (SELECT extract(epoch FROM started_at - created_at) * 1000 AS ms
               FROM syncq.tasks WHERE started_at IS NOT NULL) t",
    )
    .fetch_one(db)
    .await
    .map_err(bench_error("cannot read latencies"))?;
    Ok((
        p.0.unwrap_or(f64::NAN),
        p.1.unwrap_or(f64::NAN),
        p.2.unwrap_or(f64::NAN),
    ))
}
