//! The schema's functions, triggers and views: one file each under
//! `src/store/sql/`, the only text of each in the repository.
//!
//! Versioned migrations (`migrations/`) hold what holds data — types,
//! tables, columns, indexes, constraints. Everything here is code, and is
//! applied after them by `syncq migrate` as a *repeatable* migration (the
//! habit of Flyway and graphile-migrate): `CREATE OR REPLACE`, in the order
//! of [`OBJECTS`], inside one transaction under the migration lock, and only
//! the files whose text changed since they were last applied (a SHA-256 of
//! each in `syncq.sql_objects`). A change to the claim is then a diff of
//! the lines that changed, in `sql/functions/claim.sql`.
//!
//! Every file must be safe to apply again: `CREATE OR REPLACE FUNCTION`,
//! `CREATE OR REPLACE TRIGGER`, `CREATE OR REPLACE VIEW`, `REVOKE`/`GRANT`.
//! A change `CREATE OR REPLACE` cannot make (a function's arguments or
//! result type, a view's columns removed) starts its file with the
//! `DROP … IF EXISTS` it needs. Dropping an object for good is a versioned
//! migration's job, which also deletes its row of `syncq.sql_objects`.

use sqlx::PgConnection;

/// One file of `src/store/sql/`.
#[derive(Debug, Clone, Copy)]
pub struct SqlObject {
    /// Its name: the file's path below `src/store/sql/`, without `.sql`
    /// (`functions/claim`); the key of its row in `syncq.sql_objects`.
    pub name: &'static str,
    /// The file's text.
    pub sql: &'static str,
}

macro_rules! objects {
    ($($name:literal),* $(,)?) => {
        &[$(SqlObject { name: $name, sql: include_str!(concat!("sql/", $name, ".sql")) }),*]
    };
}

/// Every file of `src/store/sql/`, in dependency order: a function before
/// the functions, triggers and views that call it (SQL-language bodies are
/// checked when they are created). `scripts/sqlx-prepare` reads this list
/// too, in this order.
pub static OBJECTS: &[SqlObject] = objects![
    "functions/limit_lock_key",
    "functions/limit_bucket",
    "functions/effective_rate",
    "functions/absorb_signals",
    "functions/queued_count",
    "functions/mark_idle",
    "functions/refresh_ready",
    "functions/running_count",
    "functions/rate_used",
    "functions/rate_room_at",
    "functions/limits_room",
    "functions/claimable_datasets",
    "functions/take_permit",
    "functions/claim",
    "functions/give_back",
    "functions/next_claim_in",
    "functions/prune_rate_log",
    "functions/write_outcomes",
    "functions/complete_many",
    "functions/retry",
    "functions/prune_finished",
    "triggers/shared_limits",
    "triggers/datasets_limits_set",
    "triggers/datasets_held",
    "triggers/adaptive_reset",
    "triggers/tasks_after_insert",
    "triggers/tasks_requeued",
    "triggers/tasks_cancel_requested",
    "triggers/schedules_check",
    "triggers/schedules_changed",
    "triggers/schedules_resumed",
    "views/dataset_stats",
    "views/running_tasks",
    "views/recent_failures",
    "views/workers_live",
    "views/limit_stats",
];

/// The checksum `syncq.sql_objects` keeps of a file: SHA-256, in hex.
pub(crate) fn checksum(sql: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(sql.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Applies, in one transaction on `conn`, the objects whose text differs
/// from what `syncq.sql_objects` says was applied (all of them with
/// `all`), and records their checksums. Returns the names applied, in
/// order. The caller holds the migration lock.
pub(crate) async fn apply(conn: &mut PgConnection, all: bool) -> crate::Result<Vec<&'static str>> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let stored: Vec<(String, String)> =
        sqlx::query_as("SELECT name, checksum FROM syncq.sql_objects")
            .fetch_all(&mut *tx)
            .await?;
    let mut applied = Vec::new();
    let mut sums = Vec::new();
    for object in OBJECTS {
        let sum = checksum(object.sql);
        if !all && stored.iter().any(|(n, s)| n == object.name && *s == sum) {
            continue;
        }
        if let Err(e) = sqlx::raw_sql(object.sql).execute(&mut *tx).await {
            return Err(crate::Error::Schema(format!(
                "applying src/store/sql/{}.sql failed: {e}",
                object.name
            )));
        }
        applied.push(object.name);
        sums.push(sum);
    }
    sqlx::query(
        "INSERT INTO syncq.sql_objects (name, checksum)
         SELECT * FROM unnest($1::text[], $2::text[])
         ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now()",
    )
    .bind(&applied)
    .bind(&sums)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(applied)
}

/// Every file's text, then the rows of `syncq.sql_objects` that say so:
/// what [`apply`] does on a new database, as one script (the last
/// migration of `syncq::MIGRATOR`, for `#[sqlx::test(migrator = "syncq::MIGRATOR")]`).
pub(crate) fn script() -> String {
    let mut sql = String::new();
    for object in OBJECTS {
        sql.push_str(object.sql);
        sql.push('\n');
    }
    sql.push_str("INSERT INTO syncq.sql_objects (name, checksum) VALUES\n");
    let rows: Vec<String> = OBJECTS
        .iter()
        .map(|o| format!("    ('{}', '{}')", o.name, checksum(o.sql)))
        .collect();
    sql.push_str(&rows.join(",\n"));
    sql.push_str(
        "\nON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now();\n",
    );
    sql
}
