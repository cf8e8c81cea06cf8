//! The `syncq` schema: its versioned migrations (`migrations/`, embedded
//! in the binary), its functions, triggers and views (`src/store/sql/`, one
//! file each, applied after them), and [`migrate`].
//!
//! `migrations/` holds what holds data: types, tables, indexes,
//! constraints. Every function, trigger and view has its one text in
//! `src/store/sql/`, applied by `migrate` as a repeatable migration (only
//! the files whose text changed; see `store::objects`).
//! `tests/fixtures/schema.sql` is the whole, as `pg_dump` prints it.
//!
//! Databases migrated by earlier builds (the pre-release history of 8
//! migrations, and the squashed `0001`–`0007` whose files are in
//! `tests/fixtures/`) have the same tables and another migration history:
//! `migrate` recognises such a history by its checksums, rewrites it to
//! `0001` (nothing run: the tables are those of `0001`) and then applies
//! the rest and every function file, which replace the old functions.

use crate::error::{Error, Result};
use crate::store;
use crate::store::ledger::MIGRATE_LOCK;

pub use crate::store::objects::SqlObject;

/// The schema's versioned migrations (`migrations/`), embedded in the binary.
static VERSIONED: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The version of the last migration of [`MIGRATOR`]: every function,
/// trigger and view file at once. [`migrate`] never records it, and drops
/// it from a database's history when it finds it there.
pub const SQL_OBJECTS_VERSION: i64 = i64::MAX;

/// The whole schema as one sqlx [`Migrator`](sqlx::migrate::Migrator): the
/// versioned migrations, then every function, trigger and view file as one
/// last migration (version [`SQL_OBJECTS_VERSION`]). For
/// `#[sqlx::test(migrator = "syncq::MIGRATOR")]`, which needs a
/// `Migrator`; everywhere else use [`migrate`], which applies only what
/// changed (and takes over a database this made).
///
/// ```
/// assert!(syncq::MIGRATOR.iter().any(|m| m.description.contains("sql objects")));
/// ```
pub static MIGRATOR: std::sync::LazyLock<sqlx::migrate::Migrator> =
    std::sync::LazyLock::new(|| {
        let mut migrations: Vec<sqlx::migrate::Migration> = VERSIONED.iter().cloned().collect();
        migrations.push(sqlx::migrate::Migration::new(
            SQL_OBJECTS_VERSION,
            "sql objects (src/store/sql/, as syncq::migrate applies them)".into(),
            sqlx::migrate::MigrationType::Simple,
            sqlx::SqlSafeStr::into_sql_str(sqlx::AssertSqlSafe(store::objects::script())),
            false,
        ));
        sqlx::migrate::Migrator::with_migrations(migrations)
    });

/// The versioned migration whose tables an earlier build's complete
/// history has: such a history is rewritten to versions 1 to this one.
const BASELINE: i64 = 1;

/// A migration history an earlier build leaves: each (version, SHA-384 of
/// its file) as sqlx stored it, and from how many migrations on it has
/// every table of [`BASELINE`].
struct Earlier {
    name: &'static str,
    history: &'static [(i64, &'static str)],
    complete_from: usize,
    finish_with: &'static str,
}

/// The squashed history of the first builds (`tests/fixtures/squashed_migrations/`):
/// 6 migrations (tables complete), and 7 from commit 1b88139 on.
const SQUASHED: [(i64, &str); 7] = [
    (
        1,
        "c899efb5de4bbb8fbc71b9ed56bf82e5e432c7fad12a7420882416a347087d7dccbfd9a0e76ce0f227379275c0200d11",
    ),
    (
        2,
        "c7e520e1a7bd33ff1fd1a2563f0ba567ee26dc5351b370044aba6aa5f4770ac8c192f63ea9681d7ace1cff524833dbc2",
    ),
    (
        3,
        "6a74e0c3c6c64860bf8df8a95621c46d3d5d2d98d69113db040d58e0f76b710f395c7af08672a1097c14af9585da8ce0",
    ),
    (
        4,
        "b10956e6a8159d44ebd16725929eb2e146195635c8fea61566eddceafbe8dffd4c9fad8b5cfabb1b6905c3d30b32ea70",
    ),
    (
        5,
        "1e6434e0d201bbf467de288af2aa71ae55493ce9c91ca40f8771bb578027ce79972ce61b7f521d304ab40101a29d5211",
    ),
    (
        6,
        "cac2443add19eaffffce3ec6395e08abc35d6d75c154a58e7b1aacef4a972c74591119dd7da2ebd3059ce3b150cea6f3",
    ),
    (
        7,
        "edc975d4fdf019d260368568a4b6e1c7a4c59eb898ed7042e784442047755971f759768515a48cba06454b32b4baf9c9",
    ),
];

