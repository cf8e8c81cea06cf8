//! One run: a claimed task's handler in its slot, to an outcome, recorded fenced.

use crate::lease::{self, Lease};
use crate::outcome::TaskError;
use crate::store;
use crate::store::tasks::{End, Fence};
use crate::sync_task::{SyncTask, TaskContext};
use crate::task::ClaimedTask;
use std::sync::{Arc, PoisonError};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::completer::{self, CompleteError, complete};
use super::held::Waiting;
use super::{Event, Shared};
use crate::outcome::Outcome;

/// Claims of a task beyond its counted attempts from which its start is
/// written before its handler begins: a handler that kills its process at
/// once (before the completer wrote its start) still has its attempts
/// counted, so it cannot be claimed again forever.
pub(super) const MUST_WAIT_AFTER: i32 = 2;

/// The log target of each attempt's start and end, at info (the worker's
/// default level), inside the `task` span: task_id, dataset, kind,
/// attempt, run; the end adds the outcome and its duration. A busy queue
/// that wants fewer lines turns them off alone:
/// `RUST_LOG=syncq=info,syncq::attempt=warn`.
pub const ATTEMPT_LOG: &str = "syncq::attempt";

/// Runs one claimed task in its slot to an outcome and records it,
/// fenced. Without a slot (the pool stopped while it waited) it hands the
/// task back, unstarted and uncounted.
///
/// A task `leased` ahead is still `queued` in this worker's name: its
/// handler begins without a round trip, and the completer writes its
/// start — with its end if it ends soon (super::completer). Only a task
/// whose earlier runs ended unrecorded ([`MUST_WAIT_AFTER`]) waits for its
/// start to be written before its handler begins.
pub(super) async fn run_task(
    shared: Arc<Shared>,
    waiting: Waiting,
    slot: Option<OwnedSemaphorePermit>,
    leased: bool,
    hard_stop: CancellationToken,
) {
    let Waiting {
        mut task,
        lease,
        room,
        leased_at,
        unreadable,
        ..
    } = waiting;
    // The attempt this start makes, and when, as the handler sees them
    // (the claim's clock plus the wait here; the row gets the database's).
    if leased {
        task.attempts += 1;
        task.started_at += chrono::Duration::from_std(leased_at.elapsed()).unwrap_or_default();
    }
    let span = info_span!(
        "task",
        task_id = task.id.0,
        dataset = %task.dataset_id,
        kind = %task.kind,
        attempt = task.attempts,
        run = task.runs
    );
    async {
        let key = (task.id, task.runs);
        // Lost while it waited (the heartbeat could not renew it in an
        // outage, or this pool claimed it again): never started here.
        let (lost, cancelled) = shared.held().get(&key).map_or((true, false), |held| {
            (held.superseded || held.lease.expired(), held.cancel_heard)
        });
        let began = std::time::Instant::now();
        // For a task leased ahead: when its handler began (its start is
        // written with its end, or on its own once it has run a while).
        let mut began_leased: Option<tokio::time::Instant> = None;
        let joined = match shared.handlers.get(&task.kind).cloned() {
            _ if lost => Ok(Err(TaskError::LeaseLost)),
            // A payload or checkpoint this process cannot decode (valid
            // jsonb past serde_json's limits): invalid, once, naming the
            // column; no handler could be given it.
            _ if unreadable.is_some() => Ok(Err(TaskError::Invalid(
                unreadable.clone().unwrap_or_default(),
            ))),
            // Cancelled while it waited in the local queue: never started.
            _ if cancelled => Ok(Err(TaskError::Cancelled)),
            // Claimed as the pool began to stop (a claim can race the
            // shutdown), or still waiting for a slot then: hand it
            // straight back, unstarted and uncounted.
            _ if shared.shutdown.is_cancelled() || slot.is_none() => {
                Ok(Err(TaskError::Interrupted))
            }
            // Its earlier runs ended unrecorded (a handler that kills its
            // process?): its start is written before its handler begins,
            // so its attempts are counted.
            Some(_)
                if leased
                    && task.runs - task.attempts >= MUST_WAIT_AFTER
                    && !completer::began(&shared, &task, tokio::time::Instant::now(), true)
                        .await =>
            {
                Ok(Err(TaskError::LeaseLost))
            }
            Some(handler) => {
                if leased {
                    let at = tokio::time::Instant::now();
                    if task.runs - task.attempts < MUST_WAIT_AFTER {
                        completer::began(&shared, &task, at, false).await;
                    }
                    began_leased = Some(at);
                }
                if let Some(held) = shared.held().get_mut(&key) {
                    held.started = true;
                }
                // Logged here, as the handler begins, and nowhere else: a
                // task given back before this line never started.
                crate::metrics::task_started(&task);
                info!(target: ATTEMPT_LOG, "attempt started");
                let ctx = TaskContext {
                    db: shared.db.clone(),
                    worker_id: shared.worker_id.clone(),
                    commands: shared.commands.clone(),
                    checkpoint: shared.shutdown.clone(),
                    lease: lease.clone(),
                };
                let mut sync_task = SyncTask::new(task.clone(), ctx);
                let mut handle = tokio::spawn(
                    async move { handler.handle(&mut sync_task).await }.in_current_span(),
                );
                tokio::select! {
                    biased;
                    joined = &mut handle => joined,
                    _ = hard_stop.cancelled() => {
                        handle.abort();
                        handle.await
                    }
                }
            }
            // Unreachable in practice: the claim only asks for registered kinds.
            None => Ok(Err(TaskError::Invalid(format!(
                "no handler for kind {:?}",
                task.kind
            )))),
        };
        let outcome = Outcome::of(joined, shared.shutdown.is_cancelled());
        let kind = outcome.kind(&task);
        crate::metrics::task_finished(&task, kind, began.elapsed());
        if let Some(held) = shared.held().get_mut(&key) {
            held.finishing = true;
        }
        // The handler is done: its slot is free for the next task while
        // the outcome is written (in a batch, for successes). The task
        // keeps its room, and its row stays `running`, until then.
        drop(slot);
        shared.slot_freed.notify_one();
        let recorded = record(&shared, &task, &lease, outcome, began_leased).await;
        shared.held().finished(key);
        shared
            .finished
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        info!(
            target: ATTEMPT_LOG,
            outcome = ?kind,
            recorded,
            millis = u64::try_from(began.elapsed().as_millis()).unwrap_or(u64::MAX),
            "attempt ended"
        );
        drop(room);
        // A slot of a capped dataset may have freed: let an idle dispatcher look.
        shared.wake.notify_one();
        shared.emit(Event::Finished {
            task_id: task.id,
            outcome: kind,
            recorded,
        });
    }
    .instrument(span)
    .await
}

