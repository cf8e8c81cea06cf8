//! The built-in kinds of SPEC §5, for operators, demos, benchmarks and tests:
//! `noop`, `sleep`, `fail`, `paged`, `count`.
//!
//! Each decodes its payload with `SyncTask::payload_as`, so a malformed one
//! fails the task as invalid with a message naming the field.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::json;

use crate::control::Stop;
use crate::outcome::{TaskError, TaskResult};
use crate::sync_task::SyncTask;
use crate::worker::SyncWorker;

/// Every built-in kind with its handler.
pub fn all() -> Vec<(&'static str, Arc<dyn SyncWorker>)> {
    vec![
        ("noop", Arc::new(Noop)),
        ("sleep", Arc::new(Sleep)),
        ("fail", Arc::new(Fail)),
        ("paged", Arc::new(Paged)),
        ("count", Arc::new(Count)),
    ]
}

/// `paged` `{"pages": N, "step_ms": M}`: fetches N pretend pages of M ms
/// each, the way a sync handler pages through an API: its start pays for
/// the first page, and it takes a permit (SPEC §3) before each later one.
/// Its result is `{"pages": N, "at": [T1, …, TN]}`, each page's start in
/// Unix milliseconds (the handler's own record of its requests). On a
/// checkpoint it saves the pages done and resumes after them.
pub struct Paged;

#[derive(Deserialize)]
struct PagedPayload {
    pages: u32,
    #[serde(default)]
    step_ms: u64,
}

#[derive(Deserialize, serde::Serialize, Default)]
struct PagedCheckpoint {
    at: Vec<i64>,
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[async_trait]
impl SyncWorker for Paged {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        let payload: PagedPayload = task.payload_as()?;
        let mut done = task.checkpoint_as::<PagedCheckpoint>()?.unwrap_or_default();
        // This run's first page is paid for by its start.
        let mut first = true;
        while done.at.len() < payload.pages as usize {
            if !first {
                match task.permit().await {
                    Ok(()) => {}
                    Err(TaskError::Interrupted) => {
                        task.save_checkpoint(&done).await?;
                        return Err(TaskError::Interrupted);
                    }
                    Err(e) => return Err(e),
                }
            }
            first = false;
            done.at.push(unix_ms());
            match task.sleep(Duration::from_millis(payload.step_ms)).await {
                None => {}
                Some(Stop::Checkpoint) => {
                    task.save_checkpoint(&done).await?;
                    return Err(TaskError::Interrupted);
                }
                Some(stop) => return Err(stop.into()),
            }
        }
        Ok(json!({ "pages": payload.pages, "at": done.at }))
    }
}

/// `noop`: succeeds at once, whatever the payload.
pub struct Noop;

#[async_trait]
impl SyncWorker for Noop {
    async fn handle(&self, _task: &mut SyncTask) -> TaskResult {
        Ok(serde_json::Value::Null)
    }
}

/// `sleep` `{"ms": N}`: sleeps N ms, then succeeds. On a checkpoint it saves
/// the time left and resumes with it; on cancel it ends cancelled.
pub struct Sleep;

#[derive(Deserialize)]
struct SleepPayload {
    ms: u64,
}

#[derive(Deserialize)]
struct SleepCheckpoint {
    remaining_ms: u64,
}

#[async_trait]
impl SyncWorker for Sleep {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        let payload: SleepPayload = task.payload_as()?;
        let remaining = task
            .checkpoint_as::<SleepCheckpoint>()?
            .map_or(payload.ms, |c| c.remaining_ms.min(payload.ms));
        let started = tokio::time::Instant::now();
        match task.sleep(Duration::from_millis(remaining)).await {
            None => Ok(json!({ "slept_ms": payload.ms })),
            Some(Stop::Checkpoint) => {
                let slept = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                task.save_checkpoint(&json!({ "remaining_ms": remaining.saturating_sub(slept) }))
                    .await?;
                Err(TaskError::Interrupted)
            }
            Some(stop) => Err(stop.into()),
        }
    }
}

/// `fail` `{"error": "retryable"|"invalid"|"fatal"|"rate_limited"|"snooze",
/// "times": N, "retry_after_ms": M}`: returns that error the first N runs
/// (every run without `times`), then succeeds. Runs are counted in its
/// checkpoint, so errors that do not count an attempt stop after N too.
/// `rate_limited` without `retry_after_ms` is a 429 without Retry-After;
/// `snooze` snoozes for `retry_after_ms` (0 without it).
pub struct Fail;

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum FailWith {
    Retryable,
    Invalid,
    Fatal,
    RateLimited,
    Snooze,
}

#[derive(Deserialize)]
struct FailPayload {
    error: FailWith,
    times: Option<u32>,
    retry_after_ms: Option<u64>,
}

#[derive(Deserialize)]
struct FailCheckpoint {
    runs: u32,
}

#[async_trait]
impl SyncWorker for Fail {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        let payload: FailPayload = task.payload_as()?;
        let runs = task
            .checkpoint_as::<FailCheckpoint>()?
            .map_or(0, |c| c.runs);
        if payload.times.is_some_and(|times| runs >= times) {
            return Ok(json!({ "failed_runs": runs }));
        }
        // The count of runs that failed matters only to `times` (a
        // checkpoint is a write per attempt: none when every run fails).
        if payload.times.is_some() {
            task.save_checkpoint(&json!({ "runs": runs + 1 })).await?;
        }
        let message = match payload.times {
            Some(times) => format!("fail kind: run {} of {times} that fail", runs + 1),
            // Without a count of runs kept, the attempt's number.
            None => format!("fail kind: run {} (fails every time)", task.attempt()),
        };
        Err(match payload.error {
            FailWith::Retryable => TaskError::Retryable(message),
            FailWith::Invalid => TaskError::Invalid(message),
            FailWith::Fatal => TaskError::Fatal(message),
            FailWith::RateLimited => TaskError::RateLimited {
                retry_after: payload.retry_after_ms.map(Duration::from_millis),
            },
            FailWith::Snooze => {
                TaskError::Snooze(Duration::from_millis(payload.retry_after_ms.unwrap_or(0)))
            }
        })
    }
}

/// `count` `{"to": N, "step_ms": M}`: counts to N, one step per M ms, saving a
/// checkpoint each step and resuming from it. Result: `{"counted": N,
/// "resumed_from": K}`, K = 0 if it never resumed.
pub struct Count;

#[derive(Deserialize)]
struct CountPayload {
    to: u64,
    #[serde(default)]
    step_ms: u64,
}

#[derive(Deserialize)]
struct CountCheckpoint {
    counted: u64,
}

#[async_trait]
impl SyncWorker for Count {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        let payload: CountPayload = task.payload_as()?;
        let resumed_from = task
            .checkpoint_as::<CountCheckpoint>()?
            .map_or(0, |c| c.counted.min(payload.to));
        let mut counted = resumed_from;
        while counted < payload.to {
            if let Some(stop) = task.sleep(Duration::from_millis(payload.step_ms)).await {
                // Progress is already saved, step by step.
                return Err(stop.into());
            }
            counted += 1;
            task.save_checkpoint(&json!({ "counted": counted })).await?;
        }
        Ok(json!({ "counted": payload.to, "resumed_from": resumed_from }))
    }
}
