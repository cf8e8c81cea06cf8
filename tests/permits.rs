//! Permits (SPEC §3): a handler that pages through an upstream takes a
//! permit before each request after its first, from its dataset's rate
//! limit, shared exactly with every process's starts and permits. Counted
//! where the upstream counts: the `paged` handlers' own record of when
//! each page was fetched (their result), across real worker processes.

mod common;

use std::time::Duration;

use common::WorkerProcess;
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

const WAIT: Duration = Duration::from_secs(90);

/// One test of this file at a time: each runs three worker processes and
/// counts the handlers' own clocks, which a machine loaded by the others
/// delays by more than the window's guard (25 ms) between a permit's
/// grant and the request it pays for.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `syncq ARGS` against the test's database: (exit code, stdout, stderr).
fn syncq(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", url)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every page fetch the `paged` tasks of `dataset` recorded, in Unix ms.
async fn pages(db: &PgPool, dataset: &str) -> Vec<i64> {
    let results: Vec<Value> = sqlx::query_scalar(
        "SELECT result FROM syncq.tasks WHERE dataset_id = $1 AND status = 'succeeded'",
    )
    .bind(dataset)
    .fetch_all(db)
    .await
    .unwrap();
    let mut at: Vec<i64> = results
        .iter()
        .flat_map(|r| r["at"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t.as_i64())
        .collect();
    at.sort_unstable();
    at
}

/// The most fetches in any window of `window_ms` (each window starting
/// at a fetch).
fn most_in_window(at: &[i64], window_ms: i64) -> usize {
    let mut most = 0;
    let mut end = 0;
    for start in 0..at.len() {
        while end < at.len() && at[end] < at[start] + window_ms {
            end += 1;
        }
        most = most.max(end - start);
    }
    most
}

/// Three worker processes, 12 `paged` tasks of 10 pages (a permit before
/// each page after the first) on a dataset limited to 20/1s: 120 fetches,
/// never more than 20 in any second as the handlers recorded them — the
/// permits bind (the run lasts at least 5 s) — and every page fetched
/// once.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn permits_and_starts_share_one_exact_budget_across_three_processes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let _turn = SERIAL.lock().await;
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        sqlx::raw_sql(
            "INSERT INTO syncq.datasets (dataset_id, rate_limit, rate_window) VALUES ('api', 20, '1 second');
             INSERT INTO syncq.tasks (dataset_id, kind, payload)
             SELECT 'api', 'paged', '{\"pages\": 10, \"step_ms\": 5}' FROM generate_series(1, 12);",
        )
        .execute(&db)
        .await
        .unwrap();
        let url = common::url(&opts);
        let args = ["--concurrency", "4", "--poll-interval", "100ms"];
        let _workers: Vec<WorkerProcess> =
            (0..3).map(|_| WorkerProcess::start(&url, &args, &[])).collect();
        common::wait_for("the 12 paged tasks succeeded", WAIT, || async {
            common::count(&db, "dataset_id = 'api' AND status = 'succeeded'").await == 12
        })
        .await;
        let at = pages(&db, "api").await;
        assert_eq!(at.len(), 120, "every page fetched once");
        let most = most_in_window(&at, 1000);
        assert!(most <= 20, "{most} fetches in one second, beyond the limit of 20");
        let span = at[at.len() - 1] - at[0];
        assert!(span >= 5000, "the permits did not bind: 120 fetches in {span} ms");
        let attempts: i64 = sqlx::query_scalar(
            "SELECT sum(attempts) FROM syncq.tasks WHERE dataset_id = 'api'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(attempts, 12, "a permit's wait cost an attempt");
        eprintln!("120 fetches over {span} ms, at most {most} in any second");
    })
    .await;
}

