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

/// Creates the database `options` names, through the server's `postgres`
/// database, unless it exists. True if this call created it; a creator
/// racing this one is taken as "exists".
pub(crate) async fn create_database_if_missing(
    options: &sqlx::postgres::PgConnectOptions,
) -> sqlx::Result<bool> {
    use sqlx::{ConnectOptions, Connection};
    let name = options.get_database().unwrap_or("postgres").to_string();
    let mut conn = options.clone().database("postgres").connect().await?;
    let created = if database_exists(&mut conn, &name).await? {
        false
    } else {
        match create_database(&mut conn, &name).await {
            Ok(()) => true,
            // 42P04 duplicate_database: created meanwhile by someone else.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => false,
            Err(e) => return Err(e),
        }
    };
    let _ = conn.close().await;
    Ok(created)
}
