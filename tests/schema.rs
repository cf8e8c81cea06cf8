//! The schema as a reviewer reads it: `tests/fixtures/schema.sql` is what
//! `pg_dump` prints of a migrated database, so a change to the schema or to
//! any function shows in review as a change to that file; and a database
//! migrated before the squash ends with the same schema and history.

mod common;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

const SNAPSHOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schema.sql");

/// Runs `cmd`, asserts it succeeded, and returns its standard output.
fn stdout_of(mut cmd: std::process::Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

/// `scripts/schema-snapshot` of the database: pg_dump, normalised.
fn snapshot(opts: &PgConnectOptions) -> String {
    let mut cmd = std::process::Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/schema-snapshot"
    ));
    cmd.arg(common::url(opts));
    stdout_of(cmd)
}

/// Fails with the first differing line, and how to refresh the snapshot.
fn assert_same_schema(actual: &str) {
    let expected = std::fs::read_to_string(SNAPSHOT).expect("read tests/fixtures/schema.sql");
    if actual == expected {
        return;
    }
    let line = actual
        .lines()
        .zip(expected.lines())
        .position(|(a, e)| a != e)
        .unwrap_or_else(|| actual.lines().count().min(expected.lines().count()));
    panic!(
        "the migrated schema differs from tests/fixtures/schema.sql from line {}:\n  migrated: {:?}\n  snapshot: {:?}\n\
         If the change is intended: scripts/schema-snapshot <a migrated database> > tests/fixtures/schema.sql",
        line + 1,
        actual.lines().nth(line),
        expected.lines().nth(line),
    );
}

async fn history(db: &PgPool) -> Vec<(i64, String, Vec<u8>)> {
    sqlx::query_as("SELECT version, description, checksum FROM _sqlx_migrations ORDER BY version")
        .fetch_all(db)
        .await
        .unwrap()
}

/// The history `migrate` leaves: every migration, squashed and after.
fn migrated_history() -> Vec<(i64, String, Vec<u8>)> {
    syncq::MIGRATOR
        .iter()
        .map(|m| (m.version, m.description.to_string(), m.checksum.to_vec()))
        .collect()
}

/// The pre-squash migrations, as a build before the squash applied them.
async fn pre_squash(only_first: usize) -> sqlx::migrate::Migrator {
    let dir = tempfile_dir();
    let fixtures = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pre_squash_migrations"
    );
    let mut files: Vec<_> = std::fs::read_dir(fixtures)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files.iter().take(only_first) {
        std::fs::copy(file, dir.join(file.file_name().unwrap())).unwrap();
    }
    let migrator = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    migrator
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "syncq-pre-squash-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[sqlx::test]
async fn a_migrated_database_has_the_checked_in_schema(_: PgPoolOptions, opts: PgConnectOptions) {
    assert_same_schema(&snapshot(&opts));
}

#[sqlx::test(migrations = false)]
async fn a_database_migrated_before_the_squash_gets_the_squashed_history_and_the_same_schema(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    pre_squash(8).await.run(&db).await.unwrap();
    assert_eq!(history(&db).await.len(), 8);

    // `syncq migrate` says what it did: the history rewritten, then the
    // migrations after the squash applied.
    let out = migrate_command(&opts);
    let squashed = 6;
    let latest = syncq::MIGRATOR.iter().map(|m| m.version).max().unwrap();
    assert!(
        out.starts_with("rewrote the migration history of a pre-release syncq"),
        "{out}"
    );
    let applied = if latest == squashed + 1 {
        format!("applied migration {latest}: syncq schema is now at version {latest}")
    } else {
        format!(
            "applied migrations {}–{latest}: syncq schema is now at version {latest}",
            squashed + 1
        )
    };
    assert!(out.contains(&applied), "{out}");
    assert_eq!(history(&db).await, migrated_history());
    assert_same_schema(&snapshot(&opts));
    // And from then on it is like any other database.
    syncq::migrate(&db).await.unwrap();
    assert_eq!(history(&db).await, migrated_history());
    assert_eq!(
        migrate_command(&opts),
        format!("syncq schema is up to date (version {latest})\n")
    );
}

/// `syncq migrate` on the test's database; its standard output.
fn migrate_command(opts: &PgConnectOptions) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_syncq"));
    cmd.env("DATABASE_URL", common::url(opts)).arg("migrate");
    stdout_of(cmd)
}

#[sqlx::test(migrations = false)]
async fn a_database_half_migrated_before_the_squash_is_refused_untouched(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    pre_squash(5).await.run(&db).await.unwrap();
    let before = history(&db).await;

    let error = syncq::migrate(&db).await.unwrap_err().to_string();
    assert!(
        error.contains("pre-release syncq to version 5 of 8"),
        "{error}"
    );
    assert_eq!(history(&db).await, before);
}

/// The rule the claim (step 1) and the pool's search for a failing dataset
/// share, `syncq.claimable_datasets`, is expanded in place by the planner:
/// the plan reads `syncq.datasets` through the turn index, in turn order,
/// and stops at the limit — with the arguments as literals and as the
/// parameters of a generic plan (what the claim, planned once per
/// connection, and the prepared statement of `claim_candidates` get). A
/// `SET` clause, `STRICT` or `VOLATILE` on the function would make it a
/// function scan that reads every claimable dataset before the first few
/// are taken.
#[sqlx::test]
async fn the_claimable_rule_is_inlined_into_its_callers(db: PgPool) {
    let mut conn = db.acquire().await.unwrap();
    let query = "SELECT d.dataset_id
                 FROM syncq.claimable_datasets($1, $2, $3) d
                 ORDER BY d.last_claimed_at NULLS FIRST, d.served_at NULLS FIRST, d.dataset_id
                 LIMIT 5";
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "SET plan_cache_mode = force_generic_plan;
         PREPARE candidates (text[], text[], text[]) AS {query}"
    )))
    .execute(&mut *conn)
    .await
    .unwrap();
    for explain in [
        query
            .replace("$1", "'{noop}'")
            .replace("$2", "NULL")
            .replace("$3", "'{}'"),
        "EXECUTE candidates ('{noop}', NULL, '{}')".to_string(),
    ] {
        let plan: Vec<String> =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {explain}")))
                .fetch_all(&mut *conn)
                .await
                .unwrap();
        let plan = plan.join("\n");
        assert!(!plan.contains("Function Scan"), "not inlined:\n{plan}");
        assert!(
            plan.contains("Index Scan using datasets_turn_idx on datasets d"),
            "{plan}"
        );
    }
}
