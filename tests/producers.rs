//! SPEC §2, producer isolation: an INSERT into syncq.tasks never waits for
//! a worker, never waits for or deadlocks with another producer, and a
//! producer that keeps its transaction open delays no worker; its tasks
//! become claimable the moment it commits.

mod common;

use std::time::Duration;

use common::WorkerProcess;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection};

/// A statement that waits on a lock is taken to be waiting after this long
/// (these inserts take milliseconds): the test fails instead of hanging.
const NO_WAIT: Duration = Duration::from_secs(5);

async fn insert(conn: &mut PgConnection, dataset: &str) {
    tokio::time::timeout(
        NO_WAIT,
        sqlx::query("INSERT INTO syncq.tasks (dataset_id, kind) VALUES ($1, 'noop')")
            .bind(dataset)
            .execute(&mut *conn),
    )
    .await
    .unwrap_or_else(|_| panic!("an insert into {dataset:?} waited on a lock"))
    .unwrap_or_else(|e| panic!("an insert into {dataset:?} failed: {e}"));
}

/// Two producers, each in an open transaction, insert into the same
/// datasets — known ones and brand-new ones — in opposite orders, one
/// statement at a time, while a worker drains. Nobody waits, nobody
/// deadlocks, and every task runs once both commit.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn producers_in_open_transactions_never_wait_for_each_other_in_any_order(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    // Known datasets: they have rows (made by a first claim).
    for d in ["known-a", "known-b"] {
        sqlx::query("INSERT INTO syncq.datasets (dataset_id) VALUES ($1)")
            .bind(d)
            .execute(&db)
            .await
            .unwrap();
    }
    let worker = WorkerProcess::start(
        &common::url(&opts),
        &["--concurrency", "4", "--poll-interval", "200ms"],
        &[],
    );
    let mut one = PgConnection::connect_with(&opts).await.unwrap();
    let mut two = PgConnection::connect_with(&opts).await.unwrap();
    let mut one_tx = one.begin().await.unwrap();
    let mut two_tx = two.begin().await.unwrap();
    let order = ["known-a", "new-x", "known-b", "new-y"];
    for round in 0..3 {
        for i in 0..order.len() {
            insert(&mut one_tx, order[i]).await;
            insert(&mut two_tx, order[order.len() - 1 - i]).await;
        }
        // A worker claim, and its idle-marking, in between.
        common::insert(&db, "between", "noop", json!({ "round": round })).await;
    }
    // What workers write meanwhile does not wait on the producers either:
    // a failed attempt put back to queued (its trigger records readiness),
    // an upstream throttle, a claim's absorbing of readiness.
    let held: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, status, locked_by, lease_expires_at, attempts)
         VALUES ('known-b', 'noop', 'running', 'w', now() + interval '1 hour', 1) RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    for (what, sql) in [
        (
            "a retry's requeue",
            "UPDATE syncq.tasks SET status = 'queued', locked_by = NULL, lease_expires_at = NULL, attempts = 0
             WHERE id = $1",
        ),
        (
            "a throttle",
            "UPDATE syncq.datasets SET throttled_until = now() WHERE dataset_id = 'known-a' AND $1 > 0",
        ),
        (
            "a claim's absorbing",
            "SELECT syncq.absorb_signals() + 0 * $1",
        ),
    ] {
        tokio::time::timeout(NO_WAIT, sqlx::query(sql).bind(held).execute(&db))
            .await
            .unwrap_or_else(|_| panic!("{what} waited on the open producers"))
            .unwrap();
    }
    // Nothing of theirs runs before they commit.
    assert_eq!(
        common::count(&db, &format!("dataset_id <> 'between' AND id <> {held}")).await,
        0
    );
    tokio::time::timeout(NO_WAIT, one_tx.commit())
        .await
        .expect("commit waited")
        .unwrap();
    tokio::time::timeout(NO_WAIT, two_tx.commit())
        .await
        .expect("commit waited")
        .unwrap();
    let total = 2 * 3 * order.len() as i64 + 3 + 1;
    common::wait_for("every task ran", Duration::from_secs(30), || async {
        common::count(&db, "status = 'succeeded'").await == total
    })
    .await;
    assert_eq!(
        common::count(&db, "attempts <> 1").await,
        0,
        "{}",
        worker.log()
    );
}

