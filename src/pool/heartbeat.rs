//! The heartbeat: leases renewed, lost ones told, cancels re-read.

use crate::control::Command;
use crate::lease::Lease;
use crate::store;
use crate::task::TaskId;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Shared;
use super::held::RunKey;

/// Renews the leases this pool holds and its registry row; tells handlers
/// whose lease is gone, and re-announces cancels (in case a NOTIFY was
/// missed). While the database is unreachable it beats more often, so the
/// leases are renewed as soon as it is back; a run whose lease may have
/// run out meanwhile is given up (its handler hears `LeaseLost`), since
/// another worker may own the task by then.
pub(super) async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let lease = shared.config.lease;
    loop {
        let every = if shared.outage.is_down() {
            shared.config.heartbeat.min(OUTAGE_HEARTBEAT)
        } else {
            shared.config.heartbeat
        };
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        // No beat may wait longer than a beat for the database (a pool
        // waiting for a connection would otherwise hold it past leases
        // that need giving up).
        let beat = shared.config.heartbeat;
        let sent_at = tokio::time::Instant::now();
        match within(
            beat,
            store::workers::heartbeat(&shared.db, &shared.worker_id),
        )
        .await
        {
            Ok(()) => shared.outage.ok(),
            Err(e) => shared.outage.failed("the worker heartbeat", &e),
        }
        // The current run of each task, running or leased ahead (an older
        // one was superseded by a newer claim here and is not renewed).
        let current: Vec<(RunKey, Lease)> = shared
            .held()
            .iter()
            .filter(|(_, h)| !h.superseded)
            .map(|(key, h)| (*key, h.lease.clone()))
            .collect();
        if current.is_empty() {
            continue;
        }
        let (ids, runs): (Vec<TaskId>, Vec<i32>) = current.iter().map(|(key, _)| *key).unzip();
        let renewed = match within(
            beat,
            store::tasks::renew_leases(&shared.db, &shared.worker_id, &ids, &runs, lease),
        )
        .await
        {
            Ok(renewed) => renewed,
            Err(e) => {
                shared.outage.failed("renewing leases", &e);
                give_up_expired(&shared, &current);
                continue;
            }
        };
        shared.outage.ok();
        let renewed: HashMap<TaskId, bool> =
            renewed.iter().map(|r| (r.id, r.cancel_requested)).collect();
        // Not renewed: lost, or its row was locked elsewhere just now (then
        // it is renewed at the next beat).
        let missing: Vec<RunKey> = current
            .iter()
            .map(|(key, _)| *key)
            .filter(|(id, _)| !renewed.contains_key(id))
            .collect();
        let locked: HashSet<TaskId> = if missing.is_empty() {
            HashSet::new()
        } else {
            let (m_ids, m_runs): (Vec<TaskId>, Vec<i32>) = missing.iter().copied().unzip();
            match within(
                beat,
                store::tasks::still_held(&shared.db, &shared.worker_id, &m_ids, &m_runs),
            )
            .await
            {
                Ok(held) => held.into_iter().map(|t| t.id).collect(),
                Err(e) => {
                    shared.outage.failed("checking leases not renewed", &e);
                    m_ids.into_iter().collect()
                }
            }
        };
        for ((id, runs), held_lease) in &current {
            match renewed.get(id) {
                Some(cancel) => {
                    held_lease.renewed(sent_at, lease);
                    if *cancel {
                        shared.held().cancel_heard(*id);
                        let _ = shared.commands.send(Command::Cancel(*id));
                    }
                }
                None if locked.contains(id) => {}
                // Finished meanwhile, or lost: only the latter is still
                // held and not being recorded (a success just written is
                // still held until its reply).
                None if shared
                    .held()
                    .get(&(*id, *runs))
                    .is_some_and(|h| !h.finishing) =>
                {
                    warn!(task_id = id.0, runs, "lease lost");
                    let _ = shared.commands.send(Command::LeaseLost {
                        task_id: *id,
                        runs: *runs,
                    });
                }
                None => {}
            }
        }
        give_up_expired(&shared, &current);
    }
}

/// `query`, or a timeout error once `limit` has passed.
pub(super) async fn within<T>(
    limit: Duration,
    query: impl Future<Output = sqlx::Result<T>>,
) -> sqlx::Result<T> {
    tokio::time::timeout(limit, query)
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// How often the heartbeat beats while the database is unreachable.
pub(super) const OUTAGE_HEARTBEAT: Duration = Duration::from_millis(500);

/// Tells the handlers of runs whose lease may have run out (the database
/// was unreachable to renew it) to stop: another worker may own the task
/// now. A run whose outcome is being written gives itself up (`record`).
pub(super) fn give_up_expired(shared: &Shared, current: &[(RunKey, Lease)]) {
    for ((id, runs), lease) in current {
        if !lease.expired() {
            continue;
        }
        let mut held = shared.held();
        let Some(h) = held.get_mut(&(*id, *runs)) else {
            continue;
        };
        if h.finishing || h.superseded {
            continue;
        }
        // Once: it is no longer renewed, and its handler is stopping.
        h.superseded = true;
        drop(held);
        warn!(
            task_id = id.0,
            runs, "lease ran out while the database was unreachable: stopping the handler"
        );
        let _ = shared.commands.send(Command::LeaseLost {
            task_id: *id,
            runs: *runs,
        });
    }
}
