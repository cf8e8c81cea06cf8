//! The runs a pool holds, keyed by task and run (the fencing token).

use crate::lease::Lease;
use crate::task::ClaimedTask;
use crate::task::TaskId;
use std::collections::HashMap;
use tokio::sync::OwnedSemaphorePermit;

/// One run of a task this pool holds: its id and `runs` at claim (the
/// fencing token). Keyed by both, so a task this process lost and claimed
/// again is two entries, each hearing about its own lease.
pub(super) type RunKey = (TaskId, i32);

/// A run this pool holds.
#[derive(Debug, Clone)]
pub(super) struct Held {
    /// Its lease as last renewed.
    pub(super) lease: Lease,
    /// No longer renewed: this pool claimed the task again (a newer run),
    /// or the lease ran out while the database was unreachable.
    pub(super) superseded: bool,
    /// Its outcome is being written: if the heartbeat no longer finds it
    /// running, that is the write landing, not a lost lease.
    pub(super) finishing: bool,
    /// A cancel was heard for it: a task still in the local queue then
    /// ends cancelled without starting its handler.
    pub(super) cancel_heard: bool,
    /// Its handler began (or its claim started it): false while it is
    /// leased ahead in the local queue, `queued` in this worker's name.
    pub(super) started: bool,
}

/// The runs this pool holds, with each task's newest run at hand (a claim
/// must find an older run of the same task without scanning them all).
#[derive(Debug, Default)]
pub(super) struct HeldRuns {
    pub(super) runs: HashMap<RunKey, Held>,
    /// The newest run of each task held here.
    pub(super) newest: HashMap<TaskId, i32>,
}

impl HeldRuns {
    /// Adds a newly claimed run. Returns the run of the same task it
    /// supersedes, if one was still held and not yet given up: the new
    /// claim proves that one lost its lease.
    pub(super) fn claimed(&mut self, (id, runs): RunKey, held: Held) -> Option<i32> {
        self.runs.insert((id, runs), held);
        let older = self
            .newest
            .insert(id, runs)
            .filter(|older| *older != runs)?;
        let h = self.runs.get_mut(&(id, older))?;
        if h.superseded {
            return None;
        }
        h.superseded = true;
        Some(older)
    }

    /// The run's outcome is written (or given up): it is no longer held.
    pub(super) fn finished(&mut self, (id, runs): RunKey) {
        self.runs.remove(&(id, runs));
        if self.newest.get(&id) == Some(&runs) {
            self.newest.remove(&id);
        }
    }

    pub(super) fn holds(&self, id: TaskId) -> bool {
        self.newest.contains_key(&id)
    }

    /// A cancel notification named the task: if its newest run is still
    /// leased ahead (not started), it is given back rather than started —
    /// a hint suffices there (a false one only returns the task to the
    /// fleet). Returns whether it was.
    pub(super) fn cancel_hinted(&mut self, id: TaskId) -> bool {
        if let Some(runs) = self.newest.get(&id).copied()
            && let Some(held) = self.runs.get_mut(&(id, runs))
            && !held.started
        {
            held.cancel_heard = true;
            return true;
        }
        false
    }

    /// A cancel of the task was heard: marks its newest run.
    pub(super) fn cancel_heard(&mut self, id: TaskId) {
        if let Some(runs) = self.newest.get(&id).copied()
            && let Some(held) = self.runs.get_mut(&(id, runs))
        {
            held.cancel_heard = true;
        }
    }
}

impl std::ops::Deref for HeldRuns {
    type Target = HashMap<RunKey, Held>;

    fn deref(&self) -> &Self::Target {
        &self.runs
    }
}

impl std::ops::DerefMut for HeldRuns {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.runs
    }
}

/// A claimed task on its way to a slot: started by its claim (with the
/// slot the claim was sent for), or leased ahead and waiting in the local
/// queue.
pub(super) struct Waiting {
    pub(super) task: ClaimedTask,
    pub(super) lease: Lease,
    pub(super) room: OwnedSemaphorePermit,
    /// The slot of a task its claim started; None while leased ahead.
    pub(super) slot: Option<OwnedSemaphorePermit>,
    /// When it was leased ahead (it is given back after
    /// [`PoolConfig::AHEAD_WAIT`](crate::PoolConfig::AHEAD_WAIT)).
    pub(super) leased_at: tokio::time::Instant,
    /// Its payload or checkpoint cannot be decoded here: it fails as
    /// invalid, its handler never started.
    pub(super) unreadable: Option<String>,
}
