//! Listening to the upstream (issue 27; SPEC §3 and §6): snoozes, throttles
//! that belong to the limit the request was made under and that an
//! operator can lift, adaptive limits, and outcomes that logs and rows
//! tell alike.

mod common;

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{NewTask, OutcomeKind, PoolConfig, RateLimit, TaskQueueManager, WorkerPool};

const WAIT: Duration = Duration::from_secs(20);

fn builtin_pool(db: &PgPool, config: PoolConfig) -> WorkerPool {
    WorkerPool::builder(db.clone())
        .register_builtins()
        .config(config)
        .build()
        .unwrap()
}

/// Runs `syncq ARGS` on the test's database: (exit code, stdout, stderr).
fn syncq(opts: &PgConnectOptions, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(opts))
        .args(args)
        .output()
        .expect("run syncq");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn throttled_until(db: &PgPool, dataset: &str) -> Option<DateTime<Utc>> {
    sqlx::query_scalar("SELECT throttled_until FROM syncq.datasets WHERE dataset_id = $1")
        .bind(dataset)
        .fetch_one(db)
        .await
        .unwrap()
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_task_snoozed_twice_then_succeeding_counts_one_attempt_and_throttles_nothing(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    manager
        .queue("reports")
        .set_rate_limit(Some(RateLimit::new(100, Duration::from_secs(1)).unwrap()))
        .await
        .unwrap();
    let id = manager
        .enqueue(
            NewTask::new("reports", "fail")
                .payload(json!({"error": "snooze", "times": 2, "retry_after_ms": 400})),
        )
        .await
        .unwrap();
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();

    let row = common::task(&db, id).await;
    assert_eq!(row.attempts, 1, "snoozes are not attempts");
    assert_eq!(row.last_error, None, "a snooze is not an error");
    let (snoozes, took): (i32, f64) = sqlx::query_as(
        "SELECT snoozes, extract(epoch FROM finished_at - created_at)::float8 FROM syncq.tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(snoozes, 2);
    assert!(took >= 0.8, "two snoozes of 400 ms, yet done in {took} s");
    // Its checkpoint (the fail kind's count of runs) was kept across them.
    assert_eq!(row.result, Some(json!({"failed_runs": 2})));
    assert_eq!(throttled_until(&db, "reports").await, None);
    let errors: i64 =
        sqlx::query_scalar("SELECT count(*) FROM syncq.task_errors WHERE task_id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(errors, 0);

    let (code, out, err) = syncq(&opts, &["show", &i64::from(id).to_string()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("attempts:   1/5 (and 2 snoozes)"),
        "show tells snoozes from attempts: {out}"
    );
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn snoozes_are_bounded_then_count_as_failed_attempts(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = TaskQueueManager::new(db.clone())
        .enqueue(
            NewTask::new("d", "fail")
                .payload(json!({"error": "snooze", "retry_after_ms": 0}))
                .max_attempts(2),
        )
        .await
        .unwrap();
    let pool = builtin_pool(&db, common::fast_config());
    let mut events = pool.handle().events();
    let (handle, run) = common::spawn(pool);
    // What the pool says of each attempt (its log and metrics say the same).
    let said = tokio::spawn(async move {
        let mut kinds = Vec::new();
        while let Ok(e) = events.recv().await {
            if let syncq::Event::Finished { outcome, .. } = e {
                kinds.push(outcome);
                if outcome == OutcomeKind::Failed {
                    return kinds;
                }
            }
        }
        kinds
    });
    common::wait_for("the snooze loop ends", Duration::from_secs(60), || {
        let db = db.clone();
        async move { common::status(&db, id).await == "failed" }
    })
    .await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    let snoozes: i32 = sqlx::query_scalar("SELECT snoozes FROM syncq.tasks WHERE id = $1")
        .bind(id)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(row.attempts, 2);
    assert_eq!(snoozes, syncq::TaskError::MAX_SNOOZES + 2);
    let kinds = tokio::time::timeout(WAIT, said).await.unwrap().unwrap();
    let mut want = vec![OutcomeKind::Snoozed; 100];
    want.extend([OutcomeKind::Retried, OutcomeKind::Failed]);
    assert_eq!(
        kinds, want,
        "past the bound a snooze is said to be the failure it is"
    );
    assert!(
        row.last_error
            .as_deref()
            .is_some_and(|e| e.contains("snoozed more than 100 times")),
        "{:?}",
        row.last_error
    );
    // `syncq retry` starts the count again.
    let (code, _, err) = syncq(&opts, &["retry", &i64::from(id).to_string()]);
    assert_eq!(code, 0, "{err}");
    let snoozes: i32 = sqlx::query_scalar("SELECT snoozes FROM syncq.tasks WHERE id = $1")
        .bind(id)
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(snoozes, 0);
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn the_last_attempt_of_a_task_that_fails_for_good_is_logged_failed(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    let once = manager
        .enqueue(
            NewTask::new("d", "fail")
                .payload(json!({"error": "retryable"}))
                .max_attempts(1),
        )
        .await
        .unwrap();
    let twice = manager
        .enqueue(
            NewTask::new("d", "fail")
                .payload(json!({"error": "retryable"}))
                .max_attempts(2),
        )
        .await
        .unwrap();
    let worker = common::WorkerProcess::start(
        &common::url(&opts),
        &["--concurrency", "2"],
        common::ATTEMPT_LOG_ENV,
    );
    common::wait_status(&db, once, "failed").await;
    common::wait_status(&db, twice, "failed").await;
    let ended = common::attempts_ended_by(&[&worker], 2).await;
    assert_eq!(ended.get(&once.into()), Some(&vec!["Failed".to_string()]));
    assert_eq!(
        ended.get(&twice.into()),
        Some(&vec!["Retried".to_string(), "Failed".to_string()])
    );
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_429_throttles_the_shared_limit_for_every_dataset_and_unthrottle_frees_them(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    manager
        .set_limit(
            "token",
            &[RateLimit::new(100, Duration::from_secs(1)).unwrap()],
        )
        .await
        .unwrap();
    for d in ["a", "b", "c"] {
        manager
            .queue(d)
            .use_limits(&["token".to_string()])
            .await
            .unwrap();
    }
    // The default poll (1 s): unthrottling is heard without a NOTIFY.
    let config = PoolConfig {
        poll_interval: PoolConfig::default().poll_interval,
        ..common::fast_config()
    };
    let (handle, run) = common::spawn(builtin_pool(&db, config));
    // One 429 on `a`, asking for an hour.
    let refused = manager
        .enqueue(
            NewTask::new("a", "fail")
                .payload(json!({"error": "rate_limited", "times": 1, "retry_after_ms": 3_600_000})),
        )
        .await
        .unwrap();
    common::wait_for("the 429", WAIT, || {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, bool>(
                "SELECT coalesce(throttled_until > now() + interval '50 minutes', false)
                 FROM syncq.limits WHERE limit_id = 'token'",
            )
            .fetch_one(&db)
            .await
            .unwrap()
        }
    })
    .await;
    let mut waiting = vec![refused];
    for d in ["b", "c"] {
        waiting.push(manager.enqueue(NewTask::new(d, "noop")).await.unwrap());
    }
    // Every dataset of the limit waits.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for id in &waiting {
        assert_eq!(common::status(&db, *id).await, "queued", "task {id}");
    }
    let (code, out, err) = syncq(&opts, &["status"]);
    assert_eq!(code, 0, "{err}");
    let line = |d: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{d} ")))
            .unwrap_or_default()
            .to_string()
    };
    assert!(line("a").contains("(upstream)"), "{out}");
    assert!(line("b").contains("(limit token)"), "{out}");
    let (code, out, err) = syncq(&opts, &["resume", "b"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("still throttled by shared limit \"token\" until")
            && out.contains("syncq unthrottle token"),
        "{out}"
    );

    let (code, out, err) = syncq(&opts, &["unthrottle", "token"]);
    let lifted = Instant::now();
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("unthrottled shared limit \"token\" and the 3 datasets using it"),
        "{out}"
    );
    common::wait_for(
        "every dataset of the limit runs",
        Duration::from_secs(3),
        || {
            let db = db.clone();
            let waiting = waiting.clone();
            async move {
                for id in waiting {
                    if common::status(&db, id).await != "succeeded" {
                        return false;
                    }
                }
                true
            }
        },
    )
    .await;
    let took = lifted.elapsed();
    eprintln!("unthrottle to all three succeeded: {} ms", took.as_millis());
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert_eq!(throttled_until(&db, "a").await, None);
    assert_eq!(common::task(&db, refused).await.attempts, 1);
    handle.checkpoint();
    run.await.unwrap().unwrap();

    // Unknown names are a usage error; a dataset unthrottles by its name.
    let (code, _, err) = syncq(&opts, &["unthrottle", "nothing-so-named"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no dataset or shared limit"), "{err}");
    let (code, out, _) = syncq(&opts, &["unthrottle", "a"]);
    assert_eq!((code, out.trim()), (0, "\"a\" was not throttled"));
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn an_adaptive_limit_slows_down_on_a_429_without_retry_after_and_paces_its_starts(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let (code, out, err) = syncq(
        &opts,
        &[
            "limit",
            "api",
            "--rate",
            "10/1s",
            "--adaptive",
            "on",
            "--create",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rate 10/1s adaptive (now 10)"), "{out}");
    // Adaptive needs a rate to adapt: a usage error, nothing written.
    let (code, _, err) = syncq(&opts, &["limit", "bare", "--adaptive", "on", "--create"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("needs a rate limit"), "{err}");
    let manager = TaskQueueManager::new(db.clone());
    let refused = manager
        .enqueue(NewTask::new("api", "fail").payload(json!({"error": "rate_limited", "times": 1})))
        .await
        .unwrap();
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, refused, "succeeded").await;
    // Not throttled: slowed down, to 3/4 of 10.
    assert_eq!(throttled_until(&db, "api").await, None);
    let effective: f64 = sqlx::query_scalar(
        "SELECT effective_rate FROM syncq.dataset_stats WHERE dataset_id = 'api'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!((7.4..=7.6).contains(&effective), "{effective}");
    // Its starts are paced, one per 1 s / effective rate (133 ms at 7.5,
    // less as it climbs back, never under 100 ms at the configured 10):
    // eight tasks ready at once do not start in a burst.
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(manager.enqueue(NewTask::new("api", "noop")).await.unwrap());
    }
    for id in &ids {
        common::wait_status(&db, *id, "succeeded").await;
    }
    let gaps: Vec<f64> = sqlx::query_scalar::<_, Option<f64>>(
        "SELECT extract(epoch FROM started_at - lag(started_at) OVER (ORDER BY started_at))::float8
         FROM syncq.rate_log WHERE dataset_id = 'api' ORDER BY started_at",
    )
    .fetch_all(&db)
    .await
    .unwrap()
    .into_iter()
    .flatten()
    .collect();
    assert!(gaps.len() >= 7, "{gaps:?}");
    let narrowest = gaps.iter().copied().fold(f64::MAX, f64::min);
    assert!(narrowest >= 0.100, "starts {gaps:?} s apart");
    handle.checkpoint();
    run.await.unwrap().unwrap();

    // The operator lifts what it learned.
    let (code, out, err) = syncq(&opts, &["unthrottle", "api"]);
    assert_eq!((code, out.trim()), (0, "unthrottled \"api\""), "{err}");
    let effective: f64 = sqlx::query_scalar(
        "SELECT effective_rate FROM syncq.dataset_stats WHERE dataset_id = 'api'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(effective, 10.0);
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn effective_rate_drops_to_three_quarters_and_climbs_back_along_a_cubic(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let rates: Vec<f64> = sqlx::query_scalar(
        "SELECT syncq.effective_rate(10, interval '1 second', 3.0, now() - make_interval(secs => k), now())
         FROM generate_series(0, 30) AS k ORDER BY k",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert!((rates[0] - 2.25).abs() < 1e-9, "{rates:?}");
    // Never lower later, flat around the rate of the 429, back to the
    // configured rate within 20 windows and never above it.
    assert!(rates.windows(2).all(|w| w[1] >= w[0]), "{rates:?}");
    assert!((2.9..=3.1).contains(&rates[5]), "{rates:?}");
    assert!((2.9..=3.1).contains(&rates[7]), "{rates:?}");
    assert_eq!(rates[20], 10.0, "{rates:?}");
    assert!(rates.iter().all(|r| *r <= 10.0));
    // Without a 429: the configured rate.
    let plain: f64 = sqlx::query_scalar(
        "SELECT syncq.effective_rate(10, interval '1 second', NULL, NULL, now())",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(plain, 10.0);
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn an_adaptive_limit_keeps_its_configured_window_as_well_as_its_pace(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    sqlx::raw_sql(
        "INSERT INTO syncq.datasets (dataset_id, rate_limit, rate_window, adaptive)
         VALUES ('api', 10, interval '1 second', true);
         -- Ten starts in the last second, the newest 400 ms ago: paced
         -- (100 ms apart at 10/s), and the window full.
         INSERT INTO syncq.rate_log (dataset_id, started_at)
         SELECT 'api', clock_timestamp() - make_interval(secs => 0.4 + 0.05 * k)
         FROM generate_series(0, 9) AS k;",
    )
    .execute(&db)
    .await
    .unwrap();
    let id = TaskQueueManager::new(db.clone())
        .enqueue(NewTask::new("api", "noop"))
        .await
        .unwrap();
    let claim = || {
        let db = db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT id FROM syncq.claim('w', ARRAY['noop'], NULL, NULL, 10, 30, 10)",
            )
            .fetch_all(&db)
            .await
            .unwrap()
        }
    };
    assert!(
        claim().await.is_empty(),
        "the window holds 10 starts already"
    );
    common::wait_for("the window frees", Duration::from_secs(5), || async move {
        claim().await == vec![i64::from(id)]
    })
    .await;
}
