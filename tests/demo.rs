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

#[sqlx::test(migrator = "syncq::MIGRATOR")]
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
        "demo-cron",
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
    // The periodic sync ticked, each tick's task once, and ran.
    let ticked = scalar(
        &db,
        "SELECT count(*) FROM syncq.tasks WHERE dataset_id = 'demo-cron' AND status = 'succeeded'
           AND schedule_id IS NOT NULL",
    )
    .await;
    assert!(ticked >= 1, "the demo's schedule never ticked");
    assert_eq!(scalar(&db, "SELECT count(*) FROM syncq.schedules").await, 0);
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
    // The seeded tasks are the same; the schedule's ticks depend on how
    // long the run took.
    let seeded =
        "SELECT count(*) FROM syncq.tasks WHERE dataset_id LIKE 'demo-%' AND schedule_id IS NULL";
    assert_eq!(scalar(&db, seeded).await, total - ticked);
    // The schedule is gone with the demo: nothing ticks behind it.
    assert_eq!(scalar(&db, "SELECT count(*) FROM syncq.schedules").await, 0);
}

/// `--private-postgres` (what the demo does by itself when nothing answers
/// at the default address): a throwaway cluster from the installed server
/// programs, removed at the end.
///
/// The demo runs with `TMPDIR` set to a folder of this test's own, so
/// whatever it creates there is this run's: the cluster directory it logs
/// must be inside, must be gone at the end, and the folder must be empty.
/// Nothing else in the system's temporary folder is looked at.
#[test]
fn the_demo_on_a_private_postgres_leaves_nothing_behind() {
    if syncq::local_postgres::find_server_bin().is_none() {
        eprintln!("skipped: no PostgreSQL server programs installed");
        return;
    }
    let tmp = OwnTempDir::new();
    // An address where nothing answers: the URL must not be used.
    let out = Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("TMPDIR", &tmp.0)
        // The cluster's start is logged with its directory; the rest quiet.
        .env("RUST_LOG", "syncq=error,syncq::local_postgres=info")
        .args(["demo", "--scale", "0.1", "--private-postgres"])
        .output()
        .expect("run syncq demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed: {stderr}\n{stdout}");
    assert!(
        stdout.contains("private PostgreSQL on 127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("summary (read back from the database)"),
        "{stdout}"
    );
    // The directory this run's cluster lived in, as the demo logged it.
    let dir = stderr
        .lines()
        .filter(|l| l.contains("private PostgreSQL cluster started"))
        .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("dir=")))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("the demo did not log its cluster's directory: {stderr}"));
    assert!(
        dir.starts_with(&tmp.0),
        "the cluster was made in {}, not under TMPDIR {}",
        dir.display(),
        tmp.0.display()
    );
    assert!(
        !dir.exists(),
        "the private cluster directory {} was left behind",
        dir.display()
    );
    let left: Vec<_> = std::fs::read_dir(&tmp.0)
        .expect("read the test's TMPDIR")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "the demo left {left:?} in its TMPDIR");
}

/// A fresh folder under the temporary folder, removed on drop (also when
/// the test fails). World-traversable: as root, the cluster runs as
/// `postgres` or `nobody` and must reach its directory inside.
struct OwnTempDir(std::path::PathBuf);

impl OwnTempDir {
    fn new() -> OwnTempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "syncq-demo-test-{}-{nanos:08x}",
            std::process::id()
        ));
        std::fs::create_dir(&dir).expect("create the test's TMPDIR");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
                .expect("make the test's TMPDIR traversable");
        }
        OwnTempDir(dir)
    }
}

impl Drop for OwnTempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
