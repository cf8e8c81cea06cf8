//! The dispatcher: claims through the [`TaskQueueManager`](crate::TaskQueueManager)
//! as slots free, a local queue of tasks leased ahead, and a starter that
//! starts them in claim order.

use crate::config::PoolConfig;
use crate::control::Command;
use crate::lease::Lease;
use crate::manager::set_aside::{self, SetAside};
use crate::store;
use crate::store::tasks::Fence;
use crate::task::ClaimedTask;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use super::held::{Held, Waiting};
use super::runner::run_task;
use super::{COALESCE, Event, Shared, retry_pause};

/// The claim loop: wait for room, claim up to that many, hand each task to
/// a run that starts it as soon as a slot is free.
///
/// Room is the free slots plus a local queue (`prefetch`): tasks leased
/// ahead, waiting here for a slot in claim order (the slots semaphore is
/// first come, first served). They are leased like running ones — renewed
/// by the heartbeat, counted against caps and rate limits, handed back
/// uncounted if the pool stops before they start — so the local queue
/// only changes how many claims a drain takes, not what a claim means.
/// Its size follows the pool's pace ([`Pace`]): short tasks drain in a few
/// large claims; slow ones keep almost nothing waiting.
pub(super) async fn dispatch(
    shared: &Arc<Shared>,
    running: &TaskTracker,
    hard_stop: &CancellationToken,
) {
    let concurrency = shared.config.concurrency;
    let prefetch = shared.config.prefetch;
    // Handlers running.
    let slots = Arc::new(Semaphore::new(concurrency));
    // Tasks held here, running or waiting for a slot.
    let room = Arc::new(Semaphore::new(concurrency + prefetch));
    // Claims sent and not yet answered.
    let mut in_flight: FuturesUnordered<JoinHandle<Claimed>> = FuturesUnordered::new();
    // The local queue: claimed tasks, in claim order, to the starter.
    let (queue, queued) = mpsc::unbounded_channel();
    let starter = tokio::spawn(start_loop(
        shared.clone(),
        slots.clone(),
        queued,
        running.clone(),
        hard_stop.clone(),
    ));
    let local = Local {
        shared,
        queue: &queue,
        room: &room,
        slots: &slots,
    };
    claim_loop(&local, &mut in_flight).await;
    // Stopping. Claims still in flight commit all the same: their tasks go
    // through the local queue, which hands them back unstarted and
    // uncounted, as the ones that were waiting there.
    let mut unsure = false;
    while let Some(answer) = in_flight.next().await {
        match answer {
            Ok(Claimed {
                asked_at,
                permits,
                result: Ok(tasks),
                ..
            }) => local.take(tasks, permits, asked_at),
            _ => unsure = true,
        }
    }
    if unsure && let Err(e) = release_orphans(shared).await {
        warn!(error = %e, "looking for tasks of a claim lost while stopping failed; the rescuer will take them back");
    }
    drop(queue);
    if let Err(e) = starter.await {
        error!(error = %e, "the local queue's starter ended abnormally");
    }
}

/// What the claim loop hands its claims to.
pub(super) struct Local<'a> {
    pub(super) shared: &'a Arc<Shared>,
    pub(super) queue: &'a mpsc::UnboundedSender<Waiting>,
    pub(super) room: &'a Arc<Semaphore>,
    pub(super) slots: &'a Arc<Semaphore>,
}

impl Local<'_> {
    /// Registers claimed tasks as held and queues them, in claim order.
    pub(super) fn take(
        &self,
        tasks: Vec<ClaimedTask>,
        permits: Vec<OwnedSemaphorePermit>,
        asked_at: tokio::time::Instant,
    ) {
        let shared = self.shared;
        for (task, room) in tasks.into_iter().zip(permits) {
            let lease = Lease::new(asked_at, shared.config.lease);
            let older = shared.held().claimed(
                (task.id, task.runs),
                Held {
                    lease: lease.clone(),
                    superseded: false,
                    finishing: false,
                    cancel_heard: false,
                },
            );
            if let Some(runs) = older {
                // The task went back to `queued` before this claim.
                warn!(
                    task_id = task.id.0,
                    runs, "claimed again here: the older run lost its lease"
                );
                let _ = shared.commands.send(Command::LeaseLost {
                    task_id: task.id,
                    runs,
                });
            }
            shared.emit(Event::Claimed {
                task_id: task.id,
                dataset_id: task.dataset_id.clone(),
                kind: task.kind.clone(),
            });
            // The starter outlives the claim loop: a send cannot fail.
            let _ = self.queue.send(Waiting { task, lease, room });
        }
    }

    /// Nothing held here: no task running, waiting or being recorded.
    pub(super) fn is_empty(&self) -> bool {
        self.room.available_permits()
            == self.shared.config.concurrency + self.shared.config.prefetch
    }
}

