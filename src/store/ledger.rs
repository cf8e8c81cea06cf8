//! `_sqlx_migrations`, sqlx's history of applied migrations (in the
//! connection's `search_path`, as sqlx creates it). Runtime-checked
//! statements: the table does not exist before the first `migrate`.

use sqlx::PgConnection;

/// The versions applied successfully (none if there is no history yet).
pub(crate) async fn applied(db: &mut PgConnection) -> sqlx::Result<Vec<i64>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *db)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(db)
        .await
}

/// Locks the history against other migrators until the transaction ends
/// and reads it: (version, checksum in hex) of each applied migration, or
/// `None` if there is no history table.
pub(crate) async fn lock_and_read(
    tx: &mut PgConnection,
) -> sqlx::Result<Option<Vec<(i64, String)>>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *tx)
        .await?;
    if !exists {
        return Ok(None);
    }
    sqlx::query("LOCK TABLE _sqlx_migrations IN EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query_as(
        "SELECT version, encode(checksum, 'hex') FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(Some(rows))
}

/// Replaces the whole history with `migrations` (version, description,
/// checksum), as applied now.
pub(crate) async fn replace(
    tx: &mut PgConnection,
    migrations: &[(i64, String, Vec<u8>)],
) -> sqlx::Result<()> {
    let versions: Vec<i64> = migrations.iter().map(|m| m.0).collect();
    let descriptions: Vec<String> = migrations.iter().map(|m| m.1.clone()).collect();
    let checksums: Vec<Vec<u8>> = migrations.iter().map(|m| m.2.clone()).collect();
    sqlx::query("DELETE FROM _sqlx_migrations")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         SELECT v, d, true, c, 0 FROM unnest($1::bigint[], $2::text[], $3::bytea[]) AS m(v, d, c)",
    )
    .bind(&versions)
    .bind(&descriptions)
    .bind(&checksums)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Deletes `version` from the history, if it is there.
pub(crate) async fn forget(db: &mut PgConnection, version: i64) -> sqlx::Result<()> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&mut *db)
        .await?;
    if exists {
        sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
            .bind(version)
            .execute(&mut *db)
            .await?;
    }
    Ok(())
}

/// Takes the migration lock (a session advisory lock on `key`), waiting
/// for another migrator to finish.
pub(crate) async fn lock(db: &mut PgConnection, key: i64) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(key)
        .execute(&mut *db)
        .await?;
    Ok(())
}

/// Releases the migration lock.
pub(crate) async fn unlock(db: &mut PgConnection, key: i64) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(key)
        .execute(&mut *db)
        .await?;
    Ok(())
}

/// A key of its own for the migration lock (`pg_advisory_lock`): held
/// while the history is read and rewritten, the versioned migrations run
/// (sqlx takes its own lock too) and the function files are applied.
pub(crate) const MIGRATE_LOCK: i64 = 0x7379_6e63_715f_6d69; // "syncq_mi"
