//! The chaos test: worker processes drain a mixed workload while a driver,
//! at moments drawn from a fixed seed, kills a worker (SIGKILL), stops one
//! past its lease and resumes it (SIGSTOP / SIGCONT), terminates every
//! database session, and restarts PostgreSQL. A ledger written by the
//! handlers themselves is checked at the end:
//!
//! - every task finished, and succeeded (nothing here fails for good);
//! - the outcome on each row is its current run's (a run that lost its
//!   lease changed nothing, even when it ran on beside the next one);
//! - no dataset ever had more tasks running than its cap (sampled from the
//!   rows every few milliseconds) nor more starts in a window than its rate
//!   limit (every start a handler saw, by the claim's database time).
//!
//! `CHAOS_SECS` (default 30) sets how long faults are injected,
//! `CHAOS_SEED` the seed. The worker processes are this test binary run
//! again with `CHAOS_WORKER_URL` set (see `chaos_worker_process`).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use syncq::local_postgres::LocalPostgres;
use syncq::{
    NewTask, PoolConfig, RateLimit, SyncTask, SyncWorker, TaskError, TaskQueueManager, TaskResult,
    WorkerPool,
};

const LEASE: Duration = Duration::from_secs(2);
const WORKERS: usize = 3;

/// Datasets with limits: (name, cap, rate limit per second).
const LIMITED: [(&str, Option<i64>, Option<i64>); 3] = [
    ("rated", Some(3), Some(20)),
    ("capped", Some(2), None),
    ("free", None, None),
];

// ---------------------------------------------------------------- worker

/// The ledger kind: writes when it begins and ends, in the database, then
/// works in checkpointed steps; fails its first `fail_times` attempts.
struct Ledger {
    db: PgPool,
}

impl Ledger {
    /// Retries a ledger write through outages (the ledger is the test's
    /// instrument, not the task's work).
    async fn write(&self, sql: &str, task: &SyncTask, row: Option<i64>) -> Option<i64> {
        for _ in 0..300 {
            let written = sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_string()))
                .bind(task.id())
                .bind(task.run())
                .bind(task.started_at())
                .bind(row.unwrap_or(0))
                .fetch_one(&self.db)
                .await;
            match written {
                Ok(id) => return Some(id),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        None
    }
}

#[syncq::async_trait]
impl SyncWorker for Ledger {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        let row = self
            .write(
                "INSERT INTO chaos_ledger (task_id, run, claimed_at)
                 VALUES ($1, $2, $3) RETURNING id + 0 * $4",
                task,
                None,
            )
            .await;
        let steps = task.payload()["steps"].as_u64().unwrap_or(1);
        let step = Duration::from_millis(task.payload()["step_ms"].as_u64().unwrap_or(50));
        let fail_times = task.payload()["fail_times"].as_i64().unwrap_or(0);
        let done: u64 = task.checkpoint_as::<u64>()?.unwrap_or(0);
        let mut outcome: TaskResult = Ok(json!({ "run": task.run() }));
        if i64::from(task.attempt()) <= fail_times {
            outcome = Err(TaskError::Retryable("a flaky upstream".into()));
        } else {
            for n in done..steps {
                if let Some(stop) = task.sleep(step).await {
                    outcome = Err(stop.into());
                    break;
                }
                if let Err(e) = task.save_checkpoint(&(n + 1)).await {
                    outcome = Err(e);
                    break;
                }
            }
        }
        let label = match &outcome {
            Ok(_) => "ok".to_string(),
            Err(e) => format!("{e:?}"),
        };
        if let Some(row) = row {
            let sql = format!(
                "UPDATE chaos_ledger SET ended = clock_timestamp(), outcome = '{}'
                 WHERE id = $4 AND task_id = $1 AND run = $2 AND claimed_at = $3 RETURNING id",
                label.replace('\'', "")
            );
            self.write(&sql, task, Some(row)).await;
        }
        outcome
    }
}

