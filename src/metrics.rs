//! The metrics a pool records, through the [`metrics`] facade: nothing is
//! recorded unless the application installs a recorder (`syncq worker
//! --metrics-addr` installs a Prometheus exporter). Names and labels live
//! here, in one place.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `syncq_tasks_started_total` | counter | dataset, kind |
//! | `syncq_tasks_succeeded_total` | counter | dataset, kind |
//! | `syncq_tasks_failed_total` | counter | dataset, kind |
//! | `syncq_tasks_retried_total` | counter | dataset, kind |
//! | `syncq_tasks_cancelled_total` | counter | dataset, kind |
//! | `syncq_tasks_released_total` | counter | dataset, kind |
//! | `syncq_throttles_total` | counter | dataset, kind |
//! | `syncq_task_duration_seconds` | histogram | dataset, kind |
//! | `syncq_claim_duration_seconds` | histogram | |
//! | `syncq_queue_depth` | gauge (sampled from SQL) | dataset |
//! | `syncq_running_tasks` | gauge (sampled from SQL) | dataset |
//! | `syncq_oldest_ready_age_seconds` | gauge (sampled from SQL) | dataset |
//!
//! Labels carry dataset names, for the first [`DATASET_SERIES`] datasets
//! a process records (sampled queues first, by depth); every later one is
//! counted under `dataset="(other)"`, so a fleet of thousands of datasets
//! serves a bounded page (3,000 datasets of one task each once made every
//! scrape 69,074 lines). Names are cut to 200 characters.

use std::collections::HashSet;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::outcome::OutcomeKind;
use crate::task::ClaimedTask;

/// Histogram buckets (seconds) for task durations.
pub const TASK_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Histogram buckets (seconds) for claim round trips.
pub const CLAIM_DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// The most datasets with series of their own in one process.
pub const DATASET_SERIES: usize = 100;

/// The label of the datasets past [`DATASET_SERIES`].
pub const OTHER_DATASETS: &str = "(other)";

/// The datasets given series of their own so far.
static LABELLED: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(|| Mutex::new(HashSet::new()));

/// The `dataset` label for `dataset`: itself while there is room for its
/// series, else [`OTHER_DATASETS`].
fn dataset_label(dataset: &str) -> String {
    let name: String = dataset.chars().take(200).collect();
    let mut labelled = LABELLED.lock().unwrap_or_else(PoisonError::into_inner);
    if labelled.contains(&name) {
        return name;
    }
    if labelled.len() < DATASET_SERIES {
        labelled.insert(name.clone());
        return name;
    }
    OTHER_DATASETS.to_string()
}

/// Whether `dataset` has series of its own (it is labelled, or there is
/// room for it).
pub(crate) fn has_own_series(dataset: &str) -> bool {
    dataset_label(dataset) != OTHER_DATASETS
}

pub(crate) fn task_started(task: &ClaimedTask) {
    counter!("syncq_tasks_started_total", "dataset" => dataset_label(&task.dataset_id), "kind" => task.kind.clone())
        .increment(1);
}

pub(crate) fn task_finished(task: &ClaimedTask, outcome: OutcomeKind, took: Duration) {
    let labels = [
        ("dataset", dataset_label(&task.dataset_id)),
        ("kind", task.kind.clone()),
    ];
    histogram!("syncq_task_duration_seconds", &labels).record(took.as_secs_f64());
    let name = match outcome {
        OutcomeKind::Succeeded => "syncq_tasks_succeeded_total",
        OutcomeKind::Retried => "syncq_tasks_retried_total",
        OutcomeKind::Failed => "syncq_tasks_failed_total",
        OutcomeKind::Throttled => "syncq_throttles_total",
        OutcomeKind::Snoozed => "syncq_tasks_snoozed_total",
        OutcomeKind::Cancelled => "syncq_tasks_cancelled_total",
        OutcomeKind::Released => "syncq_tasks_released_total",
        OutcomeKind::LeaseLost => return,
    };
    counter!(name, &labels).increment(1);
}

pub(crate) fn claim_round_trip(took: Duration) {
    histogram!("syncq_claim_duration_seconds").record(took.as_secs_f64());
}

/// Sets the sampled gauges of one dataset (its own, or the sums of the
/// datasets past [`DATASET_SERIES`] under [`OTHER_DATASETS`]: the caller
/// adds those up).
/// An adaptive limit's effective rate now (SPEC §6): of a dataset's own
/// rate limit, or of a shared limit.
pub(crate) fn effective_rate_sample(shared: bool, name: &str, rate: f64) {
    if shared {
        gauge!("syncq_limit_effective_rate", "limit" => name.to_string()).set(rate);
    } else {
        gauge!("syncq_effective_rate", "dataset" => dataset_label(name)).set(rate);
    }
}

pub(crate) fn queue_sample(dataset: &str, queued: i64, running: i64, oldest_ready_age: f64) {
    let dataset = dataset.to_string();
    gauge!("syncq_queue_depth", "dataset" => dataset.clone()).set(queued as f64);
    gauge!("syncq_running_tasks", "dataset" => dataset.clone()).set(running as f64);
    gauge!("syncq_oldest_ready_age_seconds", "dataset" => dataset).set(oldest_ready_age);
}