/// Starts the local queue's tasks in claim order, each as a slot frees
/// (the slots semaphore is first come, first served, and this is its one
/// waiter). Once the pool stops, starts nothing more: the rest go to runs
/// that hand them back unstarted and uncounted.
pub(super) async fn start_loop(
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    mut queued: mpsc::UnboundedReceiver<Waiting>,
    running: TaskTracker,
    hard_stop: CancellationToken,
) {
    while let Some(waiting) = queued.recv().await {
        let slot = tokio::select! {
            biased;
            slot = slots.clone().acquire_owned() => slot.ok(),
            _ = shared.shutdown.cancelled() => None,
        };
        running.spawn(run_task(shared.clone(), waiting, slot, hard_stop.clone()));
    }
}

/// The claim loop: wait for room, claim up to that much, queue the tasks.
pub(super) async fn claim_loop(
    local: &Local<'_>,
    in_flight: &mut FuturesUnordered<JoinHandle<Claimed>>,
) {
    let mut state = ClaimLoop::new(local);
    loop {
        let may_claim = state.may_claim(in_flight);
        let step = tokio::select! {
            biased;
            _ = local.shared.shutdown.cancelled() => Step::Stop,
            answer = in_flight.next(), if !in_flight.is_empty() => match answer {
                Some(answer) => state.on_answer(answer, in_flight).await,
                None => Step::Go,
            },
            permit = local.room.clone().acquire_owned(), if may_claim => match permit {
                Ok(first) => state.send(first, in_flight).await,
                Err(_) => Step::Stop,
            },
        };
        if step == Step::Stop {
            return;
        }
    }
}

/// What the claim loop does after a step: go on, or stop (the pool is
/// stopping, or it is idle and `exit_when_idle`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Go,
    Stop,
}

/// The claim loop's memory between claims.
struct ClaimLoop<'l, 'a> {
    local: &'l Local<'a>,
    /// The pool's recent pace: how far ahead of its slots it leases.
    pace: Pace,
    /// Database failures in a row (the pause after one grows with them).
    db_failures: u32,
    /// "Ready now" answers in a row that claimed nothing.
    lost_races: u32,
    /// Wake-ups in a row that found nothing to claim (see WAKE_FLOOR).
    empty_wakes: u32,
    /// The last wait ended by a wake-up, not the poll interval.
    woken: bool,
    /// Datasets left out of claims because claiming from them fails.
    set_aside: SetAside,
    /// A claim failed: its answer may have been lost after it committed.
    claim_unsure: bool,
    /// The last empty claim was told nothing is due but new work: until
    /// something claims or wakes us, a timed poll is one claim, not two
    /// statements.
    nothing_due: bool,
    /// Claims come back full: a second claim may be in flight (a busy
    /// pool's next claim overlaps the previous one's round trip and
    /// commit).
    busy_claims: bool,
}

impl<'l, 'a> ClaimLoop<'l, 'a> {
    fn new(local: &'l Local<'a>) -> Self {
        ClaimLoop {
            local,
            pace: Pace::new(),
            db_failures: 0,
            lost_races: 0,
            empty_wakes: 0,
            woken: false,
            set_aside: SetAside::new(local.shared.config.set_aside),
            claim_unsure: false,
            nothing_due: false,
            busy_claims: false,
        }
    }

