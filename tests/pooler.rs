//! SPEC §6: syncq works through a transaction-mode pooler, for producers
//! and workers alike, once told so. A real PgBouncer (the distribution's
//! package; `.ci/run` installs it) in `pool_mode = transaction`, with a
//! small server pool so that clients share server connections.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::WorkerProcess;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use syncq::{Db, NewTask, Pooler, TaskQueueManager};

const WAIT: Duration = Duration::from_secs(90);

/// A PgBouncer in transaction mode in front of the test's server, stopped
/// and removed on drop.
struct PgBouncer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl PgBouncer {
    async fn start(server: &PgConnectOptions) -> PgBouncer {
        let bin = pgbouncer_bin();
        let dir = std::env::temp_dir().join(format!(
            "syncq-pgbouncer-{}-{}",
            std::process::id(),
            server.get_database().unwrap_or("db")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let user = server.get_username();
        std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n")).unwrap();
        // What a user sets for syncq (README, "Behind PgBouncer"):
        // transaction mode, and sqlx's extra_float_digits let through.
        let ini = format!(
            "[databases]\n\
             * = host={host} port={server_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/users.txt\n\
             pool_mode = transaction\n\
             ignore_startup_parameters = extra_float_digits\n\
             default_pool_size = 4\n\
             max_client_conn = 500\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            host = server.get_host(),
            server_port = server.get_port(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), ini).unwrap();
        let mut cmd = Command::new(bin);
        // PgBouncer refuses to run as root: drop to an ordinary user.
        if common::running_as_root() {
            use std::os::unix::fs::PermissionsExt;
            for f in ["", "users.txt", "pgbouncer.ini"] {
                let mode = if f.is_empty() { 0o777 } else { 0o644 };
                std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(mode))
                    .unwrap();
            }
            cmd.args(["-u", "nobody"]);
        }
        let child = cmd
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbouncer");
        let bouncer = PgBouncer { child, dir, port };
        common::wait_for("pgbouncer accepts connections", WAIT, || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        bouncer
    }

    fn url(&self, database: &str, user: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `pgbouncer` program; installed from the distribution's packages
/// when missing and the tests run as root (as `.ci/run` does up front).
fn pgbouncer_bin() -> PathBuf {
    let find = || {
        [
            "/usr/sbin/pgbouncer",
            "/usr/bin/pgbouncer",
            "/usr/local/bin/pgbouncer",
        ]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    };
    if let Some(bin) = find() {
        return bin;
    }
    common::apt_install_if_root(&["pgbouncer"]);
    find().expect("pgbouncer is not installed: apt-get install -y pgbouncer (.ci/run does)")
}

/// Runs `syncq` with `args` through the pooler; returns (exit code, stdout,
/// stderr) without blocking the test's runtime.
async fn syncq(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", url)
        .env("SYNCQ_POOLER", "transaction")
        .args(args)
        .output()
        .await
        .expect("run syncq");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn producers_and_workers_work_through_pgbouncer_in_transaction_mode(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let direct = common::connect(&opts).await;
    let database = opts.get_database().unwrap().to_string();
    let user = opts.get_username().to_string();
    let bouncer = PgBouncer::start(&opts).await;
    let url = bouncer.url(&database, &user);
    let pooled: PgPool = PgPoolOptions::new()
        .max_connections(16)
        .connect(&url)
        .await
        .expect("connect through pgbouncer");
    let db = Db::new(pooled.clone()).with_pooler(Pooler::Transaction);
    let manager = TaskQueueManager::new(db.clone());

    // Producers: the library from 16 concurrent tasks (one statement each,
    // more clients than server connections), a batch, plain SQL, the CLI.
    let mut producers = tokio::task::JoinSet::new();
    for p in 0..16 {
        let manager = manager.clone();
        producers.spawn(async move {
            for i in 0..40 {
                manager
                    .enqueue(
                        NewTask::new(format!("lib{}", p % 4), "noop").payload(json!({ "i": i })),
                    )
                    .await
                    .expect("enqueue through pgbouncer");
            }
        });
    }
    while let Some(done) = producers.join_next().await {
        done.unwrap();
    }
    let batch = (0..1000).map(|i| NewTask::new("batch", "noop").payload(json!({ "i": i })));
    assert_eq!(manager.enqueue_many(batch).await.unwrap().len(), 1000);
    pooled
        .execute(
            "INSERT INTO syncq.tasks (dataset_id, kind, payload)
             SELECT 'sql', 'noop', jsonb_build_object('i', i) FROM generate_series(1, 300) i",
        )
        .await
        .expect("plain SQL through pgbouncer");
    for i in 0..5 {
        let payload = format!("{{\"i\": {i}}}");
        let (code, out, err) = syncq(
            &url,
            &[
                "enqueue",
                "--dataset",
                "cli",
                "--kind",
                "noop",
                "--payload",
                &payload,
            ],
        )
        .await;
        assert_eq!(code, Some(0), "syncq enqueue through pgbouncer: {err}");
        assert!(out.trim().parse::<i64>().is_ok(), "{out}");
    }
    let total = 16 * 40 + 1000 + 300 + 5;
    assert_eq!(common::count(&direct, "status = 'queued'").await, total);

    // Workers through the pooler: one polls only, one LISTENs on a direct
    // connection given with --listen-url.
    let args = [
        "--concurrency",
        "8",
        "--poll-interval",
        "100ms",
        "--heartbeat",
        "300ms",
        "--lease",
        "5s",
    ];
    let env = [("SYNCQ_POOLER", "transaction"), common::ATTEMPT_LOG_ENV[0]];
    let polling = WorkerProcess::start(&url, &args, &env);
    let direct_url = common::url(&opts);
    let mut listening_args = args.to_vec();
    listening_args.extend(["--listen-url", direct_url.as_str()]);
    let listening = WorkerProcess::start(&url, &listening_args, &env);
    common::wait_for("the drain through pgbouncer", WAIT, || async {
        common::count(&direct, "status = 'succeeded'").await == total
    })
    .await;
    let ended = common::attempts_ended_by(&[&polling, &listening], total as usize).await;
    assert_eq!(ended.len() as i64, total);
    assert!(
        ended.values().all(|o| o == &vec!["Succeeded".to_string()]),
        "a handler ran twice or did not succeed"
    );
    assert_eq!(common::count(&direct, "attempts <> 1").await, 0);

    // Cancel a running task through the pooler.
    let id = manager
        .enqueue(NewTask::new("long", "sleep").payload(json!({ "ms": 60_000 })))
        .await
        .unwrap();
    common::wait_status(&direct, id, "running").await;
    let (code, _, err) = syncq(&url, &["cancel", &id.to_string()]).await;
    assert_eq!(code, Some(0), "syncq cancel through pgbouncer: {err}");
    common::wait_status(&direct, id, "cancelled").await;

    // Status through the pooler names the datasets.
    let (code, out, err) = syncq(&url, &["status"]).await;
    assert_eq!(code, Some(0), "syncq status through pgbouncer: {err}");
    for dataset in ["lib0", "batch", "sql", "cli", "long"] {
        assert!(out.contains(dataset), "status lacks {dataset}:\n{out}");
    }

    // Not one prepared-statement error, in the workers or the pooler.
    for w in [&polling, &listening] {
        let log = w.log();
        assert!(!log.contains("prepared statement"), "{log}");
        assert!(!log.contains(" ERROR "), "{log}");
    }
    assert!(!bouncer.log().contains("prepared statement"));
    pooled.close().await;
}

/// The commands that keep session state refuse a transaction pooler, with
/// a usage error that says what to do.
#[tokio::test]
async fn migrate_refuses_a_transaction_pooler_with_a_usage_error() {
    let (code, _, err) = syncq("postgres://nobody@127.0.0.1:1/none", &["migrate"]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("direct connection"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
