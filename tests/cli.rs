//! SPEC §5: the `syncq` command's exit codes and one-line errors.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::io::AsyncReadExt;

fn syncq(url: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_syncq"));
    match url {
        Some(url) => cmd.env("DATABASE_URL", url),
        None => cmd.env_remove("DATABASE_URL"),
    };
    cmd.args(args).output().expect("run syncq")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runtime errors: exit 1, one line, no panic text.
fn assert_runtime_error(out: &Output, mentions: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("DATABASE_URL is not set"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one line, got {err:?}");
    assert!(lines[0].starts_with("syncq: error: "), "{err}");
    assert!(
        lines[0].contains(mentions),
        "{err:?} should mention {mentions:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

const DOWN: &str = "postgres://postgres@127.0.0.1:1/syncq";

#[test]
fn every_command_against_a_down_server_exits_1_with_one_line() {
    for args in [
        &["migrate"][..],
        &["enqueue", "--dataset", "d", "--kind", "noop"],
        &["worker"],
        &["limit", "d", "--rate", "10/1s"],
        &["pause", "d"],
        &["resume", "d"],
        &["cancel", "1"],
        &["retry", "1"],
        &["prune", "--older-than", "7d"],
        &["roles"],
        &["status"],
        &["tasks"],
        &["show", "1"],
        &["bench", "--no-scale"],
    ] {
        let out = syncq(Some(DOWN), args);
        assert_runtime_error(&out, "cannot connect to PostgreSQL at 127.0.0.1:1/");
    }
}

#[test]
fn a_bad_url_exits_1() {
    let out = syncq(Some("mysql://nope"), &["migrate"]);
    assert_runtime_error(&out, "DATABASE_URL");
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn bad_json_is_a_usage_error_and_inserts_nothing(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let out = syncq(
        Some(&common::url(&opts)),
        &[
            "enqueue",
            "--dataset",
            "d",
            "--kind",
            "noop",
            "--payload",
            "{not json",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--payload"), "{}", stderr(&out));
    assert!(stderr(&out).contains("not valid JSON"), "{}", stderr(&out));
    assert_eq!(common::count(&db, "true").await, 0);
}

#[test]
fn usage_errors_exit_2() {
    let cases: &[&[&str]] = &[
        &[],
        &["bogus"],
        &["enqueue", "--kind", "noop"],
        &[
            "enqueue",
            "--dataset",
            "d",
            "--kind",
            "k",
            "--max-attempts",
            "0",
        ],
        &[
            "enqueue",
            "--dataset",
            "d",
            "--kind",
            "k",
            "--delay",
            "soon",
        ],
        &[
            "enqueue",
            "--dataset",
            "d",
            "--kind",
            "k",
            "--run-at",
            "yesterday",
        ],
        &[
            "enqueue",
            "--dataset",
            "d",
            "--kind",
            "k",
            "--delay",
            "1s",
            "--run-at",
            "2030-01-01T00:00:00Z",
        ],
        &[
            "enqueue",
            "--dataset",
            "d",
            "--kind",
            "k",
            "--priority",
            "99999",
        ],
        &["worker", "--concurrency", "0"],
        &["worker", "--lease", "forever"],
        &["limit", "d"],
        &["limit", "d", "--rate", "5/0s"],
        &["limit", "d", "--rate", "0/1s"],
        &["limit", "d", "--rate", "fast"],
        &["limit", "d", "--concurrency", "0"],
        &["limit", "d", "--concurrency", "-3"],
        &["pause"],
        &["resume", "a", "b"],
        &["cancel"],
        &["cancel", "x"],
        &["retry", "1", "--dataset", "d"],
        &["retry", "--dataset", "d", "--status", "succeeded"],
        &["prune"],
        &["prune", "--older-than", "7d", "--status", "queued"],
        &["tasks", "--limit", "0"],
        &["show"],
        &["worker", "--retention", "forever"],
    ];
    for args in cases {
        let out = syncq(Some(DOWN), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("panicked"));
    }
}

#[test]
fn a_heartbeat_not_shorter_than_the_lease_is_a_usage_error_naming_it() {
    let out = syncq(
        Some(DOWN),
        &["worker", "--lease", "5s", "--heartbeat", "10s"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("heartbeat"), "{}", stderr(&out));
    let out = Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", DOWN)
        .env("SYNCQ_LEASE", "1s")
        .env("SYNCQ_HEARTBEAT", "2s")
        .arg("worker")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "env vars are read: {}",
        stderr(&out)
    );
}

#[test]
fn without_database_url_the_default_is_printed() {
    // Whatever `show` then finds there, it first says which URL it used.
    let out = Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env_remove("DATABASE_URL")
        .args(["show", "1"])
        .output()
        .expect("run syncq");
    let err = stderr(&out);
    assert!(
        err.contains("DATABASE_URL is not set; using postgres://"),
        "{err}"
    );
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn enqueue_prints_the_id_and_the_existing_id_for_a_duplicate(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = common::url(&opts);
    let args = [
        "enqueue",
        "--dataset",
        "d",
        "--kind",
        "noop",
        "--unique-key",
        "k",
        "--delay",
        "30s",
    ];
    let first = syncq(Some(&url), &args);
    let second = syncq(Some(&url), &args);
    assert!(
        first.status.success() && second.status.success(),
        "{}",
        stderr(&second)
    );
    assert_eq!(first.stdout, second.stdout);
    let id: i64 = String::from_utf8_lossy(&first.stdout)
        .trim()
        .parse()
        .unwrap();
    let db = common::connect(&opts).await;
    let delayed: bool = sqlx::query_scalar(
        "SELECT run_at > created_at + interval '29 seconds' FROM syncq.tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(delayed);
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn limit_pause_and_resume_change_only_what_they_name(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = common::url(&opts);
    let ok = |args: &[&str]| {
        let out = syncq(Some(&url), args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let name = "it's a \"data set\" ü";
    assert_eq!(
        ok(&["limit", name, "--rate", "10/1s", "--create"]),
        format!("{name:?}: rate 10/1s, concurrency none, weight 1")
    );
    assert_eq!(
        ok(&["limit", name, "--concurrency", "3"]),
        format!("{name:?}: rate 10/1s, concurrency 3, weight 1")
    );
    ok(&["pause", name]);
    assert_eq!(
        ok(&["limit", name, "--rate", "none"]),
        format!("{name:?}: rate none, concurrency 3, weight 1, paused")
    );
    ok(&["resume", name]);
    let db = common::connect(&opts).await;
    let row: (Option<i32>, Option<i32>, bool) = sqlx::query_as(
        "SELECT rate_limit, max_concurrency, paused FROM syncq.datasets WHERE dataset_id = $1",
    )
    .bind(name)
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(row, (None, Some(3), false));
    // A refused value changes nothing.
    assert_eq!(
        syncq(Some(&url), &["limit", name, "--rate", "5/0s"])
            .status
            .code(),
        Some(2)
    );
    let after: Option<i32> =
        sqlx::query_scalar("SELECT max_concurrency FROM syncq.datasets WHERE dataset_id = $1")
            .bind(name)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(after, Some(3));
}

/// The bench names its scratch database `syncq_bench_<its pid>` on the
/// server of the URL it is given: this test gives it its own database's URL
/// and looks only at that one name — it exists while the bench runs and is
/// gone once it exits — so a bench run by anyone else at the same time
/// changes nothing here.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn bench_measures_in_a_scratch_database_and_drops_it(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(&opts))
        .args([
            "bench",
            "--tasks",
            "300",
            "--processes",
            "1",
            "--concurrency",
            "8",
            "--no-scale",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run syncq bench");
    let scratch = format!("syncq_bench_{}", child.id().expect("the bench's pid"));
    let exists = |db: PgPool, name: String| async move {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&db)
            .await
            .expect("look up the scratch database")
    };
    // Read its output while watching for its scratch database.
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let output = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (a, b) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        a.and(b).expect("read the bench's output");
        let status = child.wait().await.expect("wait for the bench");
        (status, out, err)
    };
    tokio::pin!(output);
    let mut seen = false;
    let (status, out, err) = tokio::time::timeout(BENCH_TIMEOUT, async {
        loop {
            tokio::select! {
                done = &mut output => break done,
                _ = tokio::time::sleep(Duration::from_millis(20)), if !seen => {
                    seen = exists(db.clone(), scratch.clone()).await;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("syncq bench did not finish within {BENCH_TIMEOUT:?}"));
    let err = String::from_utf8_lossy(&err);
    assert!(status.success(), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    let figures = doc["figures"].as_array().unwrap();
    let value = |prefix: &str| {
        figures
            .iter()
            .find(|f| f["name"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("no figure {prefix}: {doc:#}"))["value"]
            .as_f64()
            .unwrap()
    };
    for name in [
        "baseline: raw single-row INSERT",
        "enqueue: API, one task per call",
        "enqueue: API, 1,000 tasks per call",
        "enqueue: plain SQL",
        "baseline: raw SKIP LOCKED",
        "drain: noop, 1 dataset",
        "fair drain: 1,000 datasets",
    ] {
        assert!(value(name) > 0.0, "{name}");
    }
    let p50 = value("latency: insert->start p50");
    assert!(p50 > 0.0 && p50 < 1000.0, "p50 {p50} ms");
    let drain = figures
        .iter()
        .find(|f| f["name"] == "drain: noop, 1 dataset")
        .unwrap();
    assert!(drain["ratio"].as_f64().unwrap() > 0.0);
    // Its scratch database existed while it ran (so this is the right
    // name), and is gone.
    assert!(seen, "no database {scratch} was seen while the bench ran");
    assert!(
        !exists(db.clone(), scratch.clone()).await,
        "the bench left its scratch database {scratch} behind"
    );
}

/// The bench of 300 tasks takes seconds; this is for a hung one.
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `syncq` against `url` without blocking the runtime.
async fn syncq_async(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", url)
        .args(args)
        .output()
        .await
        .expect("run syncq")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Before `syncq migrate` every command says to run it (exit 1, one
/// line); `migrate` then says what it applied, and the next one that the
/// schema is up to date.
#[sqlx::test(migrations = false)]
async fn before_migrate_commands_say_to_migrate_and_migrate_says_what_it_applied(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = common::url(&opts);
    for args in [
        &["status"][..],
        &["enqueue", "--dataset", "d", "--kind", "noop"],
        &["tasks"],
    ] {
        let out = syncq_async(&url, args).await;
        assert_runtime_error(&out, "run `syncq migrate` first");
    }
    let first = syncq_async(&url, &["migrate"]).await;
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stdout(&first).starts_with("applied migrations 1–"),
        "{}",
        stdout(&first)
    );
    let again = syncq_async(&url, &["migrate"]).await;
    assert!(
        stdout(&again).starts_with("syncq schema is up to date (version "),
        "{}",
        stdout(&again)
    );
}

/// One rule: what names something the command cannot act on is a usage
/// error (exit 2), said in one line without a field prefix, and changes
/// nothing.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn naming_what_a_command_cannot_act_on_is_a_usage_error(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let url = common::url(&opts);
    let id = common::insert(&db, "d", "noop", serde_json::json!({})).await;
    sqlx::query("UPDATE syncq.tasks SET status = 'succeeded', finished_at = now() WHERE id = $1")
        .bind(id)
        .execute(&db)
        .await
        .unwrap();
    let usage = |out: &Output, mentions: &str| {
        let err = stderr(out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("syncq: error: "), "{err}");
        assert!(!err.contains("ID:") && !err.contains("DATASET:"), "{err}");
        assert!(
            err.contains(mentions),
            "{err:?} should mention {mentions:?}"
        );
    };
    let out = syncq_async(&url, &["retry", &id.to_string()]).await;
    usage(&out, "only failed or cancelled tasks can be retried");
    let out = syncq_async(&url, &["tasks", "--dataset", "nosuch"]).await;
    usage(&out, "no dataset \"nosuch\"");
    let out = syncq_async(&url, &["cancel", "--dataset", "nosuch"]).await;
    usage(&out, "no dataset \"nosuch\"");
    assert!(!stderr(&out).contains("--create"), "{}", stderr(&out));
    let out = syncq_async(&url, &["show", "999999"]).await;
    usage(&out, "no task with id 999999");
    let out = syncq_async(&url, &["pause", "nosuch"]).await;
    usage(&out, "add --create");
    assert_eq!(common::status(&db, id).await, "succeeded");
}

/// A reader that closes the pipe early (`syncq status | head -1`) ends
/// the command normally: exit 0, nothing on stderr.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_closed_output_pipe_is_a_normal_end(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    // Enough output to fill the pipe's buffer several times.
    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind)
         SELECT 'dataset-with-a-long-name-' || i, 'noop' FROM generate_series(1, 3000) i",
    )
    .execute(&db)
    .await
    .unwrap();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["tasks", "--limit", "3000"],
    ] {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
            .env("DATABASE_URL", common::url(&opts))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = child.stdout.take().unwrap();
        let mut first = [0u8; 64];
        let n = out.read(&mut first).await.unwrap();
        assert!(n > 0);
        drop(out);
        let done = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("syncq exited")
            .unwrap();
        assert_eq!(done.status.code(), Some(0), "{args:?}: {}", stderr(&done));
        assert_eq!(stderr(&done), "", "{args:?}");
    }
}

/// Every flag's range is in its help; an out-of-range value's error says
/// what is allowed; the usage line does not show `--database-url` as
/// required when DATABASE_URL is set.
#[test]
fn ranges_are_in_the_help_and_in_the_errors() {
    let help = |args: &[&str]| stdout(&syncq(Some(DOWN), args));
    assert!(help(&["worker", "--help"]).contains("(1 to 10000)"));
    assert!(help(&["worker", "--help"]).contains("--prefetch"));
    assert!(help(&["limit", "--help"]).contains("(1 to 100000)"));
    let out = syncq(Some(DOWN), &["worker", "--retention", "bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("or none"), "{}", stderr(&out));
    let out = syncq(Some(DOWN), &["tasks", "--limit", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        !stderr(&out).contains("--database-url <DATABASE_URL>"),
        "{}",
        stderr(&out)
    );
}

/// Producer text is printed, not obeyed: a dataset id holding terminal
/// escapes (`ESC ]0;pwned BEL` retitles a terminal, `ESC [2J` clears it)
/// and one of 70,000 characters (which once overflowed the table's width
/// and panicked) — every listing exits 0, with no control character but
/// newlines and no line longer than a few hundred characters.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn producer_text_reaches_the_terminal_escaped_and_cut(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    // Rows from before the length bounds (migrations/0005): dropped here
    // to write them.
    sqlx::raw_sql(
        r#"ALTER TABLE syncq.tasks DROP CONSTRAINT tasks_dataset_id_at_most_1000_bytes,
               DROP CONSTRAINT tasks_kind_at_most_1000_bytes;
           ALTER TABLE syncq.schedules DROP CONSTRAINT schedules_dataset_id_at_most_1000_bytes;
           ALTER TABLE syncq.datasets DROP CONSTRAINT datasets_dataset_id_at_most_1000_bytes;
           INSERT INTO syncq.tasks (dataset_id, kind, last_error) VALUES
               (E'evil\u001b]0;pwned\u0007\u001b[2J', 'noop', E'line\nfake line'),
               (repeat('x', 70000), repeat('k', 70000), NULL);
           INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, every)
           VALUES (E'sched\u001b[2J', repeat('y', 70000), 'noop', '1 hour');"#,
    )
    .execute(&db)
    .await
    .unwrap();
    let url = common::url(&opts);
    let first: i64 = sqlx::query_scalar("SELECT min(id) FROM syncq.tasks")
        .fetch_one(&db)
        .await
        .unwrap();
    let first = first.to_string();
    for args in [
        &["status"][..],
        &["tasks"],
        &["schedule", "list"],
        &["show", &first],
    ] {
        let out = syncq(Some(&url), args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{args:?} printed a control character: {text:?}"
        );
        let longest = text.lines().map(|l| l.chars().count()).max().unwrap_or(0);
        assert!(longest < 5000, "{args:?}: a line of {longest} characters");
    }
    let shown = String::from_utf8_lossy(&syncq(Some(&url), &["show", &first]).stdout).into_owned();
    assert!(shown.contains("\\u{1b}"), "{shown}");
    assert!(!shown.contains("\nfake line"), "{shown}");
}

/// Valid jsonb a JSON decoder refuses — a payload nested 300 levels, a
/// number past f64 (`1e400`) in a checkpoint — is shown, not failed on:
/// `syncq show` and `tasks` exit 0 and say which value cannot be read
/// (before, `show` failed and the dashboard's task page answered 503).
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn values_no_decoder_reads_are_shown_as_text(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let ids: Vec<i64> = sqlx::query_scalar(
        r#"INSERT INTO syncq.tasks (dataset_id, kind, payload, checkpoint) VALUES
               ('poison', 'noop', (repeat('[', 300) || repeat(']', 300))::jsonb, NULL),
               ('poison', 'noop', '{}', '{"n": 1e400}')
           RETURNING id"#,
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let url = common::url(&opts);
    for (id, column) in ids.iter().zip(["payload", "checkpoint"]) {
        let out = syncq(Some(&url), &["show", &id.to_string()]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&format!("unreadable: {column}: cannot be read")),
            "{text}"
        );
    }
    let out = syncq(Some(&url), &["tasks", "--dataset", "poison"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    // The dashboard's task page, too.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = syncq::dashboard::router(db.clone(), syncq::dashboard::DashboardOptions::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let page = reqwest::get(format!("http://{addr}/tasks/{}", ids[1]))
        .await
        .unwrap();
    assert_eq!(page.status(), reqwest::StatusCode::OK);
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("checkpoint: cannot be read")
    );
}