    fn shared(&self) -> &'a Arc<Shared> {
        self.local.shared
    }

    /// Whether another claim may be sent now: two in flight at most, the
    /// second only while claims come back full and when it is worth a
    /// claim (a claim's fixed cost is most of a small one's); and none
    /// while orphans of a lost claim are to be looked for.
    fn may_claim(&self, in_flight: &FuturesUnordered<JoinHandle<Claimed>>) -> bool {
        let concurrency = self.shared().config.concurrency;
        (in_flight.is_empty()
            || (in_flight.len() < 2
                && self.busy_claims
                && self.local.room.available_permits()
                    >= (concurrency + self.pace.last()).div_ceil(4)))
            && (!self.claim_unsure || in_flight.is_empty())
    }

    /// Room is free (`first`): gathers as much as is wanted and sends a
    /// claim for it, in a task of its own (the round trip goes on while
    /// the dispatcher starts the next claim or handles an answer).
    async fn send(
        &mut self,
        first: OwnedSemaphorePermit,
        in_flight: &mut FuturesUnordered<JoinHandle<Claimed>>,
    ) -> Step {
        let shared = self.shared();
        let (room, slots) = (self.local.room, self.local.slots);
        let concurrency = shared.config.concurrency;
        let prefetch = shared.config.prefetch;
        let mut permits = vec![first];
        // Ahead of its slots by no more than its pace warrants.
        let ahead = self.pace.allowance(&shared.finished, prefetch);
        gather_permits(room, &mut permits, concurrency + ahead).await;
        // Held here beyond the running handlers (waiting for a slot, or
        // asked for by a claim in flight).
        let held_here = concurrency + prefetch - room.available_permits() - permits.len();
        let busy = concurrency - slots.available_permits();
        let waiting = held_here.saturating_sub(busy);
        let wanted = (slots.available_permits() + ahead).saturating_sub(waiting);
        if wanted == 0 {
            // Every slot busy and the local queue full enough: wait for a
            // run to end (each one wakes the dispatcher), or for the claim
            // in flight.
            drop(permits);
            if in_flight.is_empty() {
                tokio::select! {
                    _ = shared.slot_freed.notified() => {}
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep(COALESCE * 5) => {}
                    _ = shared.shutdown.cancelled() => return Step::Stop,
                }
            }
            return Step::Go;
        }
        permits.truncate(wanted);
        if self.claim_unsure {
            match release_orphans(shared).await {
                Ok(released) => {
                    self.claim_unsure = false;
                    if released > 0 {
                        warn!(
                            released,
                            "tasks claimed by a claim whose answer was lost went back to queued, uncounted"
                        );
                    }
                }
                Err(e) => {
                    shared
                        .outage
                        .failed("looking for tasks of a lost claim", &e);
                    drop(permits);
                    return self.pause_after_failure().await;
                }
            }
        }
        let skip = self.set_aside.current();
        in_flight.push(tokio::spawn(send_claim(shared.clone(), skip, permits)));
        Step::Go
    }

    /// A claim answered.
    async fn on_answer(
        &mut self,
        answer: Result<Claimed, tokio::task::JoinError>,
        in_flight: &FuturesUnordered<JoinHandle<Claimed>>,
    ) -> Step {
        let shared = self.shared();
        let Claimed {
            asked_at,
            skip,
            permits,
            result,
        } = match answer {
            Ok(answer) => answer,
            Err(e) => {
                // The claim's task panicked or was cancelled: whatever it
                // may have claimed is found as orphans.
                error!(error = %e, "a claim's task ended without an answer");
                self.claim_unsure = true;
                return Step::Go;
            }
        };
        let tasks = match result {
            Ok(tasks) => {
                self.db_failures = 0;
                shared.outage.ok();
                tasks
            }
            Err(e) => {
                let asked = permits.len();
                drop(permits);
                return self.on_claim_error(e, &skip, asked).await;
            }
        };
        self.busy_claims = tasks.len() == permits.len() && tasks.len() > 1;
        if !tasks.is_empty() {
            self.lost_races = 0;
            self.empty_wakes = 0;
            self.nothing_due = false;
            debug!(
                claimed = tasks.len(),
                asked = permits.len(),
                micros = u64::try_from(asked_at.elapsed().as_micros()).unwrap_or(u64::MAX),
                "claimed tasks"
            );
            self.local.take(tasks, permits, asked_at);
            return Step::Go;
        }
        drop(permits);
        if !in_flight.is_empty() {
            // Another claim is on its way: its answer decides what next.
            return Step::Go;
        }
        self.after_nothing_claimed(&skip).await
    }

    /// A claim failed. One dataset's rows must not stop the others being
    /// served: if the failure may be a dataset's, find it, name it, leave
    /// it out for a while. Otherwise pause (longer after each failure in a
    /// row); a failure for want of a database may have lost the answer of
    /// a claim that committed, so its tasks are looked for as orphans.
    async fn on_claim_error(&mut self, e: sqlx::Error, skip: &[String], asked: usize) -> Step {
        let shared = self.shared();
        if !set_aside::may_be_one_dataset(&e) {
            self.claim_unsure = true;
            shared.outage.failed("claiming tasks", &e);
            return self.pause_after_failure().await;
        }
        match shared
            .manager
            .find_failing(&shared.claimer, skip, asked)
            .await
        {
            Ok(failing) if !failing.is_empty() => {
                for (dataset, reason) in failing {
                    error!(
                        dataset = %dataset,
                        error = %reason,
                        set_aside_for = ?shared.config.set_aside,
                        "claiming from this dataset fails: setting it aside, serving the others"
                    );
                    self.set_aside.add(dataset);
                }
                return Step::Go;
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "looking for the dataset that fails claims failed"),
        }
        let pause = retry_pause(self.db_failures + 1, shared.config.poll_interval);
        error!(error = %e, retry_in = ?pause, "claiming tasks failed");
        self.pause_after_failure().await
    }

    /// One more database failure in a row: pauses accordingly.
    async fn pause_after_failure(&mut self) -> Step {
        self.db_failures += 1;
        let shared = self.shared();
        let pause = retry_pause(self.db_failures, shared.config.poll_interval);
        tokio::select! {
            _ = tokio::time::sleep(pause) => Step::Go,
            _ = shared.shutdown.cancelled() => Step::Stop,
        }
    }

    /// Nothing claimed and no claim in flight. Asks how long until
    /// something may be: now (every claimable dataset was locked by another
    /// claimer at that instant: retry soon rather than wait for a wake-up
    /// that may never come), a throttle / rate budget / delayed task (sleep
    /// until then, not in a busy loop), or only new work (wait for a NOTIFY
    /// or the poll). Stops here if idle and `exit_when_idle`.
    async fn after_nothing_claimed(&mut self, skip: &[String]) -> Step {
        let shared = self.shared();
        let mut wait = shared.config.poll_interval;
        let next = if self.woken || !self.nothing_due {
            shared.manager.next_claim_in(&shared.claimer, skip).await
        } else {
            // Asked after an earlier empty claim and nothing since: work
            // that came meanwhile without a NOTIFY (polling) is found by
            // the next poll.
            Ok(None)
        };
        self.nothing_due = matches!(next, Ok(None));
        match next {
            Ok(Some(d)) if d.is_zero() => {
                wait = Duration::from_millis(5 + rand::random::<u64>() % 20);
                // "Ready now" yet nothing claimed, again and again: a
                // dataset's ready_at may be stale (see refresh_ready).
                self.lost_races += 1;
                if self.lost_races >= 3 {
                    self.lost_races = 0;
                    match shared.manager.refresh_ready(&shared.claimer).await {
                        Ok(0) => {}
                        Ok(n) => debug!(datasets = n, "repaired stale ready_at"),
                        Err(e) => warn!(error = %e, "repairing ready_at failed"),
                    }
                }
            }
            Ok(Some(d)) => wait = wait.min(d + Duration::from_millis(2)),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "asking when work is next ready failed"),
        }
        if shared.config.exit_when_idle && self.local.is_empty() && self.idle().await {
            return Step::Stop;
        }
        self.empty_wakes = if self.woken {
            self.empty_wakes.saturating_add(1)
        } else {
            0
        };
        if self.empty_wakes >= 3 {
            // Any role that can connect may NOTIFY: a flood of wake-ups
            // with nothing behind them is answered at most every
            // WAKE_FLOOR, not with a claim per notification.
            tokio::select! {
                _ = tokio::time::sleep(WAKE_FLOOR.min(wait)) => {}
                _ = shared.shutdown.cancelled() => return Step::Stop,
            }
        }
        self.woken = tokio::select! {
            _ = shared.wake.notified() => true,
            _ = tokio::time::sleep(wait) => false,
            _ = shared.shutdown.cancelled() => return Step::Stop,
        };
        Step::Go
    }

    /// The idle rule (`exit_when_idle`): nothing this worker could run is
    /// running anywhere, and nothing queued becomes claimable within
    /// [`PoolConfig::IDLE_HORIZON`] without an operator.
    async fn idle(&self) -> bool {
        let shared = self.shared();
        match shared
            .manager
            .leftover(&shared.claimer, PoolConfig::IDLE_HORIZON)
            .await
        {
            Ok(left) if left.running == 0 && left.soon == 0 => {
                info!(
                    waiting = %describe_leftover(&left),
                    "nothing left to run: stopping (exit_when_idle)"
                );
                true
            }
            Ok(_) => false,
            Err(e) => {
                warn!(error = %e, "counting the tasks left failed");
                false
            }
        }
    }
}

