//! The two NOLOGIN roles deployments grant to their logins (`syncq roles`),
//! with exactly the privileges of SPEC §2 "Privileges", column by column.
//!
//! - `syncq_producer` may insert tasks through their input columns
//!   (`dataset_id`, `kind`, `payload`, `priority`, `run_at`,
//!   `max_attempts`, `unique_key`), set `cancel_requested`, read the
//!   columns it needs to find its tasks (not payloads, results,
//!   checkpoints or errors) and the views. It cannot insert a task in any
//!   other state, choose an id, change settings or disturb a running task.
//! - `syncq_worker` may claim (the claim functions), write what a claim
//!   and an outcome write (status, attempts, runs, lease, times, result,
//!   checkpoint, last_error, run_at), append to the error history and the
//!   rate log, keep a dataset's throttle, turn and readiness columns, keep
//!   its registry rows, prune finished tasks through
//!   `syncq.prune_finished()`, and enqueue follow-up tasks as a producer
//!   does. Not the operator's settings (rate limits, caps, pause), not
//!   `DELETE` on tasks, not `cancel_requested`, `payload` or `max_attempts`.
//!
//! Neither may run DDL. Functions are not executable by PUBLIC. The table
//! in `docs/sql.md` says the same for operators; `tests/trust.rs` logs in
//! as each role and tries every statement.
//!
//! Creating roles needs CREATEROLE; run it once per database as an admin,
//! and again after an upgrade (it revokes what earlier versions granted).