/// A producer inserts into the very datasets two workers drain (retries
/// included, which put tasks back to queued), then keeps its transaction
/// open for 10 s — four leases long. The workers go on: no lease is lost,
/// nothing is rescued, every other task succeeds once; the producer's own
/// tasks run as soon as it commits.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_producer_idle_in_transaction_delays_no_worker(_: PgPoolOptions, opts: PgConnectOptions) {
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        let datasets = ["busy-1", "busy-2", "busy-3"];
        let mut seeded = 0;
        for d in datasets {
            for i in 0..40 {
                let (kind, payload) = if i % 4 == 0 {
                    ("fail", json!({ "error": "retryable", "times": 1 }))
                } else {
                    ("sleep", json!({ "ms": 150 }))
                };
                sqlx::query(
                    "INSERT INTO syncq.tasks (dataset_id, kind, payload, max_attempts)
                     VALUES ($1, $2, $3, 2)",
                )
                .bind(d)
                .bind(kind)
                .bind(payload)
                .execute(&db)
                .await
                .unwrap();
                seeded += 1;
            }
        }
        let mut producer = PgConnection::connect_with(&opts).await.unwrap();
        let mut open = producer.begin().await.unwrap();
        for d in datasets {
            insert(&mut open, d).await;
        }
        insert(&mut open, "brand-new").await;

        let url = common::url(&opts);
        // A 2.5 s lease renewed every 500 ms: any renewal or outcome write
        // held up for more than ~2 s by the producer's locks would cost a
        // lease and show as a rescue.
        let args = [
            "--concurrency",
            "6",
            "--lease",
            "2500ms",
            "--heartbeat",
            "500ms",
            "--rescue-interval",
            "200ms",
            "--poll-interval",
            "200ms",
        ];
        let a = WorkerProcess::start(&url, &args, common::ATTEMPT_LOG_ENV);
        let b = WorkerProcess::start(&url, &args, common::ATTEMPT_LOG_ENV);
        let opened = tokio::time::Instant::now();
        common::wait_for(
            "the seeded tasks drain",
            Duration::from_secs(60),
            || async { common::count(&db, "status = 'succeeded'").await == seeded },
        )
        .await;
        // The producer stays open 10 s in all, the drain going on beside it.
        tokio::time::sleep_until(opened + Duration::from_secs(10)).await;
        let rescued: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM syncq.task_errors WHERE error LIKE 'lease expired%'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(
            rescued,
            0,
            "leases lost beside an open producer:\n{}\n{}",
            a.log(),
            b.log()
        );
        for w in [&a, &b] {
            assert!(!w.log().contains("lease lost"), "{}", w.log());
        }
        // Each retried task: one counted failure, then success.
        assert_eq!(
            common::count(&db, "kind = 'fail' AND attempts <> 2").await,
            0,
            "a retried task ran more often than its one failure"
        );
        assert_eq!(
            common::count(&db, "kind = 'sleep' AND attempts <> 1").await,
            0
        );
        // Its tasks: invisible until the commit, claimable the moment after.
        assert_eq!(common::count(&db, "kind = 'noop'").await, 0);
        tokio::time::timeout(NO_WAIT, open.commit())
            .await
            .expect("the producer's commit waited")
            .unwrap();
        let committed = tokio::time::Instant::now();
        common::wait_for(
            "the producer's tasks run",
            Duration::from_secs(10),
            || async { common::count(&db, "kind = 'noop' AND status = 'succeeded'").await == 4 },
        )
        .await;
        // Woken by NOTIFY, not the 200 ms poll alone (margin for a loaded
        // 2-core machine).
        assert!(committed.elapsed() < Duration::from_secs(3));
    })
    .await;
}
