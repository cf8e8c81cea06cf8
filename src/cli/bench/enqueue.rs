//! Enqueue rates: the API one at a time, in batches and by COPY, and plain
//! SQL, each beside the same insert into a baseline table.

use std::time::Duration;

use sqlx::PgPool;

use super::{Figures, bench_error, rate, timed, to_sqlx};
use crate::cli::CliError;
use crate::{NewTask, TaskQueueManager};

/// Tasks per batch call, and batch calls per measure.
const BATCHES: u32 = 20;

/// Every enqueue figure, in the order the table prints them.
pub(super) async fn measure(db: &PgPool, figures: &mut Figures) -> Result<(), CliError> {
    single(db, figures).await?;
    batch(db, figures).await?;
    plain_sql(db, figures).await?;
    bulk(db, figures).await
}

/// One task per call, against single-row INSERTs.
async fn single(db: &PgPool, figures: &mut Figures) -> Result<(), CliError> {
    let manager = TaskQueueManager::new(db.clone());
    let single = 2_000u32;
    let raw_single = rate(
        single,
        timed(async {
            for _ in 0..single {
                sqlx::query("INSERT INTO bench_raw (payload) VALUES ('{}')")
                    .execute(db)
                    .await?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("baseline insert"))?,
    );
    figures.add(
        "baseline: raw single-row INSERT, 1 connection",
        raw_single,
        "rows/s",
        None,
    );
    let api_single = rate(
        single,
        timed(async {
            for _ in 0..single {
                manager
                    .enqueue(NewTask::new("bench", "noop"))
                    .await
                    .map_err(to_sqlx)?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("single enqueue"))?,
    );
    figures.add(
        "enqueue: API, one task per call",
        api_single,
        "tasks/s",
        Some(("raw single-row INSERT", raw_single)),
    );
    Ok(())
}

/// 1,000 tasks per call, against 1,000-row INSERTs.
async fn batch(db: &PgPool, figures: &mut Figures) -> Result<(), CliError> {
    let manager = TaskQueueManager::new(db.clone());
    let api_batch = rate(
        BATCHES * 1000,
        timed(async {
            for _ in 0..BATCHES {
                manager
                    .enqueue_many((0..1000).map(|_| NewTask::new("bench", "noop")))
                    .await
                    .map_err(to_sqlx)?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("batch enqueue"))?,
    );
    let raw_batch = rate(
        BATCHES * 1000,
        timed(async {
            for _ in 0..BATCHES {
                sqlx::query(
                    "INSERT INTO bench_raw (payload) SELECT '{}' FROM generate_series(1, 1000)",
                )
                .execute(db)
                .await?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("baseline batch insert"))?,
    );
    figures.add("baseline: raw 1,000-row INSERT", raw_batch, "rows/s", None);
    figures.add(
        "enqueue: API, 1,000 tasks per call",
        api_batch,
        "tasks/s",
        Some(("raw 1,000-row INSERT", raw_batch)),
    );
    Ok(())
}

/// Plain SQL into `syncq.tasks`, against the same INSERT into a copy without triggers.
async fn plain_sql(db: &PgPool, figures: &mut Figures) -> Result<(), CliError> {
    // Plain SQL into syncq.tasks against the same INSERT into a copy of
    // the table without its triggers (same columns, defaults, constraints
    // and indexes): what the insert trigger costs. Alternated batch by
    // batch, so both see the same machine.
    let mut sql_took = Duration::ZERO;
    let mut same_took = Duration::ZERO;
    for _ in 0..BATCHES {
        for (table, took) in [
            ("syncq.tasks", &mut sql_took),
            ("bench_same", &mut same_took),
        ] {
            let statement = format!(
                "INSERT INTO {table} (dataset_id, kind) SELECT 'bench', 'noop' FROM generate_series(1, 1000)"
            );
            *took += timed(async {
                sqlx::query(sqlx::AssertSqlSafe(statement))
                    .execute(db)
                    .await
                    .map(|_| ())
            })
            .await
            .map_err(bench_error("SQL enqueue"))?;
        }
    }
    let sql_batch = rate(BATCHES * 1000, sql_took);
    let same_batch = rate(BATCHES * 1000, same_took);
    figures.add(
        "baseline: 1,000-row INSERT, tasks' copy without triggers",
        same_batch,
        "rows/s",
        None,
    );
    figures.add(
        "enqueue: plain SQL, 1,000-row INSERT",
        sql_batch,
        "tasks/s",
        Some(("the copy without triggers", same_batch)),
    );
    Ok(())
}

/// `enqueue_bulk` (COPY), against a raw COPY.
async fn bulk(db: &PgPool, figures: &mut Figures) -> Result<(), CliError> {
    let manager = TaskQueueManager::new(db.clone());
    let bulk_calls = 5u32;
    let api_bulk = rate(
        bulk_calls * 10_000,
        timed(async {
            for _ in 0..bulk_calls {
                manager
                    .enqueue_bulk((0..10_000).map(|_| NewTask::new("bench", "noop")))
                    .await
                    .map_err(to_sqlx)?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("bulk enqueue"))?,
    );
    let raw_copy = rate(
        bulk_calls * 10_000,
        timed(async {
            let rows = "{}\n".repeat(10_000);
            for _ in 0..bulk_calls {
                let mut conn = db.acquire().await?;
                let mut copy = conn
                    .copy_in_raw("COPY bench_raw (payload) FROM STDIN")
                    .await?;
                copy.send(rows.as_bytes()).await?;
                copy.finish().await?;
            }
            Ok(())
        })
        .await
        .map_err(bench_error("baseline COPY"))?,
    );
    figures.add("baseline: raw COPY, 10,000 rows", raw_copy, "rows/s", None);
    figures.add(
        "enqueue: API COPY (enqueue_bulk), 10,000 per call",
        api_bulk,
        "tasks/s",
        Some(("raw COPY", raw_copy)),
    );
    Ok(())
}
