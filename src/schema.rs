//! The `syncq` schema: its migrations (`migrations/`, embedded in the
//! binary) and [`migrate`].
//!
//! The migrations were squashed before the first release (`0001` to
//! `0006`), each table, function and trigger written once; a later
//! migration replaces what it changes, whole. `tests/fixtures/schema.sql`
//! is the current text of all of it, as `pg_dump` prints it. A database
//! migrated by a pre-squash build has the squashed schema —
//! `scripts/check-squash` and `tests/schema.rs` prove it — but a different
//! migration history; `migrate` recognises that history by its checksums
//! and rewrites it to the squashed one before sqlx applies the rest.

use crate::error::{Error, Result};
use crate::store;

/// The schema's migrations (`migrations/`), embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The last of the squashed migrations: a pre-squash history is rewritten
/// to versions 1 to this one, and later migrations apply to it as to any
/// other database.
const SQUASHED_THROUGH: i64 = 6;

/// The migration history a pre-squash build leaves: version, and the
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

/// Creates or upgrades the `syncq` schema. Safe to run concurrently and
/// repeatedly: sqlx takes an advisory lock and applies only what is missing.
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
    /// A history left by a pre-squash build was rewritten to the squashed
    /// migrations (versions 1 to 6; same schema, nothing run).
    pub rewrote_pre_squash: bool,
    /// The versions applied now, in order (empty: the schema was up to date).
    pub applied: Vec<i64>,
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
    let rewrote_pre_squash = rebaseline_pre_squash(db).await?;
    // Read after the rewrite: a pre-squash history's versions are not the
    // squashed ones'.
    let before = store::ledger::applied(db).await?;
    MIGRATOR.run(db).await?;
    Ok(Migrated {
        rewrote_pre_squash,
        applied: MIGRATOR
            .iter()
            .map(|m| m.version)
            .filter(|v| !before.contains(v))
            .collect(),
        version: MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0),
    })
}

/// Creates the roles of SPEC §2 Privileges (`syncq_producer`,
/// `syncq_worker`) with their grants, or brings existing ones up to date.
/// Needs a role allowed to create roles.
pub async fn create_roles(db: impl Into<crate::Db>) -> Result<()> {
    Ok(store::roles::create(&db.into()).await?)
}

/// The migration versions applied to this database (none before the first
/// `migrate`).
pub async fn applied_versions(db: &sqlx::PgPool) -> Result<Vec<i64>> {
    Ok(store::ledger::applied(db).await?)
}

/// Rewrites a complete pre-squash history to the squashed one (same
/// schema, other files), in one transaction holding the history's table;
/// the migrations after the squash then run as on any database. A partial
/// pre-squash history is refused: its schema is not the squashed one's,
/// and no migration here can finish it. Returns whether it rewrote one.
async fn rebaseline_pre_squash(db: &sqlx::PgPool) -> Result<bool> {
    let mut tx = db.begin().await?;
    let Some(history) = store::ledger::lock_and_read(&mut tx).await? else {
        return Ok(false);
    };
    let known = |(version, checksum): &(i64, String)| {
        PRE_SQUASH
            .iter()
            .any(|(v, sum)| v == version && sum == checksum)
    };
    if history.is_empty() || !history.iter().all(known) {
        // A squashed history (or none yet): sqlx takes it from here.
        return Ok(false);
    }
    if history.len() != PRE_SQUASH.len() {
        return Err(Error::Schema(format!(
            "this database was migrated by a pre-release syncq to version {} of 8; \
             run `syncq migrate` of that release (commit bc58069 or earlier) to finish it, or recreate the database",
            history.iter().map(|(v, _)| *v).max().unwrap_or(0)
        )));
    }
    let squashed: Vec<(i64, String, Vec<u8>)> = MIGRATOR
        .iter()
        .filter(|m| m.version <= SQUASHED_THROUGH)
        .map(|m| (m.version, m.description.to_string(), m.checksum.to_vec()))
        .collect();
    store::ledger::replace(&mut tx, &squashed).await?;
    tx.commit().await?;
    tracing::info!(
        versions = squashed.len(),
        "a pre-squash migration history was rewritten to the squashed migrations (same schema)"
    );
    Ok(true)
}
