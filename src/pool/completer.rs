//! The completer: every attempt's outcome — success, retry, failure,
//! throttle, cancel, release — handed over as a value and written in
//! batches, one statement per batch (`syncq.complete_many`, fenced row by
//! row), as River's completer does: a failed attempt costs a busy pool no
//! more round trips than a success.
//!
//! It writes the starts of tasks leased ahead too. Such a task's handler
//! begins as soon as a slot frees, without a round trip (one per start
//! held each slot idle for it: a drain of short tasks ran at slots ÷ round
//! trip, 3,900 tasks/s at 24 slots against 17,000); the run tells the
//! completer when it began ([`Began`]). A handler that ends within
//! [`PoolConfig::START_WRITE_DELAY`] has its start written with its end,
//! in the same row write; a longer one has its start written on its own
//! then (`End::Start`), so the row says `running` while the handler runs.
//! A start the database refuses — the task was cancelled, or taken by
//! another worker — stops its handler within milliseconds, as a lost lease
//! does.

use crate::lease::{self};
use crate::store;
use crate::store::tasks::{End, Ended};
use crate::task::{ClaimedTask, TaskId};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::held::RunKey;
use super::{COALESCE, Shared};
use crate::PoolConfig;
use crate::control::Command;
use tokio::time::Instant;

/// What the completer is handed.
pub(super) enum Request {
    /// The handler of a task leased ahead began.
    Began(Began),
    /// An attempt ended.
    End(Completion),
}

/// The handler of a task leased ahead began: its start is to be written.
pub(super) struct Began {
    pub(super) id: TaskId,
    pub(super) runs: i32,
    pub(super) at: Instant,
    /// Write it at once and say whether it was written (the run waits for
    /// it before its handler begins; see `runner::MUST_WAIT_AFTER`).
    pub(super) reply: Option<oneshot::Sender<bool>>,
}

/// An outcome waiting to be written by the completer.
pub(super) struct Completion {
    pub(super) id: TaskId,
    pub(super) runs: i32,
    pub(super) end: End,
    /// For a task leased ahead whose handler began: when. Its start is
    /// written with this end unless it was written already (the row is
    /// `running` then, and the statement tells).
    pub(super) began: Option<Instant>,
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
    began: Option<Instant>,
) -> Result<bool, CompleteError> {
    let (reply, written) = oneshot::channel();
    let request = Completion {
        id: task.id,
        runs: task.runs,
        end,
        began,
        reply,
    };
    let stopped = || CompleteError::again("the completer has stopped");
    if shared
        .completions
        .send(Request::End(request))
        .await
        .is_err()
    {
        return Err(stopped());
    }
    written.await.unwrap_or_else(|_| Err(stopped()))
}

/// Tells the completer that the handler of a task leased ahead began, and
/// with `wait`, waits until its start is written: true if it was.
pub(super) async fn began(shared: &Shared, task: &ClaimedTask, at: Instant, wait: bool) -> bool {
    let (reply, written) = oneshot::channel();
    let request = Began {
        id: task.id,
        runs: task.runs,
        at,
        reply: wait.then_some(reply),
    };
    if shared
        .completions
        .send(Request::Began(request))
        .await
        .is_err()
    {
        return false;
    }
    !wait || written.await.unwrap_or(false)
}

