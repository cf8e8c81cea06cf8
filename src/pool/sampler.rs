//! Per-dataset queue gauges sampled from SQL for the metrics.

use crate::store;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Shared;

/// Samples per-dataset queue gauges from SQL for the metrics.
pub(super) async fn sample_loop(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    let mut seen: HashSet<String> = HashSet::new();
    loop {
        match store::reports::queue_depths(&shared.db).await {
            Ok(rows) => {
                let now: HashSet<String> = rows.iter().map(|r| r.0.clone()).collect();
                for (dataset, queued, running, age) in &rows {
                    crate::metrics::queue_sample(dataset, *queued, *running, *age);
                }
                // A dataset that emptied reads 0, not its last value.
                for gone in seen.difference(&now) {
                    crate::metrics::queue_sample(gone, 0, 0, 0.0);
                }
                seen = now;
            }
            Err(e) => warn!(error = %e, "sampling queue depths failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
