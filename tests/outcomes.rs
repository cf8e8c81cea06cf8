//! SPEC §3: what each handler result does to its task, and the claim's
//! ordering, delays and kind filter.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{
    Backoff, NewTask, PoolConfig, SyncTask, SyncWorker, TaskQueueManager, TaskResult, WorkerPool,
    async_trait,
};

const WAIT: Duration = Duration::from_secs(15);

fn builtin_pool(db: &PgPool, config: PoolConfig) -> WorkerPool {
    WorkerPool::builder(db.clone())
        .register_builtins()
        .config(config)
        .build()
        .unwrap()
}

async fn errors_of(db: &PgPool, id: i64) -> Vec<(i32, String)> {
    sqlx::query_as("SELECT attempt, error FROM syncq.task_errors WHERE task_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(db)
        .await
        .unwrap()
}

async fn error_times(db: &PgPool, id: i64) -> Vec<(i32, DateTime<Utc>)> {
    sqlx::query_as("SELECT attempt, at FROM syncq.task_errors WHERE task_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(db)
        .await
        .unwrap()
}

/// The built-in `fail` kind, noting at each run the attempt, the row's
/// `run_at` (a claim leaves it as the last failure set it) and the run's
/// `started_at`.
#[derive(Clone)]
struct TimedFail {
    db: PgPool,
    runs: Arc<Mutex<Vec<TimedRun>>>,
}

/// (attempt, the row's run_at, started_at) of one run.
type TimedRun = (i32, DateTime<Utc>, DateTime<Utc>);

#[async_trait]
impl SyncWorker for TimedFail {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        let run_at: DateTime<Utc> =
            sqlx::query_scalar("SELECT run_at FROM syncq.tasks WHERE id = $1")
                .bind(task.id())
                .fetch_one(&self.db)
                .await
                .expect("read run_at");
        self.runs
            .lock()
            .unwrap()
            .push((task.attempt(), run_at, task.started_at()));
        syncq::builtin::Fail.handle(task).await
    }
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn retryable_errors_retry_with_backoff_until_success(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "fail", json!({"error": "retryable", "times": 2})).await;
    let backoff = Backoff {
        base: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: 0.1,
    };
    let handler = TimedFail {
        db: db.clone(),
        runs: Arc::default(),
    };
    let pool = WorkerPool::builder(db.clone())
        .register("fail", handler.clone())
        .config(PoolConfig {
            backoff,
            ..common::fast_config()
        })
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!((row.attempts, row.runs), (3, 3));
    let errors = error_times(&db, id).await;
    assert_eq!(errors.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 2]);

    // Each failure moved run_at forward by the backoff after that many
    // failures (20 ms, then 40 ms, ±10 % jitter), counted from the
    // failure's own write (task_errors.at is the same statement's now()),
    // and the next attempt did not start before it. All database clock, so
    // exact: 1 ms of slack covers the interval's microsecond rounding.
    let runs = handler.runs.lock().unwrap().clone();
    assert_eq!(
        runs.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "{runs:?}"
    );
    let ms = |d: chrono::Duration| d.num_microseconds().unwrap() as f64 / 1000.0;
    for (failed, (attempt, failed_at)) in errors.iter().enumerate() {
        let (_, run_at, next_start) = runs[failed + 1];
        let delay = ms(run_at - *failed_at);
        let expected = 20.0 * f64::from(1 << failed);
        assert!(
            (expected * 0.9 - 1.0..=expected * 1.1 + 1.0).contains(&delay),
            "after failed attempt {attempt}: run_at moved {delay} ms, expected {expected} ms ±10 %"
        );
        assert!(
            next_start >= run_at,
            "attempt {} started at {next_start}, before its run_at {run_at}",
            attempt + 1
        );
    }
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn retryable_errors_end_failed_after_max_attempts(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = TaskQueueManager::new(db.clone())
        .enqueue(
            NewTask::new("d", "fail")
                .payload(json!({"error": "retryable"}))
                .max_attempts(3),
        )
        .await
        .unwrap();
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, id, "failed").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!((row.attempts, row.max_attempts, row.runs), (3, 3, 3));
    assert!(row.last_error.unwrap().contains("run 3"));
    let errors = errors_of(&db, id.into()).await;
    assert_eq!(
        errors.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn invalid_fails_at_once(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "fail", json!({"error": "invalid"})).await;
    let bad = common::insert(&db, "d", "sleep", json!({"ms": "ten"})).await;
    let missing = common::insert(&db, "d", "count", json!({"step_ms": 1})).await;
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, id, "failed").await;
    common::wait_status(&db, bad, "failed").await;
    common::wait_status(&db, missing, "failed").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    // At once: one attempt, one run, one error; no retry was scheduled.
    for failed in [id, bad, missing] {
        let row = common::task(&db, failed).await;
        assert_eq!((row.attempts, row.runs), (1, 1), "task {failed}");
        assert_eq!(errors_of(&db, failed).await.len(), 1, "task {failed}");
    }
    // A malformed payload for a built-in kind names the field.
    let bad = common::task(&db, bad).await;
    assert_eq!(bad.attempts, 1);
    let error = bad.last_error.unwrap();
    assert!(
        error.contains("ms:") && error.contains("invalid type"),
        "{error}"
    );
    let error = common::task(&db, missing).await.last_error.unwrap();
    assert!(error.contains("missing field `to`"), "{error}");
}