/// A claim's answer, with what it was asked with.
pub(super) struct Claimed {
    pub(super) asked_at: tokio::time::Instant,
    pub(super) skip: Vec<String>,
    pub(super) permits: Vec<OwnedSemaphorePermit>,
    pub(super) result: sqlx::Result<Vec<ClaimedTask>>,
}

/// Sends one claim for as many tasks as `permits` hold room for.
pub(super) async fn send_claim(
    shared: Arc<Shared>,
    skip: Vec<String>,
    permits: Vec<OwnedSemaphorePermit>,
) -> Claimed {
    let asked_at = tokio::time::Instant::now();
    let result = shared
        .manager
        .claim(&shared.claimer, &skip, permits.len())
        .await;
    crate::metrics::claim_round_trip(asked_at.elapsed());
    Claimed {
        asked_at,
        skip,
        permits,
        result,
    }
}

/// What an idle worker leaves behind, in words: "none", or e.g. "3 tasks
/// in paused datasets ("x"); 1 task due from 2026-…".
pub(super) fn describe_leftover(left: &store::tasks::Leftover) -> String {
    let mut parts = Vec::new();
    if left.paused > 0 {
        parts.push(format!(
            "{} task(s) in paused dataset(s) {:?} (`syncq resume` them)",
            left.paused, left.paused_datasets
        ));
    }
    if let (n @ 1.., Some(from)) = (left.later, left.later_from) {
        parts.push(format!(
            "{n} task(s) delayed or throttled, the first due at {}",
            from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        ));
    }
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join("; ")
    }
}