/// Writes an outcome, fenced. While the database is unreachable it keeps
/// trying, with backoff, for as long as the lease lasts — the heartbeat
/// goes on renewing it meanwhile, so an outage shorter than the lease
/// costs nothing: the task ends as its handler decided. Only once the
/// lease may have run out (another worker may own the task) is the outcome
/// given up, and the rescuer takes the task back.
pub(super) async fn record(
    shared: &Shared,
    task: &ClaimedTask,
    lease: &Lease,
    outcome: Outcome,
    began: Option<tokio::time::Instant>,
) -> bool {
    let fence = Fence {
        id: task.id,
        runs: task.runs,
        worker_id: &shared.worker_id,
    };
    if let Outcome::Fatal(message) = &outcome {
        error!(error = %message, "fatal error: checkpointing and stopping the pool");
        let mut fatal = shared.fatal.lock().unwrap_or_else(PoisonError::into_inner);
        fatal.get_or_insert((task.id, message.clone()));
        shared.shutdown.cancel();
    }
    let Some(end) = outcome.end(task.attempts, &shared.config) else {
        // Lost to another worker (the release is fenced out), or given
        // up when the lease ran out in an outage: if the task is still in
        // this worker's name, it goes back uncounted, checkpoint kept.
        match store::tasks::release(&shared.db, fence, None).await {
            Ok(true) => {
                info!("lease ran out unrenewed: the task went back to queued, uncounted")
            }
            Ok(false) => info!("lease lost: another worker owns this task now"),
            Err(e) => {
                debug!(error = %e, "handing back a task whose lease ran out failed; the rescuer will")
            }
        }
        return false;
    };
    let is_success = matches!(end, End::Succeed(_));
    let written =
        match lease::while_held(lease, || complete(shared, task, end.clone(), began)).await {
            Ok(written) => Ok(written),
            // Storing this result can never work: the attempt fails.
            Err(CompleteError::Refused(reason)) if is_success => {
                let error =
                    format!("the handler succeeded but its result could not be stored: {reason}");
                warn!(%error, "result refused by the database");
                lease::while_held(lease, || {
                    complete(shared, task, End::Fail(error.clone()), began)
                })
                .await
                .map_err(|e| sqlx::Error::Protocol(e.to_string()))
            }
            Err(e) => Err(sqlx::Error::Protocol(e.to_string())),
        };
    match written {
        Ok(true) => {
            shared.outage.ok();
            debug!(outcome = ?outcome.kind(task), "attempt recorded");
            true
        }
        Ok(false) => {
            warn!(outcome = ?outcome.kind(task), "outcome not recorded: this worker no longer holds the task");
            false
        }
        Err(e) => {
            error!(
                error = %e,
                outcome = ?outcome.kind(task),
                "could not record the outcome before the lease ran out: giving it up; the rescuer takes the task back"
            );
            false
        }
    }
}
