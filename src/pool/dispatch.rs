//! The dispatcher: claims through the [`TaskQueueManager`](crate::TaskQueueManager)
//! as slots free, a local queue of tasks leased ahead, and a starter that
//! starts them in claim order.

use crate::config::PoolConfig;
use crate::control::Command;
use crate::lease::Lease;
use crate::manager::set_aside::{self, SetAside};
use crate::store;
use crate::store::tasks::Fence;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::VecDeque;
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
                slots,
                result: Ok(tasks),
                ..
            }) => local.take(tasks, permits, slots, asked_at),
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
    /// Registers claimed tasks as held and queues them, in claim order:
    /// those the claim started with the slots it was sent for, the others
    /// leased ahead.
    pub(super) fn take(
        &self,
        tasks: Vec<store::tasks::Claimed>,
        permits: Vec<OwnedSemaphorePermit>,
        slots: Vec<OwnedSemaphorePermit>,
        asked_at: tokio::time::Instant,
    ) {
        let shared = self.shared;
        let mut slots = slots.into_iter();
        let now = tokio::time::Instant::now();
        for (claimed, room) in tasks.into_iter().zip(permits) {
            let store::tasks::Claimed {
                task,
                started,
                unreadable,
            } = claimed;
            // A claim served it: whatever held its tasks back has passed.
            shared.given_back().remove(&task.dataset_id);
            // Leased ahead or started, the same lease, renewed by the
            // heartbeat: no other worker takes it while this one lives.
            let lease = Lease::new(asked_at, shared.config.lease);
            let older = shared.held().claimed(
                (task.id, task.runs),
                Held {
                    lease: lease.clone(),
                    superseded: false,
                    finishing: false,
                    cancel_heard: false,
                    started,
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
            // A started task has its slot; the claim started no more tasks
            // than it was sent with slots for.
            let slot = if started { slots.next() } else { None };
            if slot.is_none() {
                shared
                    .leased_waiting
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            // The starter outlives the claim loop: a send cannot fail.
            let _ = self.queue.send(Waiting {
                task,
                lease,
                room,
                slot,
                leased_at: now,
                unreadable,
            });
        }
    }

    /// Nothing held here: no task running, waiting or being recorded.
    pub(super) fn is_empty(&self) -> bool {
        self.room.available_permits()
            == self.shared.config.concurrency + self.shared.config.prefetch
    }
}

/// The starter: runs each task its claim started at once (it came with
/// its slot), and starts the local queue's tasks in claim order as slots
/// free: each handler begins at once, its start written by the completer
/// (with its end if it ends soon). A task that waits longer than
/// [`PoolConfig::AHEAD_WAIT`] is given back to the fleet, as are those
/// heard cancelled and those of a dataset heard paused, throttled or
/// limited (`Shared::given_back`). Once the pool stops, starts nothing
/// more: what waits is given back, unstarted and uncounted.
pub(super) async fn start_loop(
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    mut queued: mpsc::UnboundedReceiver<Waiting>,
    running: TaskTracker,
    hard_stop: CancellationToken,
) {
    let mut waiting: VecDeque<Waiting> = VecDeque::new();
    let mut open = true;
    let run = |w: Waiting, slot: OwnedSemaphorePermit, leased: bool| {
        running.spawn(run_task(
            shared.clone(),
            w,
            Some(slot),
            leased,
            hard_stop.clone(),
        ));
    };
    // Given back off the starter's path: its round trip holds no start up.
    let back = |tasks: Vec<Waiting>| {
        if !tasks.is_empty() {
            left_queue(&shared, tasks.len());
            running.spawn(give_back(shared.clone(), tasks));
        }
    };
    loop {
        if shared.shutdown.is_cancelled() {
            break;
        }
        if waiting.is_empty() {
            if !open {
                break;
            }
            tokio::select! {
                biased;
                _ = shared.shutdown.cancelled() => break,
                next = queued.recv() => match next {
                    Some(mut w) => match w.slot.take() {
                        Some(slot) => run(w, slot, false),
                        None => waiting.push_back(w),
                    },
                    None => open = false,
                },
            }
            continue;
        }
        let overdue_at = waiting
            .front()
            .map_or_else(tokio::time::Instant::now, |w| w.leased_at)
            + PoolConfig::AHEAD_WAIT;
        tokio::select! {
            biased;
            _ = shared.shutdown.cancelled() => break,
            _ = shared.held_back.notified() => {
                back(take_held_back(&shared, &mut waiting));
            }
            next = queued.recv(), if open => match next {
                Some(mut w) => match w.slot.take() {
                    Some(slot) => run(w, slot, false),
                    None => waiting.push_back(w),
                },
                None => open = false,
            },
            slot = slots.clone().acquire_owned() => {
                let Ok(slot) = slot else { break };
                // Heard meanwhile: what must not start goes back first.
                let mut out = take_held_back(&shared, &mut waiting);
                let Some(w) = waiting.pop_front() else {
                    back(out);
                    continue;
                };
                let key = (w.task.id, w.task.runs);
                if shared.held().get(&key).is_none_or(|h| h.cancel_heard) {
                    drop(slot);
                    out.push(w);
                    back(out);
                    continue;
                }
                back(out);
                left_queue(&shared, 1);
                run(w, slot, true);
            }
            _ = tokio::time::sleep_until(overdue_at) => {
                let now = tokio::time::Instant::now();
                let overdue = waiting
                    .iter()
                    .take_while(|w| w.leased_at + PoolConfig::AHEAD_WAIT <= now)
                    .count();
                let tasks: Vec<Waiting> = waiting.drain(..overdue).collect();
                debug!(tasks = tasks.len(), "leased ahead and still waiting for a slot: giving them back");
                back(tasks);
            }
        }
    }
    // Stopping (or the dispatcher is done): what waits is given back
    // unstarted; what claims still in flight started goes to runs that
    // hand it back (the attempt not counted), and what they leased ahead
    // is given back, until the dispatcher has heard every claim (it then
    // closes the queue).
    back(waiting.drain(..).collect());
    while open && let Some(mut w) = queued.recv().await {
        match w.slot.take() {
            Some(slot) => run(w, slot, false),
            None => back(vec![w]),
        }
    }
}

/// Takes out of the local queue the tasks of datasets heard paused,
/// throttled or limited ("" in `given_back`: of every dataset).
fn take_held_back(shared: &Shared, waiting: &mut VecDeque<Waiting>) -> Vec<Waiting> {
    let (all, datasets) = {
        let mut given_back = shared.given_back();
        if given_back.is_empty() {
            return Vec::new();
        }
        (given_back.remove(""), given_back.clone())
    };
    let (out, keep): (Vec<Waiting>, Vec<Waiting>) = waiting
        .drain(..)
        .partition(|w| all || datasets.contains(&w.task.dataset_id));
    waiting.extend(keep);
    out
}

/// Gives back leased-ahead `tasks` that will not start here (one
/// statement, syncq.give_back); if that fails, their lease ahead runs out
/// on its own soon.
async fn give_back(shared: Arc<Shared>, tasks: Vec<Waiting>) {
    if tasks.is_empty() {
        return;
    }
    let ids: Vec<_> = tasks.iter().map(|w| w.task.id).collect();
    let runs: Vec<i32> = tasks.iter().map(|w| w.task.runs).collect();
    match store::tasks::give_back(&shared.db, &shared.worker_id, &ids, &runs).await {
        Ok(n) => debug!(given_back = n, "tasks leased ahead given back unstarted"),
        Err(e) => {
            warn!(error = %e, tasks = ids.len(), "giving back tasks leased ahead failed; their lease ahead runs out on its own")
        }
    }
    for w in tasks {
        not_started(&shared, w);
    }
}

/// `n` tasks leased ahead left the local queue (started or given back).
fn left_queue(shared: &Shared, n: usize) {
    shared
        .leased_waiting
        .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
}

/// A task leased ahead leaves this pool unstarted: no longer held, its
/// room free for the next claim.
fn not_started(shared: &Arc<Shared>, w: Waiting) {
    shared.held().finished((w.task.id, w.task.runs));
    shared.emit(Event::NotStarted { task_id: w.task.id });
    drop(w.room);
    shared.wake.notify_one();
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
            // The local queue was full with a claim in flight: look again
            // once a slot frees (or soon), not in a busy loop.
            _ = local.shared.slot_freed.notified(), if state.full => {
                state.full = false;
                Step::Go
            }
            _ = local.shared.wake.notified(), if state.full => {
                state.full = false;
                Step::Go
            }
            _ = tokio::time::sleep(COALESCE * 5), if state.full => {
                state.full = false;
                Step::Go
            }
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
    /// Tasks of limited datasets the last claim started (slots held for
    /// the next one: this many plus one).
    limited_started: usize,
    /// Tasks asked for by the claims in flight.
    asked_in_flight: usize,
    /// The local queue is full and a claim is in flight: no claim is sent
    /// until a slot frees, a wake-up or an answer.
    full: bool,
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
            limited_started: 0,
            asked_in_flight: 0,
            full: false,
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
            && !self.full
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
        // Waiting for a slot: the local queue and what claims in flight
        // asked for (not the tasks whose outcome is being written: they
        // hold room, not slots).
        let waiting = shared
            .leased_waiting
            .load(std::sync::atomic::Ordering::Relaxed)
            + self.asked_in_flight;
        let wanted = (slots.available_permits() + ahead).saturating_sub(waiting);
        tracing::trace!(
            ahead,
            wanted,
            free = slots.available_permits(),
            waiting,
            gathered = permits.len(),
            "claim sizing"
        );
        // While tasks wait here, top the local queue up in batches of a
        // quarter of its size at least, not a claim per few slots freed
        // (a claim's fixed cost is most of a small one's).
        let worth = (concurrency + ahead).div_ceil(4);
        let wanted = if waiting > 0 && wanted < worth {
            0
        } else {
            wanted
        };
        if wanted == 0 {
            // Every slot busy and the local queue full enough: wait for a
            // run to end (each one wakes the dispatcher), or for the claim
            // in flight.
            drop(permits);
            self.full = !in_flight.is_empty();
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
        // Free slots go with the claim for the tasks of limited datasets
        // it starts (they run in them at once; an unlimited dataset's are
        // leased ahead and started as slots free). Held only while the
        // claim is in flight, and only slots no task of the local queue is
        // waiting for — or, at least, as many as the last claim started
        // plus one, so limited datasets are served beside a busy queue.
        let free = slots.available_permits();
        let reserve = free
            .saturating_sub(waiting)
            .max((self.limited_started + 1).min(free))
            .min(permits.len());
        let mut start_slots = Vec::new();
        while start_slots.len() < reserve {
            match slots.clone().try_acquire_owned() {
                Ok(slot) => start_slots.push(slot),
                Err(_) => break,
            }
        }
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
                    drop(start_slots);
                    return self.pause_after_failure().await;
                }
            }
        }
        let skip = self.set_aside.current();
        self.asked_in_flight += permits.len();
        in_flight.push(tokio::spawn(send_claim(
            shared.clone(),
            skip,
            permits,
            start_slots,
        )));
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
            slots,
            result,
        } = match answer {
            Ok(answer) => answer,
            Err(e) => {
                // The claim's task panicked or was cancelled: whatever it
                // may have claimed is found as orphans.
                error!(error = %e, "a claim's task ended without an answer");
                self.claim_unsure = true;
                self.asked_in_flight = 0;
                return Step::Go;
            }
        };
        self.asked_in_flight = self.asked_in_flight.saturating_sub(permits.len());
        self.full = false;
        let tasks = match result {
            Ok(tasks) => {
                self.db_failures = 0;
                shared.outage.ok();
                tasks
            }
            Err(e) => {
                let asked = permits.len();
                drop(permits);
                drop(slots);
                return self.on_claim_error(e, &skip, asked).await;
            }
        };
        self.busy_claims = tasks.len() == permits.len() && tasks.len() > 1;
        self.limited_started = tasks.iter().filter(|t| t.started).count();
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
            self.local.take(tasks, permits, slots, asked_at);
            return Step::Go;
        }
        drop(permits);
        drop(slots);
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
    /// Room for each task asked for.
    pub(super) permits: Vec<OwnedSemaphorePermit>,
    /// A free slot for each task the claim may start.
    pub(super) slots: Vec<OwnedSemaphorePermit>,
    pub(super) result: sqlx::Result<Vec<store::tasks::Claimed>>,
}

/// Sends one claim for as many tasks as `permits` hold room for, starting
/// as many as `slots` are free and leasing the rest ahead.
pub(super) async fn send_claim(
    shared: Arc<Shared>,
    skip: Vec<String>,
    permits: Vec<OwnedSemaphorePermit>,
    slots: Vec<OwnedSemaphorePermit>,
) -> Claimed {
    let asked_at = tokio::time::Instant::now();
    let result = shared
        .manager
        .claim(&shared.claimer, &skip, permits.len(), slots.len())
        .await;
    crate::metrics::claim_round_trip(asked_at.elapsed());
    Claimed {
        asked_at,
        skip,
        permits,
        slots,
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
        // Rounded down: a task is leased ahead only if, at this pace, a
        // slot frees for it within the horizon (a pool of slow tasks
        // leases nothing ahead: its next task would wait a task's length).
        let ahead = self.rate.max(current) * PoolConfig::PREFETCH_HORIZON.as_secs_f64();
        self.last = (ahead.floor() as usize).min(most);
        self.last
    }
}
