//! # syncq
//!
//! A persistent task queue for Rust backed by PostgreSQL. Tasks are rows of
//! `syncq.tasks`; any service can enqueue with a plain SQL `INSERT`; worker
//! processes on any number of hosts claim them with `SELECT … FOR UPDATE SKIP
//! LOCKED`, taking turns across datasets. Everything that matters lives in
//! rows, so processes can crash and restart without losing work.
//!
//! The six parts of the design:
//! [`SyncTask`] (one unit of work and its handle), [`SyncWorker`] (the trait
//! you implement), [`WorkerPool`] (the worker loops of a process),
//! [`TaskQueueManager`] (enqueue; fleet-wide round-robin hand-out),
//! [`TaskQueue`] (one dataset's queue and settings), and [`RateLimiter`]
//! (a dataset's rate limit, a sliding log kept in rows).
//!
//! ## Quick start
//!
//! ```no_run
//! use syncq::{async_trait, NewTask, SyncTask, SyncWorker, TaskQueueManager, TaskResult, WorkerPool};
//!
//! struct Hello;
//!
//! #[async_trait]
//! impl SyncWorker for Hello {
//!     async fn handle(&self, task: &mut SyncTask) -> TaskResult {
//!         Ok(serde_json::json!({ "hello": task.payload() }))
//!     }
//! }
//!
//! # async fn run() -> syncq::Result<()> {
//! let db = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/syncq").await?;
//! syncq::migrate(&db).await?;
//! TaskQueueManager::new(db.clone())
//!     .enqueue(NewTask::new("greetings", "hello").payload(serde_json::json!("world")))
//!     .await?;
//! WorkerPool::builder(db).register("hello", Hello).build()?.run_with_signals().await
//! # }
//! ```

// Library code reached by users' input or the database never unwraps.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod backoff;
pub mod builtin;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod control;
#[cfg(feature = "dashboard")]
pub mod dashboard;
pub mod db;
pub mod error;
mod lease;
pub mod local_postgres;
pub mod maintenance;
pub mod manager;
pub mod metrics;
pub mod outcome;
pub mod pool;
pub mod queue;
pub mod rate_limit;
pub mod schedule;
pub mod schema;
#[cfg(not(feature = "internals"))]
pub(crate) mod store;
/// Every SQL statement syncq runs. Not part of the API: public only with
/// the `internals` feature, for syncq's own tests.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod store;
mod sync_task;
pub mod task;
mod task_id;
pub mod testing;
pub mod worker;

pub use async_trait::async_trait;
pub use backoff::Backoff;
pub use config::PoolConfig;
pub use control::{Command, Stop};
pub use db::{Db, Pooler};
pub use error::{Error, Result};
pub use manager::{TaskQueueManager, inspect};
pub use outcome::OutcomeKind;
pub use outcome::{TaskError, TaskResult, parse_retry_after};
pub use pool::{Event, PoolHandle, WorkerPool, WorkerPoolBuilder};
pub use queue::{LimitsUpdate, QueueCounts, QueueSettings, TaskMatch, TaskQueue};
pub use rate_limit::{RateLimit, RateLimiter};
pub use schedule::{Schedule, Timing};
pub use schema::{MIGRATOR, migrate};
pub use sync_task::{PermitRequest, SyncTask};
pub use task::{NewTask, RunAt, TaskId, TaskStatus};
pub use worker::SyncWorker;

/// The README's Rust examples, compiled as doc tests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