/// The migration history a pre-release build leaves: version, and the
/// SHA-384 sqlx stored of each file (`tests/fixtures/pre_squash_migrations/`).
const PRE_SQUASH: [(i64, &str); 8] = [
    (
        1,
        "212f01e75b3a93e920b733e40a840300f0a0ff9617ea2800b77f81f5e1ede13eb7914b020d147c4fbba9fef705d8f713",
    ),
    (
        2,
        "08aaf93ea88e01e51ebd3b749455556cedf0eec2f4bbe105470c8bc6ac276746488dad8435afb3d7eb637c00ed64aef0",
    ),
    (
        3,
        "1c93b1cfd4936d3789c933fa1cb1aa7634efc803d6e3f34fdf856a19a04d8ebbdf47d87c6ed9bbe207ce00e8e9ca28a2",
    ),
    (
        4,
        "243a54b5ff6f96c83f0d895424cb55d1af0c53dd398a83df970a6a99ca1a5925149ce852cbd5b2886f3ec44e51b1be0d",
    ),
    (
        5,
        "16837f1ebf39e9534187f45aa821f56ec254af3c377073d7d32a916ea7995eff21b3aa78759570d9c3bc08aa5625f958",
    ),
    (
        6,
        "217b04bb2f844d27769ba56e38884c0f0f555976a6cd0b876ad15aa210cff66dfb3fd6540f862862efba6ffa55061b19",
    ),
    (
        7,
        "ebf4b623e0b1e27503284ffb573af031ee2784d217f2073a2192c694bd44866dfca50b464a93ffad77886cf34ee826b3",
    ),
    (
        8,
        "766d5b9c1ca4bc4a83b4df0124a7f21a2ffd43246d5c591103c2f274583fcd85b04fe04342b2374404ad95c522d928ea",
    ),
];

/// The histories of earlier builds that [`migrate`] takes over.
const EARLIER: [Earlier; 2] = [
    Earlier {
        name: "a pre-release syncq",
        history: &PRE_SQUASH,
        complete_from: 8,
        finish_with: "commit bc58069 or earlier",
    },
    Earlier {
        name: "syncq 0.1 (migrations 0001-0007)",
        history: &SQUASHED,
        complete_from: 6,
        finish_with: "commit 2cbfbf5 or earlier",
    },
];

/// Creates or upgrades the `syncq` schema. Safe to run concurrently and
/// repeatedly: one migrator at a time (an advisory lock), and only what is
/// missing or changed is applied.
///
/// ```no_run
/// # async fn example(db: sqlx::PgPool) -> syncq::Result<()> {
/// syncq::migrate(&db).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(db: &sqlx::PgPool) -> Result<()> {
    migrate_reporting(db).await.map(|_| ())
}

/// What [`migrate_reporting`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    /// A history left by an earlier build was rewritten to the current
    /// baseline (same tables, nothing run); names that build.
    pub rewrote_earlier: Option<&'static str>,
    /// The versioned migrations applied now, in order (empty: none was
    /// missing).
    pub applied: Vec<i64>,
    /// The function, trigger and view files applied now (`functions/claim`,
    /// …), in order: those whose text changed since they were last
    /// applied, or all of them after a versioned migration.
    pub objects: Vec<&'static str>,
    /// The schema's version now.
    pub version: i64,
}

/// [`migrate`], saying what it did (the `syncq migrate` command prints it).
///
/// ```no_run
/// # async fn example(db: sqlx::PgPool) -> syncq::Result<()> {
/// let done = syncq::schema::migrate_reporting(&db).await?;
/// println!("schema at version {}, applied {:?}", done.version, done.applied);
/// # Ok(()) }
/// ```
pub async fn migrate_reporting(db: &sqlx::PgPool) -> Result<Migrated> {
    let mut conn = db.acquire().await?;
    store::ledger::lock(&mut conn, MIGRATE_LOCK).await?;
    let done = migrate_locked(&mut conn).await;
    let unlocked = store::ledger::unlock(&mut conn, MIGRATE_LOCK).await;
    let done = done?;
    unlocked?;
    Ok(done)
}

