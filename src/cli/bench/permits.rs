//! The cost of a permit (SPEC §3): one process taking permits one after
//! another from a dataset with its own rate limit and a shared limit,
//! neither binding, beside raw single-row inserts on the same connection.

use sqlx::PgPool;

use super::{Figures, bench_error, rate, reset, timed};
use crate::cli::CliError;
use crate::task::TaskId;

const N: u32 = 2000;

pub(super) async fn measure(db: &PgPool, figures: &mut Figures) -> Result<(), CliError> {
    reset(db).await?;
    let id: i64 = sqlx::query_scalar(
        "WITH l AS (INSERT INTO syncq.limits (limit_id) VALUES ('bench-token') RETURNING limit_id),
              r AS (INSERT INTO syncq.limit_rates SELECT limit_id, 1000000, '1 second' FROM l),
              d AS (INSERT INTO syncq.datasets (dataset_id, rate_limit, rate_window)
                    VALUES ('permits', 1000000, '1 second'))
         INSERT INTO syncq.tasks (dataset_id, kind, status, attempts, runs, locked_by, lease_expires_at, started_at)
         VALUES ('permits', 'paged', 'running', 1, 1, 'bench', now() + interval '1 hour', now())
         RETURNING id",
    )
    .fetch_one(db)
    .await
    .map_err(bench_error("cannot set up the permits"))?;
    sqlx::query(
        "UPDATE syncq.datasets SET shared_limits = '{bench-token}' WHERE dataset_id = 'permits'",
    )
    .execute(db)
    .await
    .map_err(bench_error("cannot set up the permits"))?;
    let mut conn = db.acquire().await.map_err(bench_error("cannot connect"))?;
    let raw = timed(async {
        for _ in 0..N {
            sqlx::query("INSERT INTO bench_raw DEFAULT VALUES")
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    })
    .await
    .map_err(bench_error("the baseline failed"))?;
    let permits = timed(async {
        for _ in 0..N {
            let granted =
                crate::store::tasks::take_permit(&mut *conn, "bench", TaskId(id), 1, 1).await?;
            if granted != Some(0.0) {
                return Err(sqlx::Error::Protocol(format!(
                    "a permit was refused: {granted:?}"
                )));
            }
        }
        Ok(())
    })
    .await
    .map_err(bench_error("taking permits failed"))?;
    let raw = rate(N, raw);
    figures.add(
        "baseline: raw single-row INSERT, same connection",
        raw,
        "rows/s",
        None,
    );
    figures.add(
        "permits: one process, own + shared limit not binding",
        rate(N, permits),
        "permits/s",
        Some(("raw single-row INSERT", raw)),
    );
    Ok(())
}