/// Statements run in order, in one transaction; idempotent.
const ROLES: &[&str] = &[
    r#"DO $$ BEGIN
         CREATE ROLE syncq_producer NOLOGIN;
       EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
       END $$"#,
    r#"DO $$ BEGIN
         CREATE ROLE syncq_worker NOLOGIN;
       EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;
       END $$"#,
    // Start from nothing: earlier versions granted more.
    "REVOKE ALL ON ALL TABLES IN SCHEMA syncq FROM syncq_producer, syncq_worker",
    "REVOKE ALL ON ALL SEQUENCES IN SCHEMA syncq FROM syncq_producer, syncq_worker",
    "REVOKE ALL ON ALL FUNCTIONS IN SCHEMA syncq FROM PUBLIC, syncq_producer, syncq_worker",
    "REVOKE ALL ON SCHEMA syncq FROM syncq_producer, syncq_worker",
    "GRANT USAGE ON SCHEMA syncq TO syncq_producer, syncq_worker",
    // Producers.
    "GRANT INSERT (dataset_id, kind, payload, priority, run_at, max_attempts, unique_key)
         ON syncq.tasks TO syncq_producer",
    "GRANT UPDATE (cancel_requested) ON syncq.tasks TO syncq_producer",
    // To find its tasks (RETURNING id, unique keys, cancelling by a filter).
    "GRANT SELECT (id, dataset_id, kind, status, priority, run_at, attempts, max_attempts,
                   unique_key, cancel_requested, created_at, started_at, finished_at)
         ON syncq.tasks TO syncq_producer",
    "GRANT SELECT ON syncq.dataset_stats, syncq.running_tasks, syncq.recent_failures
         TO syncq_producer",
    // A pure function the dataset_stats view calls (an adaptive limit's
    // effective rate): the caller needs to be allowed to run it.
    "GRANT EXECUTE ON FUNCTION syncq.effective_rate(int, interval, float8, timestamptz, timestamptz)
         TO syncq_producer",
    // Workers.
    "GRANT SELECT ON syncq.tasks, syncq.datasets, syncq.task_errors, syncq.rate_log,
                     syncq.workers, syncq.workers_live, syncq.dataset_stats, syncq.running_tasks,
                     syncq.recent_failures
         TO syncq_worker",
    "GRANT INSERT (dataset_id, kind, payload, priority, run_at, max_attempts, unique_key)
         ON syncq.tasks TO syncq_worker",
    "GRANT UPDATE (status, attempts, runs, locked_by, lease_expires_at, started_at,
                   finished_at, run_at, result, checkpoint, last_error, snoozes)
         ON syncq.tasks TO syncq_worker",
    "GRANT INSERT (schedule_id, scheduled_for) ON syncq.tasks TO syncq_worker",
    "GRANT SELECT ON syncq.schedules TO syncq_worker",
    "GRANT UPDATE (next_run_at, last_run_at, last_task_id, skipped_ticks, error)
         ON syncq.schedules TO syncq_worker",
    "GRANT INSERT ON syncq.task_errors TO syncq_worker",
    "GRANT INSERT, DELETE ON syncq.rate_log TO syncq_worker",
    "GRANT SELECT ON syncq.ready_signals TO syncq_worker",
    // A turn a claim served but could not move: owed, then paid by the
    // claim that next moves the dataset.
    "GRANT SELECT, INSERT, DELETE ON syncq.turn_debts TO syncq_worker",
    // Shared limits: read, counted in their log, throttled by a 429.
    "GRANT SELECT ON syncq.limits, syncq.limit_rates, syncq.limit_log, syncq.limit_stats
         TO syncq_worker",
    "GRANT INSERT, DELETE ON syncq.limit_log TO syncq_worker",
    "GRANT UPDATE (throttled_until, adapted_from, adapted_at) ON syncq.limits TO syncq_worker",
    "GRANT INSERT, UPDATE, DELETE ON syncq.workers TO syncq_worker",
    // A 429 throttles a dataset, or lowers an adaptive one's rate.
    "GRANT UPDATE (throttled_until, adapted_from, adapted_at, last_claimed_at, served_at, ready_at)
         ON syncq.datasets TO syncq_worker",
    "GRANT EXECUTE ON FUNCTION
         syncq.claim(text, text[], text[], text[], int, float8, int),
         syncq.give_back(text, bigint[], int[]),
         syncq.take_permit(text, bigint, int, int),
         syncq.limits_room(text[], timestamptz),
         syncq.limit_windows(text, boolean, float8, timestamptz, timestamptz),
         syncq.effective_rate(int, interval, float8, timestamptz, timestamptz),
         syncq.paced_window(int, interval, float8, timestamptz, timestamptz),
         syncq.max_snoozes(),
         syncq.limit_running(text[]),
         syncq.limits_capped(text[]),
         syncq.limits_room_at(text[], int, timestamptz),
         syncq.claimable_datasets(text[], text[], text[]),
         syncq.running_count(text),
         syncq.queued_count(text),
         syncq.first_run_at(text),
         syncq.oldest_ready_at(text),
         syncq.rate_used(text, interval, timestamptz),
         syncq.rate_room_at(text, int, interval, timestamptz),
         syncq.absorb_signals(),
         syncq.next_claim_in(text[], text[], text[]),
         syncq.mark_idle(text[], timestamptz),
         syncq.refresh_ready(text[]),
         syncq.prune_rate_log(int),
         syncq.prune_finished(float8, text[], int),
         syncq.complete_many(text, bigint[], int[], text[], jsonb[], text[], float8[], float8[]),
         syncq.write_outcomes(text, bigint[], bigint[], int[], text[], jsonb[], text[], float8[],
                              float8[]),
         syncq.limit_lock_key(),
         syncq.limit_bucket(text)
         TO syncq_worker",
];

/// Creates the roles if missing and (re)grants exactly their privileges.
///
/// One at a time, and never beside a migration: two transactions granting
/// on the same objects at once fail with "tuple concurrently updated", so
/// this one first takes the migration lock (an advisory lock held until it
/// commits).
pub async fn create(db: &crate::db::Db) -> sqlx::Result<()> {
    let mut tx = db.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(super::ledger::MIGRATE_LOCK)
        .execute(tx.ex())
        .await?;
    for statement in ROLES {
        sqlx::raw_sql(sqlx::AssertSqlSafe(*statement))
            .execute(tx.ex())
            .await?;
    }
    tx.commit().await
}