/// Hands back, uncounted, the tasks running in this worker's name that no
/// run here holds: a claim that committed but whose answer was lost to a
/// dropped connection, or a run given up during an outage whose release
/// could not be written then. Only the dispatcher claims, and it calls
/// this between claims, so every claim it heard of is in `held`.
pub(super) async fn release_orphans(shared: &Shared) -> sqlx::Result<usize> {
    let mut released = 0;
    for (id, runs) in store::tasks::running_as(&shared.db, &shared.worker_id).await? {
        if shared.held().contains_key(&(id, runs)) {
            continue;
        }
        let fence = Fence {
            id,
            runs,
            worker_id: &shared.worker_id,
        };
        if store::tasks::release(&shared.db, fence, None).await? {
            released += 1;
        }
    }
    Ok(released)
}

/// Shortest pause between claims woken for nothing, once three wake-ups
/// in a row found nothing to claim.
pub(super) const WAKE_FLOOR: Duration = Duration::from_millis(20);

/// Adds free room, up to `most`, to `permits`. While other tasks are
/// held, waits up to [`COALESCE`] for half of `most` to be free, so a busy
/// pool claims in batches instead of one task per freed slot. An idle pool
/// (all room free) claims at once.
pub(super) async fn gather_permits(
    room: &Arc<Semaphore>,
    permits: &mut Vec<OwnedSemaphorePermit>,
    most: usize,
) {
    let target = most.div_ceil(2);
    let deadline = tokio::time::Instant::now() + COALESCE;
    loop {
        while permits.len() < most {
            match room.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        if permits.len() >= target {
            return;
        }
        tokio::select! {
            permit = room.clone().acquire_owned() => match permit {
                Ok(p) => permits.push(p),
                Err(_) => return,
            },
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// A pool's recent pace: attempts finished per second, over windows of
/// [`Pace::WINDOW`]. It sizes the local queue: about
/// [`PoolConfig::PREFETCH_HORIZON`] of work, so a prefetched task waits
/// for a slot about that long at most, whatever the tasks' length.
pub(super) struct Pace {
    pub(super) since: std::time::Instant,
    pub(super) at: u64,
    /// Finished per second in the last whole window.
    pub(super) rate: f64,
    pub(super) last: usize,
}

impl Pace {
    const WINDOW: Duration = Duration::from_millis(100);

    pub(super) fn new() -> Self {
        Pace {
            since: std::time::Instant::now(),
            at: 0,
            rate: 0.0,
            last: 0,
        }
    }

    /// The last allowance given.
    pub(super) fn last(&self) -> usize {
        self.last
    }

    /// How many tasks to lease ahead of the free slots now, at most `most`.
    pub(super) fn allowance(
        &mut self,
        finished: &std::sync::atomic::AtomicU64,
        most: usize,
    ) -> usize {
        if most == 0 {
            return 0;
        }
        let now = finished.load(std::sync::atomic::Ordering::Relaxed);
        let elapsed = self.since.elapsed();
        let done = now.saturating_sub(self.at) as f64;
        let current = done / elapsed.max(Self::WINDOW).as_secs_f64();
        if elapsed >= Self::WINDOW {
            self.rate = done / elapsed.as_secs_f64();
            self.since = std::time::Instant::now();
            self.at = now;
        }
        let ahead = self.rate.max(current) * PoolConfig::PREFETCH_HORIZON.as_secs_f64();
        self.last = (ahead.ceil() as usize).min(most);
        self.last
    }
}