/// Timing: the multi-thread runtime keeps the test's polling off the pool's
/// thread. The one bound that depends on speed is "another dataset starts
/// while this one is throttled": its task starts some 10–100 ms after the
/// throttle is seen, against a throttle of 1.5 s (a margin of 15× or more).
/// Everything else is compared on the database clock, exactly.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn rate_limited_is_not_counted_and_throttles_the_dataset(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        let id = common::insert(
            &db,
            "api",
            "fail",
            json!({"error": "rate_limited", "times": 1, "retry_after_ms": 1500}),
        )
        .await;
        let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
        // Set once by the first run, and never cleared: a condition that
        // stays true, whenever this looks.
        common::wait_for("the dataset is throttled", WAIT, || {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, bool>(
                    "SELECT throttled_until IS NOT NULL FROM syncq.datasets WHERE dataset_id = 'api'",
                )
                .fetch_one(&db)
                .await
                .unwrap_or(false)
            }
        })
        .await;
        let same = common::insert(&db, "api", "noop", json!({})).await;
        let other = common::insert(&db, "other", "noop", json!({})).await;
        common::wait_status(&db, other, "succeeded").await;
        common::wait_status(&db, id, "succeeded").await;
        common::wait_status(&db, same, "succeeded").await;
        handle.checkpoint();
        run.await.unwrap().unwrap();

        // The throttle: retry_after past the rate-limited run's own write
        // (task_errors.at is that statement's now()).
        let throttle_ms: f64 = sqlx::query_scalar(
            "SELECT extract(epoch FROM d.throttled_until - e.at)::float8 * 1000
             FROM syncq.datasets d, syncq.task_errors e
             WHERE d.dataset_id = 'api' AND e.task_id = $1",
        )
        .bind(id)
        .fetch_one(&db)
        .await
        .unwrap();
        assert!(
            (1499.0..=1501.0).contains(&throttle_ms),
            "throttled for {throttle_ms} ms"
        );
        let at = |task: i64| {
            let db = db.clone();
            async move {
                sqlx::query_as::<_, (DateTime<Utc>, DateTime<Utc>, DateTime<Utc>)>(
                    "SELECT t.created_at, t.started_at, d.throttled_until
                     FROM syncq.tasks t, syncq.datasets d WHERE t.id = $1 AND d.dataset_id = 'api'",
                )
                .bind(task)
                .fetch_one(&db)
                .await
                .unwrap()
            }
        };
        // Nothing of the dataset started while throttled — neither the task
        // enqueued meanwhile nor the throttled task's own retry...
        let (created, started, until) = at(same).await;
        assert!(
            created < until,
            "premise: the task was enqueued while throttled"
        );
        assert!(started >= until, "started at {started}, throttled until {until}");
        let (_, started, until) = at(id).await;
        assert!(started >= until, "retry started at {started}, throttled until {until}");
        // ...while another dataset was served during the throttle.
        let (_, started, until) = at(other).await;
        assert!(
            started < until,
            "another dataset's task started at {started}, only after the throttle ({until})"
        );
        // The throttled run gave its attempt back.
        let row = common::task(&db, id).await;
        assert_eq!((row.attempts, row.runs), (1, 2));
    })
    .await;
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn fatal_releases_the_task_uncounted_and_stops_the_pool(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "fail", json!({"error": "fatal", "times": 1})).await;
    // Claimed with it (one claim of up to 4): stopping the pool hands it
    // back too, whether its handler had started (checkpointed) or not.
    let long = common::insert(&db, "e", "sleep", json!({"ms": 60_000})).await;
    let pool = builtin_pool(&db, common::fast_config());
    let err = tokio::time::timeout(WAIT, pool.run())
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, syncq::Error::Fatal { task_id, .. } if task_id == id),
        "{err}"
    );
    let row = common::task(&db, id).await;
    assert_eq!((row.status.as_str(), row.attempts), ("queued", 0));
    // A claim already in flight when the pool began to stop may take the
    // released task once more; it is handed back unstarted and uncounted.
    assert!((1..=2).contains(&row.runs), "runs = {}", row.runs);
    assert_eq!(row.checkpoint, Some(json!({"runs": 1})));
    let long_row = common::task(&db, long).await;
    assert_eq!(
        (
            long_row.status.as_str(),
            long_row.attempts,
            long_row.locked_by
        ),
        ("queued", 0, None),
        "the other running task was not handed back when the pool stopped"
    );
    // The registry row is gone after a clean stop.
    let workers: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.workers")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(workers, 0);
    // The next pool resumes it: the error is not repeated.
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    assert_eq!(common::task(&db, id).await.attempts, 1);
}

