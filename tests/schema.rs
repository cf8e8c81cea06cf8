//! The schema as a reviewer reads it: `tests/fixtures/schema.sql` is what
//! `pg_dump` prints of a migrated database, so a change to the schema or to
//! any function shows in review as a change to that file; a database
//! migrated by an earlier build ends with the same schema and history; and
//! `migrate` applies a function file again only when its text changed.

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

/// The history `migrate` leaves: the versioned migrations (the function
/// files are recorded in `syncq.sql_objects`, not there).
fn migrated_history() -> Vec<(i64, String, Vec<u8>)> {
    syncq::MIGRATOR
        .iter()
        .filter(|m| m.version != syncq::schema::SQL_OBJECTS_VERSION)
        .map(|m| (m.version, m.description.to_string(), m.checksum.to_vec()))
        .collect()
}

/// The latest versioned migration.
fn latest() -> i64 {
    migrated_history().iter().map(|m| m.0).max().unwrap()
}

/// The first `only_first` migrations of an earlier build
/// (`tests/fixtures/DIR`), as that build applied them.
async fn earlier(dir: &str, only_first: usize) -> sqlx::migrate::Migrator {
    first_of(
        &format!("{}/tests/fixtures/{dir}", env!("CARGO_MANIFEST_DIR")),
        only_first,
    )
    .await
}

/// The first `only_first` migration files of the folder `path`.
async fn first_of(path: &str, only_first: usize) -> sqlx::migrate::Migrator {
    let tmp = tempfile_dir();
    let mut files: Vec<_> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for file in files.iter().take(only_first) {
        std::fs::copy(file, tmp.join(file.file_name().unwrap())).unwrap();
    }
    let migrator = sqlx::migrate::Migrator::new(tmp.as_path()).await.unwrap();
    std::fs::remove_dir_all(&tmp).unwrap();
    migrator
}

/// A few rows of every kind an earlier build's database holds: live and
/// finished tasks, a configured dataset, an error, a schedule.
async fn seed(db: &PgPool) -> String {
    sqlx::raw_sql(
        "INSERT INTO syncq.datasets (dataset_id, rate_limit, max_concurrency, weight) VALUES ('gh', 5, 2, 3);
         INSERT INTO syncq.tasks (dataset_id, kind, payload, unique_key) VALUES
             ('gh', 'noop', '{\"page\": 1}', 'p1'), ('gh', 'noop', '{}', NULL), ('other', 'sleep', '[1,2]', NULL);
         UPDATE syncq.tasks SET status = 'succeeded', result = '{\"ok\": true}', finished_at = now()
             WHERE id = 2;
         INSERT INTO syncq.task_errors (task_id, attempt, error) VALUES (2, 1, 'boom');
         INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, every) VALUES ('tick', 'gh', 'noop', '1 minute');",
    )
    .execute(db)
    .await
    .unwrap();
    rows(db).await
}

/// The seeded rows as text, to compare before and after a migration.
async fn rows(db: &PgPool) -> String {
    sqlx::query_scalar(
        "SELECT concat_ws(E'\\n',
             (SELECT string_agg(concat_ws('|', id, dataset_id, kind, payload, status, unique_key, result, attempts), ';' ORDER BY id) FROM syncq.tasks),
             (SELECT string_agg(concat_ws('|', dataset_id, rate_limit, max_concurrency, weight), ';' ORDER BY dataset_id) FROM syncq.datasets),
             (SELECT string_agg(concat_ws('|', task_id, attempt, error), ';') FROM syncq.task_errors),
             (SELECT string_agg(concat_ws('|', schedule_id, every), ';') FROM syncq.schedules))",
    )
    .fetch_one(db)
    .await
    .unwrap()
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

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_migrated_database_has_the_checked_in_schema(_: PgPoolOptions, opts: PgConnectOptions) {
    assert_same_schema(&snapshot(&opts));
}

