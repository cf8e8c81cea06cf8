//! The server around the schema: its databases.

use sqlx::PgConnection;

/// Whether the server has a database of this name.
pub(crate) async fn database_exists(conn: &mut PgConnection, name: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(name)
        .fetch_one(conn)
        .await
}

/// `CREATE DATABASE "name"` (quoted as an identifier: any name is safe).
pub(crate) async fn create_database(conn: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(conn)
        .await?;
    Ok(())
}

/// `DROP DATABASE IF EXISTS "name" WITH (FORCE)`: its sessions are ended.
#[cfg(feature = "cli")]
pub(crate) async fn drop_database(conn: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"
    )))
    .execute(conn)
    .await?;
    Ok(())
}