/// A handler waiting for a permit hears its task's cancel: with a limit
/// of 1 per 30 s, the second page waits, and `syncq cancel` ends the task
/// `cancelled` within seconds, its second page never fetched.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_permit_wait_hears_cancel(_: PgPoolOptions, opts: PgConnectOptions) {
    let _turn = SERIAL.lock().await;
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        sqlx::query(
            "INSERT INTO syncq.datasets (dataset_id, rate_limit, rate_window) VALUES ('slow', 1, '30 seconds')",
        )
        .execute(&db)
        .await
        .unwrap();
        let id = common::insert(&db, "slow", "paged", serde_json::json!({"pages": 2, "step_ms": 0})).await;
        let url = common::url(&opts);
        let _worker = WorkerProcess::start(&url, &["--poll-interval", "100ms"], &[]);
        // Started (its first page), its permit then waits ~30 s.
        common::wait_status(&db, id, "running").await;
        let (code, _, err) = syncq(&url, &["cancel", &id.to_string()]);
        assert_eq!(code, Some(0), "{err}");
        let asked = tokio::time::Instant::now();
        common::wait_status(&db, id, "cancelled").await;
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the permit's wait did not hear the cancel ({:?})",
            asked.elapsed()
        );
    })
    .await;
}

/// SPEC §2 Shared limits: four datasets use one API token's limits, 20/1s
/// and 100/10s (set by the CLI); three worker processes run 16 `paged`
/// tasks of 10 pages across them. Counted from the handlers' own records:
/// no second over 20 and no ten seconds over 100 across all four
/// datasets together, every page fetched once, and the 10-second window
/// binds (the run outlasts it).
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn four_datasets_share_one_token_in_two_windows_across_three_processes(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let _turn = SERIAL.lock().await;
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        let url = common::url(&opts);
        let syncq = |args: &[&str]| syncq(&url, args);
        let (code, _, err) = syncq(&[
            "limits", "set", "token", "--rate", "20/1s", "--rate", "100/10s",
        ]);
        assert_eq!(code, Some(0), "{err}");
        let datasets = ["repo-a", "repo-b", "repo-c", "repo-d"];
        for d in datasets {
            let (code, out, err) = syncq(&["limit", d, "--uses", "token", "--create"]);
            assert_eq!(code, Some(0), "{err}");
            assert!(out.contains("shared limits token"), "{out}");
        }
        // An unknown limit is refused, naming it; nothing changes.
        let (code, _, err) = syncq(&["limit", "repo-a", "--uses", "token,nope"]);
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("nope") && err.lines().count() == 1, "{err}");
        sqlx::raw_sql(
            "INSERT INTO syncq.tasks (dataset_id, kind, payload)
             SELECT d, 'paged', '{\"pages\": 10, \"step_ms\": 5}'
             FROM unnest(ARRAY['repo-a', 'repo-b', 'repo-c', 'repo-d']) d, generate_series(1, 4);",
        )
        .execute(&db)
        .await
        .unwrap();
        let args = ["--concurrency", "4", "--poll-interval", "100ms"];
        let _workers: Vec<WorkerProcess> = (0..3)
            .map(|_| WorkerProcess::start(&url, &args, &[]))
            .collect();
        common::wait_for("the 16 paged tasks succeeded", WAIT, || async {
            common::count(&db, "dataset_id LIKE 'repo-%' AND status = 'succeeded'").await == 16
        })
        .await;
        let mut at = Vec::new();
        for d in datasets {
            let mine = pages(&db, d).await;
            assert_eq!(mine.len(), 40, "{d}: every page fetched once");
            at.extend(mine);
        }
        at.sort_unstable();
        let per_second = most_in_window(&at, 1000);
        let per_ten = most_in_window(&at, 10_000);
        assert!(
            per_second <= 20,
            "{per_second} fetches in one second, beyond 20/1s"
        );
        assert!(
            per_ten <= 100,
            "{per_ten} fetches in ten seconds, beyond 100/10s"
        );
        let span = at[at.len() - 1] - at[0];
        assert!(
            span >= 10_000,
            "the 10 s window did not bind: 160 fetches in {span} ms"
        );
        let (code, list, _) = syncq(&["limits", "list"]);
        assert_eq!(code, Some(0));
        assert!(
            list.contains("token: 20/1s") && list.contains("repo-d"),
            "{list}"
        );
        // A limit in use is not removed.
        let (code, _, err) = syncq(&["limits", "remove", "token"]);
        assert_eq!(code, Some(2), "{err}");
        eprintln!("160 fetches over {span} ms: at most {per_second} in a second, {per_ten} in ten");
    })
    .await;
}

