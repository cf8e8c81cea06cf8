//! Maintenance services that every worker process runs. Each is idempotent
//! and safe to run in every process at once (`SKIP LOCKED`, or an advisory
//! lock for the vacuumer), so no leader is needed.

pub mod pruner;
pub mod rescuer;
pub(crate) mod scheduler;
pub mod vacuumer;
