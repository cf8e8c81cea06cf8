//! The broadcast channel of control commands a `WorkerPool` owns.
//!
//! Every running handler hears it through its `SyncTask`. Commands for one
//! task carry its id; a handler only reacts to its own.

use crate::task::TaskId;

/// A command broadcast to the running handlers of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Command {
    /// Save progress and stop: the process is shutting down (Ctrl-C, SIGTERM,
    /// or a `Fatal` error). Tasks go back to `queued`, attempt not counted.
    Checkpoint,
    /// The task was cancelled (`cancel_requested` set).
    Cancel(TaskId),
    /// The pool lost this run's lease (`runs` at claim: a process that
    /// claimed the task again runs a newer one); its outcome can no longer
    /// be written.
    LeaseLost {
        /// The task.
        task_id: TaskId,
        /// The run that lost it.
        runs: i32,
    },
}

/// Why a handler is asked to stop, as heard through `SyncTask::stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Save a checkpoint and return (`TaskError::Interrupted`).
    Checkpoint,
    /// The task was cancelled (`TaskError::Cancelled`).
    Cancel,
    /// Another worker owns the task now (`TaskError::LeaseLost`).
    LeaseLost,
}