/// Not a test of its own: the entry point of the chaos test's worker
/// processes (this binary, run again with `CHAOS_WORKER_URL` set). Without
/// it, it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the chaos test as a worker process"]
async fn chaos_worker_process() {
    let Ok(url) = std::env::var("CHAOS_WORKER_URL") else {
        return;
    };
    let db = PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(5))
        .connect(&url)
        .await
        .expect("connect");
    let config = PoolConfig {
        concurrency: 6,
        lease: LEASE,
        heartbeat: Duration::from_millis(400),
        poll_interval: Duration::from_millis(200),
        rescue_interval: Duration::from_millis(300),
        shutdown_grace: Duration::from_secs(2),
        ..PoolConfig::default()
    };
    let pool = WorkerPool::builder(db.clone())
        .register_builtins()
        .register("ledger", Ledger { db })
        .config(config)
        .build()
        .expect("build the pool");
    pool.run_with_signals().await.expect("the pool ran");
}

// ---------------------------------------------------------------- driver

type Time = chrono::DateTime<chrono::Utc>;

/// A ledger row: task id, run, claimed at, began, ended, outcome.
type LedgerRow = (i64, i32, Time, Time, Option<Time>, Option<String>);

struct Worker(Child);

/// A copy of this test binary for the worker processes: a rebuild during a
/// long soak replaces the file `current_exe` names.
struct WorkerExe(std::path::PathBuf);

impl WorkerExe {
    fn copy() -> WorkerExe {
        let path = std::env::temp_dir().join(format!("syncq-chaos-worker-{}", std::process::id()));
        std::fs::copy(std::env::current_exe().expect("the test binary"), &path)
            .expect("copy the test binary");
        WorkerExe(path)
    }
}

