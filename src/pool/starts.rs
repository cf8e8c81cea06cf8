//! The start recorder: writes the starts of tasks leased ahead, in batches
//! (`syncq.start_leased`), while their handlers begin.
//!
//! A task leased ahead starts when a slot frees: its handler begins at
//! once and its start — `running`, the attempt counted, `started_at` — is
//! written beside it, up to [`START_BATCH`] per statement, as the
//! completer writes outcomes. Waiting for that write before every start
//! put a round trip between each handler and the next in a slot: a drain
//! of short tasks ran at slots ÷ round trip (3,900 tasks/s at 24 slots,
//! against 17,000 with no write). The run waits for its start to be
//! written before it writes its outcome, so the rows never see an end
//! before its start. A start the database refuses — the task was
//! cancelled or taken meanwhile, or its dataset paused, throttled or
//! limited (then it is given back) — stops the handler within
//! milliseconds of its start, as a lost lease does, and the starter gives
//! back the rest of that dataset's local queue unstarted. A task whose
//! earlier runs ended without a recorded end ([`MUST_WAIT_AFTER`]) waits
//! for its start to be written before its handler begins: a handler that
//! kills its process at once still has its attempts counted.

use crate::store;
use crate::store::tasks::Start;
use crate::task::TaskId;
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use super::{COALESCE, Shared, retry_pause};
use crate::PoolConfig;

/// The most starts one statement writes.
pub(super) const START_BATCH: usize = 500;

/// Claims of a task beyond its counted attempts after which its start is
/// written before its handler begins (see the module's doc).
pub(super) const MUST_WAIT_AFTER: i32 = 2;

/// A start to write.
pub(super) struct StartRequest {
    pub(super) id: TaskId,
    pub(super) runs: i32,
    pub(super) dataset: String,
    /// When its handler began (this process's monotonic clock).
    pub(super) began: tokio::time::Instant,
    pub(super) reply: oneshot::Sender<Verdict>,
}

/// What became of a start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Written: the attempt and its start.
    Started {
        attempts: i32,
        started_at: DateTime<Utc>,
    },
    /// Not started: given back, cancelled, taken by another worker, or
    /// not written before the task's lease ahead ran out.
    NotStarted,
}

/// Writes starts as they come, as many per statement as are waiting.
/// Ends when every sender is gone and all are written.
pub(super) async fn start_recorder(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<StartRequest>,
) {
    while let Some(first) = rx.recv().await {
        let formed = tokio::time::Instant::now();
        let mut batch = vec![first];
        // Gathered for up to COALESCE: the handlers have begun already, so
        // waiting costs them nothing, and fewer statements leave the
        // database to the claims and completions.
        let until = formed + COALESCE;
        while batch.len() < START_BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(r)) => batch.push(r),
                Ok(None) | Err(_) => break,
            }
        }
        let ids: Vec<TaskId> = batch.iter().map(|r| r.id).collect();
        let runs: Vec<i32> = batch.iter().map(|r| r.runs).collect();
        let mut failures = 0;
        let answer: HashMap<TaskId, Start> = loop {
            let ago: Vec<std::time::Duration> = batch.iter().map(|r| r.began.elapsed()).collect();
            match store::tasks::start_leased(
                &shared.db,
                &shared.worker_id,
                &ids,
                &runs,
                &ago,
                shared.config.lease,
            )
            .await
            {
                Ok(answer) => {
                    shared.outage.ok();
                    break answer.into_iter().collect();
                }
                Err(e) => {
                    shared
                        .outage
                        .failed("writing the starts of tasks leased ahead", &e);
                    failures += 1;
                    let pause = retry_pause(failures, shared.config.poll_interval);
                    // Past their lease ahead another worker may have them.
                    if formed.elapsed() + pause >= PoolConfig::AHEAD_LEASE {
                        warn!(error = %e, tasks = ids.len(), "could not write the starts of tasks leased ahead before their lease ran out: stopping their handlers");
                        break HashMap::new();
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        };
        debug!(
            starts = ids.len(),
            written = answer.len(),
            "wrote the starts of tasks leased ahead"
        );
        for r in batch {
            let verdict = match answer.get(&r.id) {
                Some(Start::Started {
                    attempts,
                    started_at,
                }) => Verdict::Started {
                    attempts: *attempts,
                    started_at: *started_at,
                },
                Some(Start::GivenBack) => {
                    // Paused, throttled or limited: the rest of its local
                    // queue goes back unstarted (until a claim serves it).
                    shared.given_back().insert(r.dataset.clone());
                    Verdict::NotStarted
                }
                None => Verdict::NotStarted,
            };
            let _ = r.reply.send(verdict);
        }
    }
}
