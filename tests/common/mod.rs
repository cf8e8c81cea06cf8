//! Shared helpers for the integration tests: fresh databases come from
//! `#[sqlx::test(migrator = "syncq::MIGRATOR")]` (migrations applied); these build pools on them, wait for
//! conditions with timeouts, and read task rows.
#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};
use syncq::{Backoff, PoolConfig, PoolHandle, WorkerPool};
use tokio::task::JoinHandle;

/// A private PostgreSQL, when the test binary had to start one.
static PRIVATE_POSTGRES: std::sync::Mutex<Option<syncq::local_postgres::LocalPostgres>> =
    std::sync::Mutex::new(None);

/// Before any test: make `DATABASE_URL` name a server that answers, with
/// its database created (`#[sqlx::test(migrator = "syncq::MIGRATOR")]` connects there to create each
/// test's database). Where nothing answers at the local default, a private
/// cluster is started from the installed server programs.
#[ctor::ctor(unsafe)]
fn prepare_database() {
    match syncq::testing::prepare_database_url() {
        Ok(private) => {
            *PRIVATE_POSTGRES
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = private;
        }
        Err(e) => eprintln!("test set-up: {e}"),
    }
}

/// After the tests: stop and delete a private cluster.
#[dtor::dtor(unsafe)]
fn remove_private_database() {
    if let Ok(mut private) = PRIVATE_POSTGRES.lock() {
        private.take();
    }
}

/// A connection pool on the test's database with room for worker pools.
pub async fn connect(opts: &PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts.clone())
        .await
        .expect("connect to the test database")
}

/// The URL of the test's database, for child processes.
pub fn url(opts: &PgConnectOptions) -> String {
    format!(
        "postgres://{}@{}:{}/{}",
        opts.get_username(),
        opts.get_host(),
        opts.get_port(),
        opts.get_database().expect("test database name")
    )
}

/// A pool configuration with short timings, so tests run fast.
pub fn fast_config() -> PoolConfig {
    PoolConfig {
        concurrency: 4,
        lease: Duration::from_secs(3),
        heartbeat: Duration::from_millis(300),
        poll_interval: Duration::from_millis(200),
        rescue_interval: Duration::from_millis(200),
        shutdown_grace: Duration::from_secs(3),
        backoff: Backoff {
            base: Duration::from_millis(20),
            max: Duration::from_millis(200),
            jitter: 0.1,
        },
        default_retry_after: Duration::from_millis(500),
        ..PoolConfig::default()
    }
}

/// Runs a pool in the background.
pub fn spawn(pool: WorkerPool) -> (PoolHandle, JoinHandle<syncq::Result<()>>) {
    let handle = pool.handle();
    (handle, tokio::spawn(pool.run()))
}

/// Waits until `check` holds, polling every 20 ms, or panics after `timeout`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until task `id` has status `want` (15 s at most).
pub async fn wait_status(db: &PgPool, id: impl Into<i64>, want: &'static str) {
    let id: i64 = id.into();
    wait_for(
        &format!("task {id} is {want}"),
        Duration::from_secs(15),
        || {
            let db = db.clone();
            async move { status(&db, id).await == want }
        },
    )
    .await;
}

/// The fields of a task row the tests look at.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskRow {
    pub id: i64,
    pub dataset_id: String,
    pub kind: String,
    pub payload: Value,
    pub status: String,
    pub priority: i16,
    pub attempts: i32,
    pub max_attempts: i32,
    pub runs: i32,
    pub unique_key: Option<String>,
    pub checkpoint: Option<Value>,
    pub result: Option<Value>,
    pub last_error: Option<String>,
    pub locked_by: Option<String>,
}

