//! `syncq demo` and the private PostgreSQL it falls back to: it runs every
//! scenario to its end, reports from the database, cleans up after an
//! earlier run, and leaves no cluster behind.

mod common;

use std::process::Command;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

fn demo(url: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", url)
        .arg("demo")
        .args(args)
        .output()
        .expect("run syncq demo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn scalar(db: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(db)
        .await
        .unwrap()
}

#[sqlx::test]
async fn the_demo_runs_every_scenario_and_can_be_run_again(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let url = common::url(&opts);
    let (ok, stdout, stderr) = demo(&url, &["--scale", "0.2"]);
    assert!(ok, "demo failed: {stderr}\n{stdout}");
    assert!(
        stdout.contains("summary (read back from the database)"),
        "{stdout}"
    );
    for dataset in [
        "demo-github",
        "demo-jira",
        "demo-stripe",
        "demo-archive",
        "demo-crm",
    ] {
        assert!(stdout.contains(dataset), "{dataset} missing: {stdout}");
    }
    // Not a terminal: plain progress lines.
    assert!(stdout.contains(" done  running"), "{stdout}");

    let db = common::connect(&opts).await;
    let total = scalar(
        &db,
        "SELECT count(*) FROM syncq.tasks WHERE dataset_id LIKE 'demo-%'",
    )
    .await;
    assert!(total > 0);
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM syncq.tasks WHERE status IN ('queued', 'running')"
        )
        .await,
        0
    );
    // The flaky upstream was retried, the throttling one throttled, the
    // long export resumed from its checkpoint, the invalid ones failed once.
    assert!(
        scalar(
            &db,
            "SELECT count(*) FROM syncq.tasks WHERE dataset_id = 'demo-jira' AND attempts > 1"
        )
        .await
            > 0
    );
    assert!(
        scalar(
            &db,
            "SELECT count(*) FROM syncq.task_errors WHERE error LIKE 'rate limited%'"
        )
        .await
            > 0
    );
    assert!(
        scalar(
            &db,
            "SELECT count(*) FROM syncq.tasks WHERE (result ->> 'resumed_from')::int > 0"
        )
        .await
            > 0
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM syncq.tasks WHERE dataset_id = 'demo-crm' AND status = 'failed' AND attempts <> 1"
        )
        .await,
        0
    );
    assert!(
        scalar(
            &db,
            "SELECT count(*) FROM syncq.tasks WHERE dataset_id = 'demo-crm' AND status = 'failed'"
        )
        .await
            > 0
    );

    // Again: the earlier run's tasks are cleared, not added to.
    let (ok, stdout, stderr) = demo(&url, &["--scale", "0.2"]);
    assert!(ok, "second demo failed: {stderr}\n{stdout}");
    assert!(
        stdout.contains(&format!("cleared {total} tasks of an earlier demo")),
        "{stdout}"
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT count(*) FROM syncq.tasks WHERE dataset_id LIKE 'demo-%'"
        )
        .await,
        total
    );
}

/// `--private-postgres` (what the demo does by itself when nothing answers
/// at the default address): a throwaway cluster from the installed server
/// programs, removed at the end.
#[test]
fn the_demo_on_a_private_postgres_leaves_nothing_behind() {
    if syncq::local_postgres::find_server_bin().is_none() {
        eprintln!("skipped: no PostgreSQL server programs installed");
        return;
    }
    let before = private_dirs();
    // An address where nothing answers: the URL must not be used.
    let (ok, stdout, stderr) = demo(
        "postgres://nobody@127.0.0.1:1/none",
        &["--scale", "0.1", "--private-postgres"],
    );
    assert!(ok, "demo failed: {stderr}\n{stdout}");
    assert!(
        stdout.contains("private PostgreSQL on 127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("summary (read back from the database)"),
        "{stdout}"
    );
    assert_eq!(
        private_dirs(),
        before,
        "a private cluster directory was left behind"
    );
}

fn private_dirs() -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("syncq-postgres-"))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    dirs
}