struct Panics;

#[async_trait]
impl SyncWorker for Panics {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        if task.attempt() == 1 {
            panic!("boom on attempt 1");
        }
        Ok(json!("recovered"))
    }
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_panic_is_retryable_and_the_worker_lives_on(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = common::insert(&db, "d", "panics", json!({})).await;
    let pool = WorkerPool::builder(db.clone())
        .register("panics", Panics)
        .register_builtins()
        .config(PoolConfig {
            concurrency: 1,
            ..common::fast_config()
        })
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_status(&db, id, "succeeded").await;
    // The same pool, with its one slot, goes on running tasks.
    let next = common::insert(&db, "d", "noop", json!({})).await;
    common::wait_status(&db, next, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!((row.attempts, row.runs), (2, 2));
    assert_eq!(row.result, Some(json!("recovered")));
    let errors = errors_of(&db, id).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, 1);
    assert!(
        errors[0].1.contains("handler panicked: boom on attempt 1"),
        "{errors:?}"
    );
}

/// Records the order in which tasks start.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<i64>>>);

#[async_trait]
impl SyncWorker for Recorder {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        self.0.lock().unwrap().push(task.id().into());
        Ok(json!(null))
    }
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn within_a_dataset_priority_then_run_at_then_id(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    let past = Utc::now() - chrono::Duration::hours(1);
    // b and e tie on priority and run_at (the same instant, whole
    // microseconds): only the id orders them.
    let tie = DateTime::from_timestamp_micros(
        (Utc::now() - chrono::Duration::minutes(1)).timestamp_micros(),
    )
    .unwrap();
    let a = manager
        .enqueue(NewTask::new("d", "rec").priority(1))
        .await
        .unwrap();
    let b = manager
        .enqueue(NewTask::new("d", "rec").run_at(tie))
        .await
        .unwrap();
    let c = manager
        .enqueue(NewTask::new("d", "rec").run_at(past))
        .await
        .unwrap();
    let d = manager
        .enqueue(NewTask::new("d", "rec").priority(-5))
        .await
        .unwrap();
    let e = manager
        .enqueue(NewTask::new("d", "rec").run_at(tie))
        .await
        .unwrap();
    let recorder = Recorder::default();
    let pool = WorkerPool::builder(db.clone())
        .register("rec", recorder.clone())
        .config(PoolConfig {
            concurrency: 1,
            ..common::fast_config()
        })
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_status(&db, a, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    assert_eq!(*recorder.0.lock().unwrap(), vec![d, c, b, e, a]);
}

/// The pool polls only every 5 s, and nothing notifies it when the task
/// becomes due: it must have set its own timer from `run_at`. Started no
/// earlier than `run_at` (exact, database clock) and less than 1 s after
/// it: a timer wakes it some 5–50 ms late; a pool waiting for its poll
/// would be up to 5 s late. The 1 s bound leaves a loaded machine 20× the
/// usual lateness, on a multi-thread runtime so the test's own polling
/// does not delay the pool.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_delayed_task_starts_on_time_without_a_notify(_: PgPoolOptions, opts: PgConnectOptions) {
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        let config = PoolConfig {
            poll_interval: Duration::from_secs(5),
            ..common::fast_config()
        };
        let (handle, run) = common::spawn(builtin_pool(&db, config));
        common::wait_for("the pool is registered", WAIT, || {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM syncq.workers")
                    .fetch_one(&db)
                    .await
                    .unwrap()
                    == 1
            }
        })
        .await;
        // Its insert notifies the pool, which finds nothing ready yet.
        let id = TaskQueueManager::new(db.clone())
            .enqueue(NewTask::new("d", "noop").delay(Duration::from_secs(1)))
            .await
            .unwrap();
        common::wait_status(&db, id, "succeeded").await;
        handle.checkpoint();
        run.await.unwrap().unwrap();
        let (late_ms, delay_ms): (f64, f64) = sqlx::query_as(
            "SELECT extract(epoch FROM started_at - run_at)::float8 * 1000,
                    extract(epoch FROM run_at - created_at)::float8 * 1000
             FROM syncq.tasks WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&db)
        .await
        .unwrap();
        assert!((999.0..=1001.0).contains(&delay_ms), "delay {delay_ms} ms");
        assert!(late_ms >= 0.0, "started {} ms before run_at", -late_ms);
        assert!(late_ms < 1000.0, "started {late_ms} ms after run_at");
    })
    .await;
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_worker_claims_only_kinds_it_has_handlers_for(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    // First in the dataset's order (priority, then id): one slot claiming
    // regardless of kind would take it before `mine`.
    let foreign: i64 = sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, priority) VALUES ('d', 'someone_elses_kind', -1)
         RETURNING id",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    let mine = common::insert(&db, "d", "noop", json!({})).await;
    let config = PoolConfig {
        concurrency: 1,
        ..common::fast_config()
    };
    let (handle, run) = common::spawn(builtin_pool(&db, config));
    common::wait_status(&db, mine, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, foreign).await;
    assert_eq!((row.status.as_str(), row.runs), ("queued", 0));
}