pub async fn task(db: &PgPool, id: impl Into<i64>) -> TaskRow {
    let id: i64 = id.into();
    let r = sqlx::query(
        "SELECT id, dataset_id, kind, payload, status::text AS status, priority, attempts,
                max_attempts, runs, unique_key, checkpoint, result, last_error, locked_by
         FROM syncq.tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_one(db)
    .await
    .expect("task row");
    TaskRow {
        id: r.get("id"),
        dataset_id: r.get("dataset_id"),
        kind: r.get("kind"),
        payload: r.get("payload"),
        status: r.get("status"),
        priority: r.get("priority"),
        attempts: r.get("attempts"),
        max_attempts: r.get("max_attempts"),
        runs: r.get("runs"),
        unique_key: r.get("unique_key"),
        checkpoint: r.get("checkpoint"),
        result: r.get("result"),
        last_error: r.get("last_error"),
        locked_by: r.get("locked_by"),
    }
}

pub async fn status(db: &PgPool, id: impl Into<i64>) -> String {
    let id: i64 = id.into();
    sqlx::query_scalar("SELECT status::text FROM syncq.tasks WHERE id = $1")
        .bind(id)
        .fetch_one(db)
        .await
        .expect("task status")
}

pub async fn count(db: &PgPool, sql_where: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM syncq.tasks WHERE {sql_where}"
    )))
    .fetch_one(db)
    .await
    .expect("count")
}

/// Inserts a task by plain SQL, as another service would; returns its id.
pub async fn insert(db: &PgPool, dataset: &str, kind: &str, payload: Value) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO syncq.tasks (dataset_id, kind, payload) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(dataset)
    .bind(kind)
    .bind(payload)
    .fetch_one(db)
    .await
    .expect("insert task")
}

/// A real `syncq worker` process; its log goes to a file read by `log()`.
/// Killed on drop, so a failing test leaves no process behind.
pub struct WorkerProcess {
    pub child: std::process::Child,
    log: std::path::PathBuf,
}

impl WorkerProcess {
    /// Starts `syncq worker` on `url` with `args` (and `env`), logging at
    /// info.
    pub fn start(url: &str, args: &[&str], env: &[(&str, &str)]) -> WorkerProcess {
        let log = std::env::temp_dir().join(format!(
            "syncq-test-worker-{}-{:08x}.log",
            std::process::id(),
            rand_suffix()
        ));
        let file = std::fs::File::create(&log).expect("create the worker's log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
            .env("DATABASE_URL", url)
            .env("RUST_LOG", "syncq=info")
            .envs(env.iter().copied())
            .arg("worker")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start a worker process");
        WorkerProcess { child, log }
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (`-STOP`, `-CONT`, `-KILL`, `-TERM`) without
    /// blocking the runtime.
    pub async fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        let status = tokio::time::timeout(
            Duration::from_secs(10),
            tokio::process::Command::new("kill")
                .args([sig, &pid])
                .status(),
        )
        .await
        .unwrap_or_else(|_| panic!("kill {sig} {pid} did not return"))
        .expect("run kill");
        assert!(status.success(), "kill {sig} {pid} failed");
    }

    /// Waits (without blocking the runtime) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "worker did not exit within {timeout:?}; its log:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn rand_suffix() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// Counts of tasks by status.
pub async fn by_status(db: &PgPool) -> std::collections::BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT status::text, count(*) FROM syncq.tasks GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(db)
    .await
    .expect("count by status")
    .into_iter()
    .collect()
}

/// Refuses new connections to `database` and ends its sessions, as an
/// outage does to its clients, through `admin` (a connection to another
/// database of the same server). Undo with `allow_connections`.
pub async fn refuse_connections(admin: &PgPool, database: &str) {
    let quoted = format!("\"{}\"", database.replace('"', "\"\""));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {quoted} WITH ALLOW_CONNECTIONS false"
    )))
    .execute(admin)
    .await
    .expect("refuse connections");
    terminate_backends(admin, database).await;
}

/// Lets connections to `database` in again.
pub async fn allow_connections(admin: &PgPool, database: &str) {
    let quoted = format!("\"{}\"", database.replace('"', "\"\""));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {quoted} WITH ALLOW_CONNECTIONS true"
    )))
    .execute(admin)
    .await
    .expect("allow connections");
}

/// Terminates every session on `database`; returns how many.
pub async fn terminate_backends(admin: &PgPool, database: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = $1 AND pid <> pg_backend_pid()",
    )
    .bind(database)
    .fetch_one(admin)
    .await
    .expect("terminate backends")
}

/// A pool on the `postgres` database of the test's server.
pub async fn admin(opts: &PgConnectOptions) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts.clone().database("postgres"))
        .await
        .expect("connect to the postgres database")
}

