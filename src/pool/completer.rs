//! The completer: every attempt's outcome — success, retry, failure,
//! throttle, cancel, release — handed over as a value and written in
//! batches, one statement per batch (`syncq.complete_many`, fenced row by
//! row), as River's completer does: a failed attempt costs a busy pool no
//! more round trips than a success.

use crate::lease::{self};
use crate::store;
use crate::store::tasks::{End, Ended};
use crate::task::{ClaimedTask, TaskId};
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{COALESCE, Shared};

/// An outcome waiting to be written by the completer.
pub(super) struct Completion {
    pub(super) id: TaskId,
    pub(super) runs: i32,
    pub(super) end: End,
    /// Whether it was written (false: fenced out), or why not.
    pub(super) reply: oneshot::Sender<Result<bool, CompleteError>>,
}

/// Why an outcome was not written.
#[derive(Debug, Clone)]
pub(super) enum CompleteError {
    /// The database refused this outcome (a data error, such as a result
    /// it cannot store): writing it again cannot help.
    Refused(String),
    /// The write failed; `transient`: for want of a database (worth trying
    /// again while the lease lasts).
    Failed { message: String, transient: bool },
}

impl CompleteError {
    pub(super) fn of(e: &sqlx::Error) -> Self {
        match e {
            // SQLSTATE class 22: data exception (e.g. a NUL in jsonb).
            sqlx::Error::Database(d) if d.code().is_some_and(|c| c.starts_with("22")) => {
                CompleteError::Refused(d.message().to_string())
            }
            e => CompleteError::Failed {
                message: e.to_string(),
                transient: crate::db::is_transient(e),
            },
        }
    }

    /// A reason to try again soon (the completer stopped, the row was locked).
    pub(super) fn again(message: &str) -> Self {
        CompleteError::Failed {
            message: message.to_string(),
            transient: true,
        }
    }
}

impl std::fmt::Display for CompleteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompleteError::Refused(m) => write!(f, "result refused: {m}"),
            CompleteError::Failed { message, .. } => f.write_str(message),
        }
    }
}

impl lease::Failure for CompleteError {
    fn is_transient(&self) -> bool {
        matches!(
            self,
            CompleteError::Failed {
                transient: true,
                ..
            }
        )
    }

    fn timed_out() -> Self {
        CompleteError::again("writing the outcome timed out")
    }
}

/// Most outcomes written by one statement.
pub(super) const COMPLETION_BATCH: usize = 500;

/// Hands an outcome to the completer and waits until it is written.
pub(super) async fn complete(
    shared: &Shared,
    task: &ClaimedTask,
    end: End,
) -> Result<bool, CompleteError> {
    let (reply, written) = oneshot::channel();
    let request = Completion {
        id: task.id,
        runs: task.runs,
        end,
        reply,
    };
    let stopped = || CompleteError::again("the completer has stopped");
    if shared.completions.send(request).await.is_err() {
        return Err(stopped());
    }
    written.await.unwrap_or_else(|_| Err(stopped()))
}

/// Writes outcomes in batches: whatever has arrived while the previous
/// batch was being written goes in the next statement, so a busy pool
/// commits once per batch and an idle one writes each success at once.
pub(super) async fn complete_loop(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<Completion>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            request = requests.recv() => match request {
                Some(r) => r,
                None => return,
            },
            _ = stop.cancelled() => return,
        };
        let mut batch = vec![first];
        // While more tasks are running than this batch holds, give their
        // outcomes a moment to arrive and share the write.
        let deadline = tokio::time::Instant::now() + COALESCE;
        while batch.len() < COMPLETION_BATCH {
            match requests.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) if shared.held().len() > batch.len() => {
                    match tokio::time::timeout_at(deadline, requests.recv()).await {
                        Ok(Some(r)) => batch.push(r),
                        _ => break,
                    }
                }
                Err(_) => break,
            }
        }
        let rows: Vec<Ended> = batch
            .iter_mut()
            .map(|r| Ended {
                id: r.id,
                runs: r.runs,
                end: std::mem::replace(&mut r.end, End::Cancel),
            })
            .collect();
        // The same task twice (a run that lost its lease and this pool's
        // newer claim of it): one statement cannot fence both, so the batch
        // goes one by one, as a refused batch does.
        let distinct: HashSet<TaskId> = rows.iter().map(|r| r.id).collect();
        let written = if distinct.len() == rows.len() {
            store::tasks::complete_many(&shared.db, &shared.worker_id, &rows).await
        } else {
            Err(sqlx::Error::Protocol("a task twice in one batch".into()))
        };
        debug!(batch = batch.len(), "wrote outcomes");
        match written {
            Ok(ids) => {
                // Not written: fenced out, or skipped because another
                // transaction had the row locked (then it is still ours,
                // and record() writes it again).
                let (left, left_runs): (Vec<TaskId>, Vec<i32>) = batch
                    .iter()
                    .filter(|r| !ids.contains(&r.id))
                    .map(|r| (r.id, r.runs))
                    .unzip();
                let locked = if left.is_empty() {
                    Vec::new()
                } else {
                    store::tasks::still_held(&shared.db, &shared.worker_id, &left, &left_runs)
                        .await
                        .map(|held| held.into_iter().map(|t| t.id).collect())
                        .unwrap_or_else(|_| left.clone())
                };
                for request in batch {
                    let reply = if ids.contains(&request.id) {
                        Ok(true)
                    } else if locked.contains(&request.id) {
                        Err(CompleteError::again(
                            "its row is locked by another transaction",
                        ))
                    } else {
                        Ok(false)
                    };
                    let _ = request.reply.send(reply);
                }
            }
            // One refused result fails the whole statement: write each
            // outcome on its own, so only that task's write fails.
            Err(e)
                if batch.len() > 1
                    && (distinct.len() < rows.len()
                        || matches!(CompleteError::of(&e), CompleteError::Refused(_))) =>
            {
                warn!(error = %e, batch = batch.len(), "a batch of outcomes was refused; writing them one by one");
                for (request, row) in batch.into_iter().zip(rows) {
                    let one =
                        store::tasks::complete_many(&shared.db, &shared.worker_id, &[row]).await;
                    let _ = request.reply.send(match one {
                        Ok(ids) => Ok(ids.contains(&request.id)),
                        Err(e) => Err(CompleteError::of(&e)),
                    });
                }
            }
            Err(e) => {
                let error = CompleteError::of(&e);
                for request in batch {
                    let _ = request.reply.send(Err(error.clone()));
                }
            }
        }
    }
}