/// Sessions of this test's database whose last statement was a LISTEN: a
/// listening session stays idle on it while it waits for notifications.
async fn listening_sessions(db: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND query ILIKE 'LISTEN%'",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn poll_only_mode_still_runs_tasks(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let config = PoolConfig {
        listen: false,
        ..common::fast_config()
    };
    // The first task is taken by the pool's first claim; once it is done
    // the pool is idle, and the second can only be found by a poll.
    let first = common::insert(&db, "d", "noop", json!({})).await;
    let (handle, run) = common::spawn(builtin_pool(&db, config));
    common::wait_status(&db, first, "succeeded").await;
    let second = common::insert(&db, "d", "noop", json!({})).await;
    common::wait_for("the second task is polled and run", WAIT, || {
        let db = db.clone();
        async move {
            // All along, no session of the pool listens.
            assert_eq!(listening_sessions(&db).await, 0, "a poll-only pool LISTENs");
            common::status(&db, second).await == "succeeded"
        }
    })
    .await;
    // It has run at least two polls now; still no LISTEN.
    assert_eq!(listening_sessions(&db).await, 0, "a poll-only pool LISTENs");
    handle.checkpoint();
    run.await.unwrap().unwrap();

    // The probe sees a listening pool's session: the zeros above mean
    // something.
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_for("a listening pool's LISTEN session is seen", WAIT, || {
        let db = db.clone();
        async move { listening_sessions(&db).await > 0 }
    })
    .await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_paused_dataset_starts_nothing_until_resumed(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    manager.queue("slow").pause().await.unwrap();
    let held = common::insert(&db, "slow", "noop", json!({})).await;
    let free = common::insert(&db, "fast", "noop", json!({})).await;
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    // The claim that took `free` (up to 4 tasks, every ready dataset) would
    // have taken `held` too, were the pause ignored.
    common::wait_status(&db, free, "succeeded").await;
    let row = common::task(&db, held).await;
    assert_eq!((row.status.as_str(), row.runs), ("queued", 0));
    let before_resume: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&db)
        .await
        .unwrap();
    manager.queue("slow").resume().await.unwrap();
    common::wait_status(&db, held, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    // Started once, and only after the resume (database clock).
    let (runs, started): (i32, DateTime<Utc>) =
        sqlx::query_as("SELECT runs, started_at FROM syncq.tasks WHERE id = $1")
            .bind(held)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(runs, 1);
    assert!(
        started > before_resume,
        "started at {started}, before the resume at {before_resume}"
    );
}