/// The environment that makes a worker log each attempt's start and end.
pub const ATTEMPT_LOG_ENV: &[(&str, &str)] = &[("RUST_LOG", "syncq=info,syncq::attempt=debug")];

/// From the workers' logs: each task's handler ends, by task id, with
/// their outcomes (`Succeeded`, `Retried`, `LeaseLost`, …).
pub fn attempts_ended(workers: &[&WorkerProcess]) -> std::collections::BTreeMap<i64, Vec<String>> {
    let mut ended: std::collections::BTreeMap<i64, Vec<String>> = Default::default();
    for w in workers {
        for line in w.log().lines().filter(|l| l.contains("attempt ended")) {
            let field = |name: &str| {
                line.split([' ', '{', '}', ':'])
                    .find_map(|part| part.strip_prefix(name))
                    .map(str::to_string)
            };
            let id = field("task_id=").and_then(|v| v.parse::<i64>().ok());
            let outcome = field("outcome=");
            if let (Some(id), Some(outcome)) = (id, outcome) {
                ended.entry(id).or_default().push(outcome);
            }
        }
    }
    ended
}

/// [`attempts_ended`] once the logs name `n` tasks, or after 30 s. A
/// worker logs an attempt's end just after its outcome commits, so a test
/// that saw the rows finish waits here for the lines to catch up; the
/// caller asserts on what it gets.
pub async fn attempts_ended_by(
    workers: &[&WorkerProcess],
    n: usize,
) -> std::collections::BTreeMap<i64, Vec<String>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ended = attempts_ended(workers);
        if ended.len() >= n || tokio::time::Instant::now() > deadline {
            return ended;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `work` on a multi-thread runtime of its own (two worker threads)
/// and waits for it. `#[sqlx::test(migrator = "syncq::MIGRATOR")]` runs a test on a current-thread
/// runtime, where pools, polling and the test share one thread; a test
/// that measures time runs its body here instead.
pub async fn on_multi_thread<F>(work: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a multi-thread runtime")
            .block_on(work)
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// The test's own connections to its database, under the application name
/// `observer`, so that the workers' sessions can be told apart in
/// `pg_stat_activity`.
pub async fn observer(opts: &PgConnectOptions, observer: &str, connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(opts.clone().application_name(observer))
        .await
        .expect("connect to the test database")
}

/// Waits until no session of the test's database is left but the test's
/// own (named `observer`): a killed worker's statements have all ended (a
/// statement sent just before kill -9 still commits), so its rows are final.
pub async fn wait_sessions_gone(db: &PgPool, observer: &'static str) {
    wait_for(
        "the killed worker's sessions ended",
        Duration::from_secs(60),
        || {
            let db = db.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND backend_type = 'client backend'
                   AND application_name IS DISTINCT FROM $1",
                )
                .bind(observer)
                .fetch_one(&db)
                .await
                .unwrap()
                    == 0
            }
        },
    )
    .await;
}

/// The `counted` value of a `count` task's checkpoint (0 without one).
pub async fn counted(db: &PgPool, id: impl Into<i64>) -> u64 {
    task(db, id)
        .await
        .checkpoint
        .and_then(|c| c["counted"].as_u64())
        .unwrap_or(0)
}

/// Whether a dataset is paused (false without a settings row).
pub async fn paused(db: &PgPool, dataset: &str) -> bool {
    sqlx::query_scalar(
        "SELECT coalesce((SELECT paused FROM syncq.datasets WHERE dataset_id = $1), false)",
    )
    .bind(dataset)
    .fetch_one(db)
    .await
    .expect("read paused")
}

/// Whether the tests run as root (real user id 0).
pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        .unwrap_or(false)
}

/// Installs Debian `packages` when the tests run as root (as `.ci/run`
/// does up front), updating the package lists once if the first try
/// fails; does nothing otherwise. The caller looks for the programs after.
pub fn apt_install_if_root(packages: &[&str]) {
    if !running_as_root() {
        return;
    }
    let install = || {
        std::process::Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        let _ = std::process::Command::new("apt-get")
            .args(["update", "-q"])
            .status();
        install();
    }
}