async fn migrate_locked(conn: &mut sqlx::PgConnection) -> Result<Migrated> {
    let rewrote_earlier = rebaseline_earlier(conn).await?;
    // A database made by MIGRATOR (a test's): its objects are recorded in
    // syncq.sql_objects; the history keeps versioned migrations only.
    store::ledger::forget(&mut *conn, SQL_OBJECTS_VERSION).await?;
    // Read after the rewrite: an earlier history's versions are not ours.
    let before = store::ledger::applied(&mut *conn).await?;
    VERSIONED.run(&mut *conn).await?;
    let applied: Vec<i64> = VERSIONED
        .iter()
        .map(|m| m.version)
        .filter(|v| !before.contains(v))
        .collect();
    // After a versioned migration every file is applied again: the
    // migration may have changed what one of them reads (a view's table).
    let objects = store::objects::apply(conn, !applied.is_empty()).await?;
    Ok(Migrated {
        rewrote_earlier,
        applied,
        objects,
        version: VERSIONED.iter().map(|m| m.version).max().unwrap_or(0),
    })
}

/// The function, trigger and view files `migrate` applies, in order: each
/// one's name (`functions/claim`) and text.
pub fn sql_objects() -> &'static [SqlObject] {
    store::objects::OBJECTS
}

/// Creates the roles of SPEC §2 Privileges (`syncq_producer`,
/// `syncq_worker`) with their grants, or brings existing ones up to date.
/// Needs a role allowed to create roles.
pub async fn create_roles(db: impl Into<crate::Db>) -> Result<()> {
    Ok(store::roles::create(&db.into()).await?)
}

/// Versions applied to this database that this build does not know: a
/// newer build migrated it (its functions and columns may not be what this
/// one expects).
pub(crate) async fn newer_versions(db: &crate::Db) -> Result<Vec<i64>> {
    let mut conn = db.pool().acquire().await?;
    let applied = store::ledger::applied(&mut conn).await?;
    Ok(applied
        .into_iter()
        .filter(|v| *v != SQL_OBJECTS_VERSION && !VERSIONED.iter().any(|m| m.version == *v))
        .collect())
}

/// The migration versions applied to this database (none before the first
/// `migrate`).
pub async fn applied_versions(db: &sqlx::PgPool) -> Result<Vec<i64>> {
    let mut conn = db.acquire().await?;
    Ok(store::ledger::applied(&mut conn).await?)
}

/// Rewrites a complete history of an earlier build (same tables, other
/// files) to versions 1 to [`BASELINE`], in one transaction holding the
/// history's table; the later migrations and the function files then run
/// as on any database. A partial earlier history is refused: its tables
/// are not the baseline's, and no migration here can finish it. Returns the
/// build whose history it rewrote.
async fn rebaseline_earlier(conn: &mut sqlx::PgConnection) -> Result<Option<&'static str>> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let Some(history) = store::ledger::lock_and_read(&mut tx).await? else {
        return Ok(None);
    };
    if history.is_empty() {
        return Ok(None);
    }
    let Some(earlier) = EARLIER.iter().find(|e| {
        history.len() <= e.history.len()
            && history
                .iter()
                .zip(e.history)
                .all(|((v, sum), (ev, esum))| v == ev && sum == esum)
    }) else {
        // Our own history (or one sqlx will judge): sqlx takes it from here.
        return Ok(None);
    };
    if history.len() < earlier.complete_from {
        return Err(Error::Schema(format!(
            "this database was migrated by {} to version {} of {}; \
             run `syncq migrate` of that release ({}) to finish it, or recreate the database",
            earlier.name,
            history.iter().map(|(v, _)| *v).max().unwrap_or(0),
            earlier.history.len(),
            earlier.finish_with,
        )));
    }
    let baseline: Vec<(i64, String, Vec<u8>)> = VERSIONED
        .iter()
        .filter(|m| m.version <= BASELINE)
        .map(|m| (m.version, m.description.to_string(), m.checksum.to_vec()))
        .collect();
    store::ledger::replace(&mut tx, &baseline).await?;
    tx.commit().await?;
    tracing::info!(
        from = earlier.name,
        "an earlier build's migration history was rewritten to the current baseline (same tables)"
    );
    Ok(Some(earlier.name))
}
