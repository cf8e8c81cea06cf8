//! The only place with SQL. One file per entity; every statement is
//! compile-checked by sqlx against the schema (offline data in `.sqlx/`).
//!
//! Every state change is one statement. Statements that act on a running
//! task are fenced by `(id, runs, locked_by, status = 'running')`: `runs` is
//! incremented by every claim, so a worker that lost its lease — even to
//! another slot of the same process — matches nothing and writes nothing.

pub mod datasets;
pub mod demo;
pub mod inspect;
pub mod ops;
pub mod roles;
pub mod schedules;
pub mod tasks;
pub mod workers;

/// Seconds as the `float8` that `make_interval(secs => …)` takes.
pub(crate) fn secs(d: std::time::Duration) -> f64 {
    d.as_secs_f64()
}
