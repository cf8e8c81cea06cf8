//! The two NOLOGIN roles deployments grant to their logins (`syncq roles`).
//!
//! - `syncq_producer` may insert tasks (plain SQL or the enqueue API) and read
//!   the views; it cannot update or delete tasks or change datasets.
//! - `syncq_worker` may claim, update and prune tasks, write their error
//!   history and the rate log, keep datasets' throttle and turn columns, and
//!   its own registry rows. Neither may run DDL.
//!
//! Creating roles needs CREATEROLE; run it once per database as an admin.

use sqlx::PgPool;

/// Statements run in order; idempotent, safe to run again after upgrades.
const ROLES: &[&str] = &[
    r#"DO $$ BEGIN
         CREATE ROLE syncq_producer NOLOGIN;
       EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
       END $$"#,
    r#"DO $$ BEGIN
         CREATE ROLE syncq_worker NOLOGIN;
       EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
       END $$"#,
    "GRANT USAGE ON SCHEMA syncq TO syncq_producer, syncq_worker",
    // Producers: insert, and what the enqueue API reads back for unique keys.
    "GRANT INSERT ON syncq.tasks TO syncq_producer",
    "GRANT SELECT (id, dataset_id, unique_key, status) ON syncq.tasks TO syncq_producer",
    "GRANT USAGE ON SEQUENCE syncq.tasks_id_seq TO syncq_producer",
    "GRANT SELECT ON syncq.dataset_stats, syncq.running_tasks, syncq.recent_failures TO syncq_producer",
    // Workers.
    "GRANT SELECT, INSERT, UPDATE, DELETE ON syncq.tasks, syncq.task_errors, syncq.rate_log, syncq.workers TO syncq_worker",
    "GRANT SELECT, INSERT, UPDATE ON syncq.datasets TO syncq_worker",
    "GRANT USAGE ON SEQUENCE syncq.tasks_id_seq TO syncq_worker",
    "GRANT SELECT ON syncq.dataset_stats, syncq.running_tasks, syncq.recent_failures TO syncq_worker",
];

/// Creates the roles if missing and (re)grants their privileges.
pub async fn create(db: &PgPool) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    for statement in ROLES {
        sqlx::raw_sql(sqlx::AssertSqlSafe(*statement))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}
