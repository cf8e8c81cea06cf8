//! An idle worker is light on the database: with nothing queued it costs
//! one claim per poll interval, its heartbeat, and the rescuer's sweep —
//! counted by the server itself (pg_stat_statements on a private cluster,
//! whose counts are exact and immediate, unlike pg_stat_database's).

mod common;

use std::time::Duration;

use common::WorkerProcess;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use syncq::local_postgres::LocalPostgres;

/// What the server ran for one process, by kind of statement.
#[derive(Debug, Default)]
struct Calls {
    claims: i64,
    next_claim_in: i64,
    heartbeats: i64,
    rescues: i64,
    other: Vec<(String, i64)>,
}

impl Calls {
    fn total(&self) -> i64 {
        self.claims
            + self.next_claim_in
            + self.heartbeats
            + self.rescues
            + self.other.iter().map(|(_, n)| n).sum::<i64>()
    }
}

async fn calls(db: &PgPool) -> Calls {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.query, s.calls FROM pg_stat_statements s
         JOIN pg_database d ON d.oid = s.dbid
         WHERE d.datname = 'idle' AND s.query NOT LIKE '%pg_stat_statements%'",
    )
    .fetch_all(db)
    .await
    .expect("read pg_stat_statements");
    let mut calls = Calls::default();
    for (query, n) in rows {
        if query.contains("syncq.claim(") {
            calls.claims += n;
        } else if query.contains("syncq.next_claim_in(") {
            calls.next_claim_in += n;
        } else if query.contains("UPDATE syncq.workers SET last_heartbeat_at") {
            calls.heartbeats += n;
        } else if query.contains("lease_expires_at < now()") {
            calls.rescues += n;
        } else {
            calls
                .other
                .push((query.split_whitespace().collect::<Vec<_>>().join(" "), n));
        }
    }
    calls
}

/// Runs an idle worker with `args` for `window` and returns what it cost.
async fn idle_cost(pg: &LocalPostgres, args: &[&str], window: Duration) -> Calls {
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url("postgres"))
        .await
        .unwrap();
    let db = PgPoolOptions::new()
        .max_connections(1)
        .connect(&pg.url("idle"))
        .await
        .unwrap();
    // Rows of earlier (killed) workers stay until pruned.
    sqlx::query("DELETE FROM syncq.workers")
        .execute(&db)
        .await
        .unwrap();
    let worker = WorkerProcess::start(&pg.url("idle"), args, &[]);
    common::wait_for(
        "the worker has registered",
        Duration::from_secs(30),
        || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM syncq.workers")
                .fetch_one(&db)
                .await
                .unwrap_or(0)
                == 1
        },
    )
    .await;
    db.close().await;
    // Past start-up (registration, the first sweep), then count.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(&admin)
        .await
        .unwrap();
    tokio::time::sleep(window).await;
    let calls = calls(&admin).await;
    drop(worker);
    calls
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_costs_one_claim_per_poll_plus_its_heartbeat() {
    let pg = LocalPostgres::start_with(&["shared_preload_libraries=pg_stat_statements"])
        .expect("a private PostgreSQL cluster with pg_stat_statements");
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url("postgres"))
        .await
        .unwrap();
    sqlx::query("CREATE EXTENSION pg_stat_statements")
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("CREATE DATABASE idle")
        .execute(&admin)
        .await
        .unwrap();
    let db = PgPoolOptions::new()
        .max_connections(2)
        .connect(&pg.url("idle"))
        .await
        .unwrap();
    syncq::migrate(&db).await.unwrap();

    let window = Duration::from_secs(10);
    let secs = window.as_secs_f64();
    for (args, poll, heartbeat) in [
        (
            &[
                "--concurrency",
                "4",
                "--poll-interval",
                "1s",
                "--heartbeat",
                "2s",
            ][..],
            1.0,
            2.0,
        ),
        (
            &[
                "--concurrency",
                "4",
                "--poll-interval",
                "5s",
                "--heartbeat",
                "2s",
            ][..],
            5.0,
            2.0,
        ),
        (
            &[
                "--concurrency",
                "4",
                "--poll-interval",
                "1s",
                "--heartbeat",
                "2s",
                "--poll-only",
            ][..],
            1.0,
            2.0,
        ),
    ] {
        let calls = idle_cost(&pg, args, window).await;
        // The rescuer sweeps every 5 s, jittered down to 3.75 s.
        let rescue_budget = (secs / 3.75).ceil() as i64 + 1;
        let claim_budget = (secs / poll).ceil() as i64 + 1;
        let heartbeat_budget = (secs / heartbeat).ceil() as i64 + 1;
        eprintln!(
            "idle worker {args:?}: {} statements in {secs} s ({:.2}/s): {calls:?}",
            calls.total(),
            calls.total() as f64 / secs
        );
        assert!(
            calls.claims <= claim_budget,
            "{} claims in {secs} s with a {poll} s poll: {calls:?}",
            calls.claims
        );
        assert!(
            calls.next_claim_in <= 1,
            "asked when work is due {} times with nothing queued: {calls:?}",
            calls.next_claim_in
        );
        assert!(calls.heartbeats <= heartbeat_budget, "{calls:?}");
        assert!(calls.rescues <= rescue_budget, "{calls:?}");
        // Pruning and the vacuum check wait a minute when nothing
        // finished: at most the start-up round (four statements, once each)
        // falls in the window.
        assert!(
            calls.other.len() <= 4 && calls.other.iter().all(|(_, n)| *n == 1),
            "{calls:?}"
        );
        assert!(
            calls.claims >= (secs / poll) as i64 - 1,
            "not polling: {calls:?}"
        );
    }
    db.close().await;
}