/// Returns a result PostgreSQL cannot store (a NUL character in jsonb).
struct UnstorableResult;

#[async_trait]
impl SyncWorker for UnstorableResult {
    async fn handle(&self, _task: &mut SyncTask) -> TaskResult {
        Ok(json!({ "text": "nul \u{0} here" }))
    }
}

/// Successes are written in batches; one whose result the database refuses
/// must not take its batch down with it: the others succeed once, and it
/// fails at once with the reason, instead of being retried by lease expiry.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_result_the_database_refuses_fails_alone_in_its_batch(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    let bad = manager
        .enqueue(NewTask::new("d", "unstorable"))
        .await
        .unwrap();
    manager
        .enqueue_many((0..200).map(|_| NewTask::new("d", "noop")))
        .await
        .unwrap();
    let pool = WorkerPool::builder(db.clone())
        .register_builtins()
        .register("unstorable", UnstorableResult)
        .config(PoolConfig {
            concurrency: 64,
            ..common::fast_config()
        })
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_for("every task finished", WAIT, || {
        let db = db.clone();
        async move { common::count(&db, "status IN ('queued', 'running')").await == 0 }
    })
    .await;
    handle.checkpoint();
    run.await.unwrap().unwrap();

    assert_eq!(
        common::count(
            &db,
            "kind = 'noop' AND status = 'succeeded' AND attempts = 1"
        )
        .await,
        200
    );
    let row = common::task(&db, bad).await;
    assert_eq!((row.status.as_str(), row.attempts), ("failed", 1));
    let error = row.last_error.unwrap_or_default();
    assert!(error.contains("result could not be stored"), "{error}");
}

/// The local queue (SPEC §2, §4): one slot, short tasks, then a long one,
/// then more short ones. While the long one runs, tasks leased ahead wait
/// `queued` in the pool's name, not started — and at a checkpoint they go back unstarted and uncounted, as
/// does the interrupted long one; no task is left `running` or held.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_task_leased_ahead_waits_its_turn_and_goes_back_uncounted_at_a_checkpoint(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        sqlx::query(
            r#"INSERT INTO syncq.tasks (dataset_id, kind, payload)
               SELECT 'd', 'sleep', CASE WHEN i = 101 THEN '{"ms": 5000}' ELSE '{"ms": 1}' END::jsonb
               FROM generate_series(1, 200) i ORDER BY i"#,
        )
        .execute(&db)
        .await
        .unwrap();
        let pool = WorkerPool::builder(db.clone())
            .register_builtins()
            .config(PoolConfig {
                concurrency: 1,
                ..common::fast_config()
            })
            .build()
            .unwrap();
        let (handle, run) = common::spawn(pool);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let ahead = common::count(&db, "status = 'queued' AND locked_by IS NOT NULL").await;
            let long_runs =
                common::count(&db, "status = 'running' AND payload->>'ms' = '5000'").await;
            if ahead > 0 && long_runs == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the pool never leased a task ahead of its slot"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        handle.checkpoint();
        run.await.unwrap().unwrap();

        assert_eq!(common::count(&db, "status = 'running'").await, 0);
        assert_eq!(
            common::count(&db, "locked_by IS NOT NULL").await,
            0,
            "a task is still held"
        );
        let (done, counted_wrongly): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'succeeded'),
                    count(*) FILTER (WHERE status = 'queued' AND attempts <> 0
                                        OR status = 'succeeded' AND attempts <> 1)
             FROM syncq.tasks",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert!(done >= 100, "the short tasks before the long one ran");
        assert_eq!(
            counted_wrongly, 0,
            "an attempt counted for a task never finished"
        );
        // Started in claim order: the successes are the lowest ids.
        let out_of_order: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM syncq.tasks s WHERE s.status = 'succeeded'
               AND EXISTS (SELECT 1 FROM syncq.tasks q
                           WHERE q.status = 'queued' AND q.id < s.id)",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!(out_of_order, 0, "a later task ran before an earlier one");
    })
    .await;
}