/// SPEC §3: a 429 on one dataset throttles every shared limit it uses, so
/// no other dataset using that limit starts before the throttle ends.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_429_throttles_the_shared_limit_for_every_dataset_using_it(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let _turn = SERIAL.lock().await;
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        sqlx::raw_sql(
            "INSERT INTO syncq.limits (limit_id) VALUES ('token');
             INSERT INTO syncq.limit_rates VALUES ('token', 1000, '1 second');
             INSERT INTO syncq.datasets (dataset_id, shared_limits) VALUES ('a', '{token}'), ('b', '{token}');
             INSERT INTO syncq.tasks (dataset_id, kind, payload)
             VALUES ('a', 'fail', '{\"error\": \"rate_limited\", \"times\": 1, \"retry_after_ms\": 2000}');",
        )
        .execute(&db)
        .await
        .unwrap();
        let url = common::url(&opts);
        let _worker = WorkerProcess::start(&url, &["--poll-interval", "100ms"], &[]);
        common::wait_for("the limit throttled", WAIT, || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT throttled_until IS NOT NULL FROM syncq.limits WHERE limit_id = 'token'",
            )
            .fetch_one(&db)
            .await
            .unwrap()
        })
        .await;
        sqlx::query("INSERT INTO syncq.tasks (dataset_id, kind) SELECT 'b', 'noop' FROM generate_series(1, 5)")
            .execute(&db)
            .await
            .unwrap();
        common::wait_for("b's tasks ran", WAIT, || async {
            common::count(&db, "dataset_id = 'b' AND status = 'succeeded'").await == 5
        })
        .await;
        let early: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM syncq.tasks t, syncq.limits l
             WHERE t.dataset_id = 'b' AND l.limit_id = 'token' AND t.started_at < l.throttled_until",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(early, 0, "a dataset sharing the throttled limit started before the throttle ended");
        common::wait_for("a's task ran after its throttle", WAIT, || async {
            common::count(&db, "dataset_id = 'a' AND status = 'succeeded'").await == 1
        })
        .await;
    })
    .await;
}

/// A shared limit's cap counts the running tasks of every dataset using
/// it: two datasets on a limit of 2 running, one worker process with 8
/// slots, 16 tasks of 300 ms — never more than 2 handlers at once across
/// both (from the rows' handler start and end times), and 2 reached.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_shared_cap_holds_across_the_datasets_using_it(_: PgPoolOptions, opts: PgConnectOptions) {
    let _turn = SERIAL.lock().await;
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        let url = common::url(&opts);
        let syncq = |args: &[&str]| syncq(&url, args);
        let (code, _, err) = syncq(&["limits", "set", "pool", "--concurrency", "2"]);
        assert_eq!(code, Some(0), "{err}");
        for d in ["x", "y"] {
            let (code, _, err) = syncq(&["limit", d, "--uses", "pool", "--create"]);
            assert_eq!(code, Some(0), "{err}");
        }
        sqlx::raw_sql(
            "INSERT INTO syncq.tasks (dataset_id, kind, payload)
             SELECT d, 'sleep', '{\"ms\": 300}' FROM unnest(ARRAY['x', 'y']) d, generate_series(1, 8);",
        )
        .execute(&db)
        .await
        .unwrap();
        let _worker = WorkerProcess::start(&url, &["--concurrency", "8", "--poll-interval", "100ms"], &[]);
        common::wait_for("the 16 tasks succeeded", WAIT, || async {
            common::count(&db, "status = 'succeeded'").await == 16
        })
        .await;
        let most_running: i64 = sqlx::query_scalar(
            "SELECT max(s) FROM (SELECT sum(delta) OVER (ORDER BY at, delta ROWS UNBOUNDED PRECEDING) AS s FROM (
                 SELECT started_at AS at, 1 AS delta FROM syncq.tasks
                 UNION ALL SELECT finished_at, -1 FROM syncq.tasks) e) c",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert!(most_running <= 2, "{most_running} handlers at once under a cap of 2");
        assert_eq!(most_running, 2, "the cap never filled");
        let (_, list, _) = syncq(&["limits", "list"]);
        assert!(list.contains("running 0/2"), "{list}");
    })
    .await;
}