/// An earlier build's complete history (the first `count` files of
/// `tests/fixtures/DIR`), taken over by `syncq migrate`: it says what it
/// did, the history and schema become the current ones, and the rows stay.
async fn takes_over(opts: &PgConnectOptions, dir: &str, count: usize, build: &str) {
    let db = common::connect(opts).await;
    earlier(dir, count).await.run(&db).await.unwrap();
    assert_eq!(history(&db).await.len(), count);
    let before = seed(&db).await;

    let out = migrate_command(opts);
    assert!(
        out.starts_with(&format!("rewrote the migration history of {build}")),
        "{dir} ({count}): {out}"
    );
    let last = latest();
    assert!(
        out.contains(&format!(
            "applied migrations 2–{last}: syncq schema is now at version {last}"
        )),
        "{out}"
    );
    let files = syncq::schema::sql_objects().len();
    assert!(
        out.contains(&format!("applied {files} of {files} function")),
        "{out}"
    );
    assert_eq!(history(&db).await, migrated_history(), "{dir} ({count})");
    assert_same_schema(&snapshot(opts));
    assert_eq!(rows(&db).await, before, "{dir} ({count}): rows changed");
    // And from then on it is like any other database.
    assert_eq!(
        migrate_command(opts),
        format!("syncq schema is up to date (version {})\n", latest())
    );
    assert_eq!(history(&db).await, migrated_history());
}

#[sqlx::test(migrations = false)]
async fn a_database_migrated_before_the_squash_is_taken_over_with_its_rows(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    takes_over(&opts, "pre_squash_migrations", 8, "a pre-release syncq").await;
}

#[sqlx::test(migrations = false)]
async fn a_database_at_0_1_version_6_is_taken_over_with_its_rows(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    takes_over(
        &opts,
        "squashed_migrations",
        6,
        "syncq 0.1 (migrations 0001-0007)",
    )
    .await;
}

#[sqlx::test(migrations = false)]
async fn a_database_at_0_1_version_7_is_taken_over_with_its_rows(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    takes_over(
        &opts,
        "squashed_migrations",
        7,
        "syncq 0.1 (migrations 0001-0007)",
    )
    .await;
}

#[sqlx::test(migrations = false)]
async fn an_empty_database_migrated_three_times_at_once_has_the_checked_in_schema(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    let runs =
        futures_util::future::join_all((0..3).map(|_| syncq::schema::migrate_reporting(&db))).await;
    let runs: Vec<_> = runs.into_iter().map(|r| r.unwrap()).collect();
    // One of them did the work; the others found nothing left to do.
    assert_eq!(
        runs.iter().filter(|r| !r.applied.is_empty()).count(),
        1,
        "{runs:?}"
    );
    assert_eq!(
        runs.iter().map(|r| r.objects.len()).sum::<usize>(),
        syncq::schema::sql_objects().len(),
        "{runs:?}"
    );
    assert_same_schema(&snapshot(&opts));
    assert_eq!(history(&db).await, migrated_history());
}

/// A function file whose text changed since it was applied (here: the
/// database holds another build's text and checksum of `retry`) is applied
/// again by the next `migrate`, and only it; an unchanged file is not.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn migrate_applies_again_only_the_files_whose_text_changed(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    // The test's database (made by syncq::MIGRATOR) is taken over as is.
    let first = syncq::schema::migrate_reporting(&db).await.unwrap();
    assert!(
        first.applied.is_empty() && first.objects.is_empty(),
        "{first:?}"
    );
    assert_eq!(history(&db).await, migrated_history());

    // Another build's text of one function, and its checksum.
    sqlx::raw_sql(
        "CREATE OR REPLACE FUNCTION syncq.retry(p_ids bigint[]) RETURNS SETOF bigint
         LANGUAGE sql AS $$ SELECT 42::bigint $$;
         UPDATE syncq.sql_objects SET checksum = 'an older text' WHERE name = 'functions/retry';",
    )
    .execute(&db)
    .await
    .unwrap();
    let out = migrate_command(&opts);
    assert!(
        out.contains(&format!(
            "applied 1 of {} function",
            syncq::schema::sql_objects().len()
        )),
        "{out}"
    );
    let body: String = sqlx::query_scalar("SELECT prosrc FROM pg_proc WHERE proname = 'retry'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert!(body.contains("status IN ('failed', 'cancelled')"), "{body}");
    assert_same_schema(&snapshot(&opts));

    let again = syncq::schema::migrate_reporting(&db).await.unwrap();
    assert!(again.objects.is_empty(), "{again:?}");
    assert_eq!(
        migrate_command(&opts),
        format!("syncq schema is up to date (version {})\n", latest())
    );
}