/// A handler that records each start, then sleeps `{"ms": N}`.
#[derive(Clone, Default)]
struct StartRecorder(Arc<Mutex<Vec<i64>>>);

#[async_trait]
impl SyncWorker for StartRecorder {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        self.0.lock().unwrap().push(task.id().into());
        let ms = task.payload()["ms"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(json!(null))
    }
}

/// A task cancelled while it waits in the local queue (leased ahead of
/// the pool's one slot, busy with a long task) ends `cancelled` without
/// its handler starting.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_task_cancelled_while_leased_ahead_never_starts(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    common::on_multi_thread(async move {
        let db = common::connect(&opts).await;
        let manager = TaskQueueManager::new(db.clone());
        // Short tasks set the pool's pace (it leases ahead), then a long
        // one holds its only slot while the next ones wait leased ahead.
        let short = |_| NewTask::new("d", "rec").payload(json!({"ms": 1}));
        manager.enqueue_many((0..100).map(short)).await.unwrap();
        let long: i64 = manager
            .enqueue(NewTask::new("d", "rec").payload(json!({"ms": 3000})))
            .await
            .unwrap()
            .into();
        manager.enqueue_many((0..100).map(short)).await.unwrap();
        let recorder = StartRecorder::default();
        let pool = WorkerPool::builder(db.clone())
            .register("rec", recorder.clone())
            .config(PoolConfig {
                concurrency: 1,
                ..common::fast_config()
            })
            .build()
            .unwrap();
        let (handle, run) = common::spawn(pool);
        let mut waiting = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while waiting.is_none() {
            let leased: Option<i64> = sqlx::query_scalar(
                "SELECT id FROM syncq.tasks WHERE status = 'queued' AND locked_by IS NOT NULL
                   AND lease_expires_at > now() AND id > $1 ORDER BY id DESC LIMIT 1",
            )
            .bind(long)
            .fetch_optional(&db)
            .await
            .unwrap();
            let started = recorder.0.lock().unwrap().clone();
            // Behind the long task, in the slot now.
            if let Some(id) = leased
                && started.last() == Some(&long)
            {
                waiting = Some(id);
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nothing waited ahead"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let waiting = waiting.unwrap();
        sqlx::query("UPDATE syncq.tasks SET cancel_requested = true WHERE id = $1")
            .bind(waiting)
            .execute(&db)
            .await
            .unwrap();
        common::wait_status(&db, waiting, "cancelled").await;
        handle.checkpoint();
        run.await.unwrap().unwrap();
        assert!(
            !recorder.0.lock().unwrap().contains(&waiting),
            "the handler of a task cancelled in the local queue started"
        );
    })
    .await;
}

/// A handler answering `rate_limited` with a Retry-After of 1 ms, 60
/// times before it succeeds: its uncounted ends keep at most 20 error rows
/// for that attempt (the history is bounded, however long the loop), and
/// the task then succeeds at its first counted attempt.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_throttle_loop_keeps_a_bounded_error_history(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let id = TaskQueueManager::new(db.clone())
        .enqueue(
            NewTask::new("d", "fail")
                .payload(json!({"error": "rate_limited", "times": 60, "retry_after_ms": 1})),
        )
        .await
        .unwrap();
    let (handle, run) = common::spawn(builtin_pool(&db, common::fast_config()));
    common::wait_status(&db, id, "succeeded").await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let row = common::task(&db, id).await;
    assert_eq!(row.attempts, 1);
    assert!(row.runs > 60, "runs {}", row.runs);
    let errors = errors_of(&db, id.0).await;
    assert_eq!(errors.len(), 20, "{errors:?}");
    assert!(
        errors.iter().all(|(attempt, _)| *attempt == 1),
        "{errors:?}"
    );
}
