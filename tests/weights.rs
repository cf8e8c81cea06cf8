//! SPEC §6, weighted rounds: while datasets stay ready and below their
//! limits, their starts split in proportion to their weights — across
//! real worker processes, counted from rows.

mod common;

use std::time::Duration;

use common::WorkerProcess;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Three backlogged datasets of weights 1, 2 and 4, drained by two worker
/// processes for a while: their starts split 1:2:4, each within 10 %.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn starts_split_in_proportion_to_weights_across_two_processes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        sqlx::raw_sql(
            "INSERT INTO syncq.datasets (dataset_id, weight) VALUES ('w1', 1), ('w2', 2), ('w4', 4);
             INSERT INTO syncq.tasks (dataset_id, kind, payload)
             SELECT d, 'sleep', '{\"ms\": 20}' FROM unnest(ARRAY['w1', 'w2', 'w4']) d,
                    generate_series(1, 3000);",
        )
        .execute(&db)
        .await
        .unwrap();
        let url = common::url(&opts);
        let args = ["--concurrency", "8", "--poll-interval", "200ms"];
        let a = WorkerProcess::start(&url, &args, &[]);
        let b = WorkerProcess::start(&url, &args, &[]);
        // Long enough for hundreds of starts; every dataset keeps a backlog
        // (3,000 tasks each, 16 slots of 20 ms: at most ~800 starts/s).
        common::wait_for("1,400 starts", Duration::from_secs(60), || async {
            common::count(&db, "started_at IS NOT NULL").await >= 1400
        })
        .await;
        drop((a, b));
        let starts: Vec<(String, i64)> = sqlx::query_as(
            "SELECT dataset_id, count(*) FROM syncq.tasks WHERE started_at IS NOT NULL
             GROUP BY 1 ORDER BY 1",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        let total: i64 = starts.iter().map(|(_, n)| n).sum();
        for ((dataset, n), weight) in starts.iter().zip([1.0, 2.0, 4.0]) {
            let expected = total as f64 * weight / 7.0;
            let off = (*n as f64 - expected).abs() / expected;
            assert!(
                off <= 0.10,
                "{dataset}: {n} of {total} starts, expected {expected:.0} (off by {:.1} %): {starts:?}",
                off * 100.0
            );
        }
        let backlog = common::count(&db, "status = 'queued'").await;
        assert!(backlog > 3 * 3000 - 1400 - 200, "a dataset ran dry: {starts:?}");
        eprintln!("weights 1:2:4 over {total} starts: {starts:?}");
    })
    .await;
}

/// A dataset with one task among 1,000 backlogged ones starts within one
/// round — also one that was served before and sat idle (its old place in
/// the round is earlier than everyone's, and must not cost it its turn
/// nor give it a burst).
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn one_task_among_a_thousand_backlogged_datasets_starts_within_one_round(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        // Served once long ago, idle since.
        sqlx::raw_sql(
            "INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('lonely', 'noop');",
        )
        .execute(&db)
        .await
        .unwrap();
        let url = common::url(&opts);
        let args = ["--concurrency", "8", "--poll-interval", "200ms"];
        let a = WorkerProcess::start(&url, &args, &[]);
        let b = WorkerProcess::start(&url, &args, &[]);
        common::wait_for("lonely's first task ran", Duration::from_secs(30), || async {
            common::count(&db, "dataset_id = 'lonely' AND status = 'succeeded'").await == 1
        })
        .await;
        sqlx::raw_sql(
            "INSERT INTO syncq.tasks (dataset_id, kind, payload)
             SELECT 'busy-' || (i % 1000), 'sleep', '{\"ms\": 10}' FROM generate_series(1, 20000) i;",
        )
        .execute(&db)
        .await
        .unwrap();
        // Every backlogged dataset has been served at least once: a round
        // is under way.
        common::wait_for("a round under way", Duration::from_secs(60), || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(DISTINCT dataset_id) FROM syncq.tasks
                 WHERE dataset_id LIKE 'busy-%' AND started_at IS NOT NULL",
            )
            .fetch_one(&db)
            .await
            .unwrap()
                == 1000
        })
        .await;
        sqlx::query("INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('lonely', 'noop')")
            .execute(&db)
            .await
            .unwrap();
        let visible: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("SELECT clock_timestamp()")
                .fetch_one(&db)
                .await
                .unwrap();
        common::wait_for("lonely's second task ran", Duration::from_secs(30), || async {
            common::count(&db, "dataset_id = 'lonely' AND status = 'succeeded'").await == 2
        })
        .await;
        let started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
            "SELECT max(started_at) FROM syncq.tasks WHERE dataset_id = 'lonely'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        let busy_before: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM syncq.tasks
             WHERE dataset_id LIKE 'busy-%' AND started_at > $1 AND started_at < $2",
        )
        .bind(visible)
        .bind(started)
        .fetch_one(&db)
        .await
        .unwrap();
        drop((a, b));
        // One round is one start per ready dataset (1,000); its place is the
        // earliest, so in fact it goes in the next claim of either process.
        assert!(
            busy_before <= 1000,
            "{busy_before} backlogged starts went before it"
        );
        eprintln!("lonely started after {busy_before} backlogged starts");
    })
    .await;
}
