//! The demo's workload: five datasets, their limits, their tasks, and a
//! schedule ticking every two seconds.

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;

use crate::cli::CliError;
use crate::{NewTask, RateLimit, Schedule, TaskQueueManager, Timing};

/// Creates the demo's datasets and tasks; returns how many tasks.
pub(super) async fn setup(db: &PgPool, scale: f64) -> Result<usize, CliError> {
    let n = |base: usize| ((base as f64 * scale).round() as usize).max(1);
    let manager = TaskQueueManager::new(db.clone());
    let limits: [(&str, Option<RateLimit>, Option<u32>); 5] = [
        ("demo-github", Some(RateLimit::per_second(10)?), Some(5)),
        ("demo-jira", Some(RateLimit::per_second(6)?), Some(3)),
        ("demo-stripe", Some(RateLimit::per_second(10)?), None),
        ("demo-archive", None, Some(2)),
        ("demo-crm", None, Some(4)),
    ];
    for (dataset, rate, cap) in limits {
        let queue = manager.queue(dataset);
        queue.set_rate_limit(rate).await?;
        queue.set_max_concurrency(cap).await?;
    }
    let mut tasks = Vec::new();
    for i in 0..n(80) {
        tasks.push(
            NewTask::new("demo-github", "sleep")
                .payload(json!({ "ms": 50 + (i * 37) % 150, "page": i + 1 })),
        );
    }
    for i in 0..n(24) {
        tasks.push(
            NewTask::new("demo-jira", "fail")
                .payload(json!({ "error": "retryable", "times": 2, "issue": i + 1 })),
        );
    }
    for i in 0..n(45) {
        tasks.push(
            NewTask::new("demo-stripe", "sleep").payload(json!({ "ms": 80, "charge": i + 1 })),
        );
    }
    for i in 0..n(3) {
        tasks.push(NewTask::new("demo-stripe", "fail").payload(json!({
            "error": "rate_limited", "times": 1, "retry_after_ms": 2000, "burst": i + 1
        })));
    }
    for i in 0..n(2) {
        tasks.push(
            NewTask::new("demo-archive", "count")
                .payload(json!({ "to": 80, "step_ms": 100, "export": i + 1 })),
        );
    }
    for i in 0..n(30) {
        tasks.push(NewTask::new("demo-crm", "noop").payload(json!({ "contact": i + 1 })));
    }
    for i in 0..n(4) {
        tasks.push(
            NewTask::new("demo-crm", "fail")
                .payload(json!({ "error": "invalid", "contact": format!("bad-{}", i + 1) })),
        );
    }
    let total = tasks.len();
    manager.enqueue_many(tasks).await?;
    // A periodic sync: one task every 2 s, enqueued by whichever pool's
    // scheduler takes the tick; removed when the rest is done.
    manager
        .schedule(
            Schedule::new(
                SCHEDULE,
                "demo-cron",
                "noop",
                Timing::Every(Duration::from_secs(2)),
            )
            .payload(json!({ "sync": "periodic" })),
        )
        .await?;
    Ok(total)
}

/// The demo's schedule (and its dataset, `demo-cron`).
pub(super) const SCHEDULE: &str = "demo-cron-every-2s";