/// Writes outcomes in batches: whatever has arrived while the previous
/// batch was being written goes in the next statement, so a busy pool
/// commits once per batch and an idle one writes each success at once.
/// Starts of tasks leased ahead wait here up to
/// [`PoolConfig::START_WRITE_DELAY`] for their end, then go in a batch of
/// their own or beside other outcomes.
pub(super) async fn complete_loop(
    shared: Arc<Shared>,
    mut requests: mpsc::Receiver<Request>,
    stop: CancellationToken,
) {
    // Starts not written yet, by run.
    let mut pending: HashMap<RunKey, Began> = HashMap::new();
    loop {
        let due_at = pending
            .values()
            .map(|b| {
                if b.reply.is_some() {
                    b.at
                } else {
                    b.at + PoolConfig::START_WRITE_DELAY
                }
            })
            .min();
        let first = tokio::select! {
            request = requests.recv() => match request {
                Some(r) => Some(r),
                None => return,
            },
            _ = tokio::time::sleep_until(due_at.unwrap_or_else(Instant::now)), if due_at.is_some() => None,
            _ = stop.cancelled() => return,
        };
        let mut batch: Vec<Completion> = Vec::new();
        let mut take = |r: Request, batch: &mut Vec<Completion>| match r {
            Request::Began(b) => {
                pending.insert((b.id, b.runs), b);
            }
            Request::End(c) => {
                // Its start goes with it, if not written yet.
                pending.remove(&(c.id, c.runs));
                batch.push(c);
            }
        };
        if let Some(r) = first {
            take(r, &mut batch);
        }
        // While more tasks are running than this batch holds, give their
        // outcomes a moment to arrive and share the write.
        let deadline = Instant::now() + COALESCE;
        while batch.len() < COMPLETION_BATCH {
            match requests.try_recv() {
                Ok(r) => take(r, &mut batch),
                Err(_) if !batch.is_empty() && shared.held().len() > batch.len() => {
                    match tokio::time::timeout_at(deadline, requests.recv()).await {
                        Ok(Some(r)) => take(r, &mut batch),
                        _ => break,
                    }
                }
                Err(_) => break,
            }
        }
        // Starts due: waited for, or running past the delay.
        let now = Instant::now();
        let due: Vec<RunKey> = pending
            .iter()
            .filter(|(_, b)| b.reply.is_some() || b.at + PoolConfig::START_WRITE_DELAY <= now)
            .map(|(k, _)| *k)
            .take(COMPLETION_BATCH.saturating_sub(batch.len()).max(1))
            .collect();
        let starts: Vec<Began> = due.iter().filter_map(|k| pending.remove(k)).collect();
        if batch.is_empty() && starts.is_empty() {
            continue;
        }
        let mut rows: Vec<Ended> = batch
            .iter_mut()
            .map(|r| Ended {
                id: r.id,
                runs: r.runs,
                end: std::mem::replace(&mut r.end, End::Cancel),
                began_ago: r.began.map(|at| at.elapsed()),
            })
            .collect();
        rows.extend(starts.iter().map(|b| Ended {
            id: b.id,
            runs: b.runs,
            end: End::Start,
            began_ago: Some(b.at.elapsed()),
        }));
        // The same task twice (a run that lost its lease and this pool's
        // newer claim of it): one statement cannot fence both, so the batch
        // goes one by one, as a refused batch does.
        let distinct: HashSet<TaskId> = rows.iter().map(|r| r.id).collect();
        let written = if distinct.len() == rows.len() {
            store::tasks::complete_many(&shared.db, &shared.worker_id, &rows).await
        } else {
            Err(sqlx::Error::Protocol("a task twice in one batch".into()))
        };
        debug!(
            outcomes = batch.len(),
            starts = starts.len(),
            "wrote outcomes"
        );
        match written {
            Ok(ids) => {
                // Not written: fenced out, or skipped because another
                // transaction had the row locked (then it is still ours,
                // and record() writes it again).
                let (left, left_runs): (Vec<TaskId>, Vec<i32>) = rows
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
                for start in starts {
                    if ids.contains(&start.id) {
                        start_written(&shared, start, true);
                    } else if locked.contains(&start.id) {
                        // Still ours: written with the next batch.
                        pending.insert((start.id, start.runs), start);
                    } else {
                        start_written(&shared, start, false);
                    }
                }
            }
            // One refused result fails the whole statement: write each
            // outcome on its own, so only that task's write fails.
            Err(e)
                if rows.len() > 1
                    && (distinct.len() < rows.len()
                        || matches!(CompleteError::of(&e), CompleteError::Refused(_))) =>
            {
                warn!(error = %e, batch = rows.len(), "a batch of outcomes was refused; writing them one by one");
                let mut rows = rows.into_iter();
                for (request, row) in batch.into_iter().zip(rows.by_ref()) {
                    let one =
                        store::tasks::complete_many(&shared.db, &shared.worker_id, &[row]).await;
                    let _ = request.reply.send(match one {
                        Ok(ids) => Ok(ids.contains(&request.id)),
                        Err(e) => Err(CompleteError::of(&e)),
                    });
                }
                for (start, row) in starts.into_iter().zip(rows) {
                    match store::tasks::complete_many(&shared.db, &shared.worker_id, &[row]).await {
                        Ok(ids) => {
                            let written = ids.contains(&start.id);
                            start_written(&shared, start, written);
                        }
                        Err(_) => {
                            pending.insert((start.id, start.runs), start);
                        }
                    }
                }
            }
            Err(e) => {
                let error = CompleteError::of(&e);
                for request in batch {
                    let _ = request.reply.send(Err(error.clone()));
                }
                // Tried again with the next batch, after a pause (the
                // database is failing: no loop of failed writes).
                for start in starts {
                    pending.insert((start.id, start.runs), start);
                }
                tokio::select! {
                    _ = tokio::time::sleep(START_RETRY_PAUSE) => {}
                    _ = stop.cancelled() => return,
                }
            }
        }
    }
}

/// How long the completer waits after a failed write before writing the
/// starts it holds again.
const START_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// A start was written, or refused (the task was cancelled or taken by
/// another worker meanwhile: its handler is stopped, as on a lost lease).
fn start_written(shared: &Shared, start: Began, written: bool) {
    if !written {
        if let Some(held) = shared.held().get_mut(&(start.id, start.runs)) {
            held.superseded = true;
        }
        warn!(
            task_id = start.id.0,
            "its start was refused (cancelled or taken meanwhile): stopping its handler"
        );
        let _ = shared.commands.send(Command::LeaseLost {
            task_id: start.id,
            runs: start.runs,
        });
    }
    if let Some(reply) = start.reply {
        let _ = reply.send(written);
    }
}