/// A database at version 9 (before tasks were indexed by holder), with
/// tasks queued, leased ahead, running and finished, moves to the current
/// layout: every row stays, once, and each of them is found through the
/// index of its half.
#[sqlx::test(migrations = false)]
async fn a_database_at_version_9_moves_to_the_holder_indexes_with_its_rows(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    first_of(&format!("{}/migrations", env!("CARGO_MANIFEST_DIR")), 9)
        .await
        .run(&db)
        .await
        .unwrap();
    let before = seed(&db).await;
    sqlx::raw_sql(
        "INSERT INTO syncq.tasks (dataset_id, kind, status, attempts, locked_by, lease_expires_at, started_at)
         VALUES ('gh', 'noop', 'running', 1, 'w1', now() + interval '30 seconds', now());
         INSERT INTO syncq.tasks (dataset_id, kind, locked_by, lease_expires_at)
         VALUES ('gh', 'noop', 'w1', now() + interval '30 seconds');",
    )
    .execute(&db)
    .await
    .unwrap();
    let with_held = rows(&db).await;
    assert_ne!(with_held, before);

    let out = migrate_command(&opts);
    assert!(
        out.starts_with("applied migration")
            && out.contains(&format!("syncq schema is now at version {}", latest())),
        "{out}"
    );
    assert_same_schema(&snapshot(&opts));
    assert_eq!(rows(&db).await, with_held, "rows changed");

    // Each half through its own index, and both together.
    let counts: (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT q FROM syncq.queued_count('gh') q),
                (SELECT r FROM syncq.running_count('gh') r),
                (SELECT count(*) FROM syncq.tasks
                  WHERE dataset_id = 'gh' AND status = 'succeeded' AND locked_by IS NULL),
                (SELECT count(*) FROM syncq.tasks
                  WHERE dataset_id = 'gh' AND (locked_by IS NULL OR locked_by IS NOT NULL))",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(counts, (2, 1, 1, 4));
    // Five rows: without enable_seqscan = off any plan would read the table.
    let mut conn = db.acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT count(*) FROM syncq.tasks
         WHERE dataset_id = 'gh' AND (locked_by IS NULL OR locked_by IS NOT NULL)",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("tasks_held_idx") && plan.contains("tasks_unheld_idx"),
        "{plan}"
    );
}

/// `syncq migrate` on the test's database; its standard output.
fn migrate_command(opts: &PgConnectOptions) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_syncq"));
    cmd.env("DATABASE_URL", common::url(opts)).arg("migrate");
    stdout_of(cmd)
}

#[sqlx::test(migrations = false)]
async fn a_database_half_migrated_by_an_earlier_build_is_refused_untouched(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let db = common::connect(&opts).await;
    earlier("pre_squash_migrations", 5)
        .await
        .run(&db)
        .await
        .unwrap();
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
#[sqlx::test(migrator = "syncq::MIGRATOR")]
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

/// The cap's and the rate limit's counts have one text each
/// (`syncq.running_count`, `syncq.rate_used`), and the planner expands them
/// in place: no function scan, and each count a subplan that runs only for
/// a dataset with that setting (the `OR` short-circuits). Wrapped in a
/// `SET` clause or made `VOLATILE`, they would be function scans counting
/// for every dataset.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn the_cap_and_rate_counts_are_inlined_and_counted_only_where_read(db: PgPool) {
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT d.dataset_id FROM syncq.datasets d
         CROSS JOIN LATERAL syncq.running_count(d.dataset_id) AS r(running)
         CROSS JOIN LATERAL syncq.rate_used(d.dataset_id, d.rate_window, now()) AS u(used)
         CROSS JOIN LATERAL syncq.rate_room_at(d.dataset_id, d.rate_limit, d.rate_window, now()) AS w(at)
         WHERE (d.max_concurrency IS NULL OR d.max_concurrency > r.running)
           AND (d.rate_limit IS NULL OR d.rate_limit > u.used)
           AND (d.rate_limit IS NULL OR w.at <= now())",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(!plan.contains("Function Scan"), "not inlined:\n{plan}");
    assert!(
        plan.contains("(max_concurrency IS NULL) OR (max_concurrency > (SubPlan"),
        "{plan}"
    );
    assert!(
        plan.contains("(rate_limit IS NULL) OR (rate_limit > (SubPlan"),
        "{plan}"
    );
    assert!(
        plan.contains("tasks_held_idx") && plan.contains("rate_log_idx"),
        "{plan}"
    );
}