impl Drop for WorkerExe {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Worker {
    fn start(exe: &WorkerExe, url: &str) -> Worker {
        let child = Command::new(&exe.0)
            .args([
                "chaos_worker_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("CHAOS_WORKER_URL", url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a worker process");
        Worker(child)
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One batch of the mixed workload.
async fn enqueue_batch(db: &PgPool, rng: &mut StdRng, round: usize) -> usize {
    let mut tasks = Vec::new();
    for i in 0..60 {
        tasks.push(NewTask::new("bulk", "noop").payload(json!({ "round": round, "i": i })));
    }
    for (dataset, _, _) in LIMITED {
        for _ in 0..8 {
            let fail_times = if rng.random_bool(0.2) { 2 } else { 0 };
            tasks.push(
                NewTask::new(dataset, "ledger")
                    .payload(json!({
                        "steps": rng.random_range(1..6),
                        "step_ms": rng.random_range(20..200),
                        "fail_times": fail_times,
                    }))
                    .max_attempts(100),
            );
        }
    }
    tasks.push(
        NewTask::new("counts", "count")
            .payload(json!({ "to": 10, "step_ms": 100 }))
            .max_attempts(100),
    );
    let n = tasks.len();
    TaskQueueManager::new(db.clone())
        .enqueue_many(tasks.into_iter().map(|t| t.max_attempts(100)))
        .await
        .expect("enqueue a batch");
    n
}

#[derive(Debug, Default)]
struct Faults {
    killed: u32,
    stopped: u32,
    terminated: u32,
    restarted: u32,
}

/// Keeps the largest running count per capped dataset, sampled from rows.
fn sample_caps(
    url: String,
    stop: Arc<AtomicBool>,
    max: Arc<[AtomicI64; 3]>,
    samples: Arc<AtomicI64>,
) {
    tokio::spawn(async move {
        let mut db: Option<PgPool> = None;
        while !stop.load(Ordering::Relaxed) {
            if db.is_none() {
                db = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(1))
                    .connect(&url)
                    .await
                    .ok();
            }
            if let Some(pool) = &db {
                let rows: Result<Vec<(String, i64)>, _> = sqlx::query_as(
                    "SELECT dataset_id, count(*) FROM syncq.tasks WHERE status = 'running'
                     GROUP BY dataset_id",
                )
                .fetch_all(pool)
                .await;
                if let Ok(rows) = rows {
                    samples.fetch_add(1, Ordering::Relaxed);
                    for (dataset, n) in rows {
                        if let Some(i) = LIMITED.iter().position(|(d, _, _)| *d == dataset) {
                            max[i].fetch_max(n, Ordering::Relaxed);
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_survive_kills_stops_lost_sessions_and_restarts() {
    let secs: u64 = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261201);
    let mut rng = StdRng::seed_from_u64(seed);
    let pg = LocalPostgres::start().expect("a private PostgreSQL cluster");
    let url = pg.url("postgres");
    let db = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await
        .unwrap();
    syncq::migrate(&db).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE chaos_ledger (
             id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
             task_id bigint NOT NULL, run int NOT NULL, claimed_at timestamptz NOT NULL,
             began timestamptz NOT NULL DEFAULT clock_timestamp(), ended timestamptz,
             outcome text)",
    )
    .execute(&db)
    .await
    .unwrap();
    let manager = TaskQueueManager::new(db.clone());
    for (dataset, cap, rate) in LIMITED {
        let queue = manager.queue(dataset);
        if let Some(rate) = rate {
            queue
                .set_rate_limit(Some(RateLimit::per_second(rate as u32).unwrap()))
                .await
                .unwrap();
        }
        queue
            .set_max_concurrency(cap.map(|c| c as u32))
            .await
            .unwrap();
    }

    let stop_sampling = Arc::new(AtomicBool::new(false));
    let max_running: Arc<[AtomicI64; 3]> = Arc::new(Default::default());
    let samples = Arc::new(AtomicI64::new(0));
    sample_caps(
        url.clone(),
        stop_sampling.clone(),
        max_running.clone(),
        samples.clone(),
    );

    let exe = WorkerExe::copy();
    let mut workers: Vec<Worker> = (0..WORKERS).map(|_| Worker::start(&exe, &url)).collect();
    let mut faults = Faults::default();
    let mut enqueued = 0;
    let mut round = 0;
    let chaos_until = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < chaos_until {
        // Work keeps arriving during the whole run (retried through the
        // outages the driver itself causes).
        loop {
            match tokio::time::timeout(Duration::from_secs(5), enqueue_batch(&db, &mut rng, round))
                .await
            {
                Ok(n) => {
                    enqueued += n;
                    break;
                }
                Err(_) => continue,
            }
        }
        round += 1;
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
        match rng.random_range(0..10) {
            0..=2 => {
                let i = rng.random_range(0..workers.len());
                workers[i].signal("-KILL");
                workers[i] = Worker::start(&exe, &url);
                faults.killed += 1;
            }
            3..=4 => {
                let i = rng.random_range(0..workers.len());
                workers[i].signal("-STOP");
                tokio::time::sleep(LEASE + Duration::from_millis(rng.random_range(200..1500)))
                    .await;
                workers[i].signal("-CONT");
                faults.stopped += 1;
            }
            5..=7 => {
                let admin = PgPoolOptions::new().max_connections(1).connect(&url).await;
                if let Ok(admin) = admin {
                    let _ = sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    )
                    .execute(&admin)
                    .await;
                    admin.close().await;
                    faults.terminated += 1;
                }
            }
            _ => {
                pg.restart().expect("restart PostgreSQL");
                faults.restarted += 1;
            }
        }
    }

    // Faults over: everything must finish.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let counts = loop {
        let counts: BTreeMap<String, i64> = match sqlx::query_as::<_, (String, i64)>(
            "SELECT status::text, count(*) FROM syncq.tasks GROUP BY 1",
        )
        .fetch_all(&db)
        .await
        {
            Ok(rows) => rows.into_iter().collect(),
            Err(_) => BTreeMap::new(),
        };
        let open = counts.get("queued").copied().unwrap_or(0)
            + counts.get("running").copied().unwrap_or(0);
        if !counts.is_empty() && open == 0 {
            break counts;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not finished 120 s after the faults stopped: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop_sampling.store(true, Ordering::Relaxed);
    for w in &workers {
        w.signal("-TERM");
    }

    // 1. Every task finished, and succeeded.
    let total: i64 = counts.values().sum();
    assert_eq!(total, enqueued as i64, "{counts:?}");
    assert_eq!(counts.get("succeeded").copied(), Some(total), "{counts:?}");

    // 2. Each outcome is its current run's; overlapping runs were fenced.
    let rows: Vec<(i64, i32, Option<Value>)> =
        sqlx::query_as("SELECT id, runs, result FROM syncq.tasks WHERE kind = 'ledger'")
            .fetch_all(&db)
            .await
            .unwrap();
    let ledger: Vec<LedgerRow> =
        sqlx::query_as(
            // By run, the claim order: a run's row can be written late
            // (its insert waited out an outage) after a later run's.
            "SELECT task_id, run, claimed_at, began, ended, outcome FROM chaos_ledger ORDER BY task_id, run, began",
        )
        .fetch_all(&db)
        .await
        .unwrap();
    let mut by_task: HashMap<i64, Vec<_>> = HashMap::new();
    for row in &ledger {
        by_task.entry(row.0).or_default().push(row);
    }
    let mut violations = Vec::new();
    let mut reruns = 0;
    let mut overlaps = 0;
    for (id, runs, result) in &rows {
        let written_by = result.as_ref().and_then(|r| r["run"].as_i64());
        if written_by != Some(i64::from(*runs)) {
            violations.push(format!(
                "task {id}: result {result:?} not from its current run {runs}"
            ));
        }
        let Some(entries) = by_task.get(id) else {
            violations.push(format!("task {id}: no run in the ledger"));
            continue;
        };
        reruns += entries.len().saturating_sub(1);
        for pair in entries.windows(2) {
            let (earlier, later) = (pair[0], pair[1]);
            let overlapped = earlier.4.is_none_or(|ended| ended > later.3);
            if overlapped {
                overlaps += 1;
                if Some(i64::from(earlier.1)) == written_by {
                    violations.push(format!(
                        "task {id}: run {} overlapped run {} and its outcome was written",
                        earlier.1, later.1
                    ));
                }
            }
        }
    }

    // 3. Caps: the largest running count sampled from the rows.
    for (i, (dataset, cap, _)) in LIMITED.iter().enumerate() {
        if let Some(cap) = cap {
            let max = max_running[i].load(Ordering::Relaxed);
            if max > *cap {
                violations.push(format!("{dataset}: {max} running at once, cap {cap}"));
            }
        }
    }

    // 4. Rate limits: no rate + 1 starts within one window (1 s).
    for (dataset, _, rate) in LIMITED {
        let Some(rate) = rate else { continue };
        let starts: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
            "SELECT DISTINCT l.claimed_at FROM chaos_ledger l JOIN syncq.tasks t ON t.id = l.task_id
             WHERE t.dataset_id = $1 ORDER BY 1",
        )
        .bind(dataset)
        .fetch_all(&db)
        .await
        .unwrap();
        let rate = rate as usize;
        for w in starts.windows(rate + 1) {
            if w[rate] - w[0] < chrono::Duration::seconds(1) {
                violations.push(format!(
                    "{dataset}: {} starts between {} and {}",
                    rate + 1,
                    w[0],
                    w[rate]
                ));
                break;
            }
        }
    }

    eprintln!(
        "chaos (seed {seed}, {secs} s of faults): faults {faults:?}; tasks {total} ({} with a ledger, \
         {} ledger runs); reruns {reruns}; overlapping runs (fenced) {overlaps}; cap samples {}; \
         largest running {:?}; violations {}",
        rows.len(),
        ledger.len(),
        samples.load(Ordering::Relaxed),
        max_running
            .iter()
            .map(|m| m.load(Ordering::Relaxed))
            .collect::<Vec<_>>(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "violations:\n{}",
        violations.join("\n")
    );
    assert!(
        faults.killed + faults.stopped + faults.terminated + faults.restarted > 0,
        "no fault was injected"
    );
    db.close().await;
}
