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
            Ok(mut rows) => {
                // The deepest queues get the series of their own; the rest
                // are summed under one label (crate::metrics::DATASET_SERIES).
                rows.sort_by(|a, b| (b.1 + b.2).cmp(&(a.1 + a.2)).then_with(|| a.0.cmp(&b.0)));
                let mut now: HashSet<String> = HashSet::new();
                let mut other = (0i64, 0i64, 0f64, false);
                for (dataset, queued, running, age) in &rows {
                    if crate::metrics::has_own_series(dataset) {
                        crate::metrics::queue_sample(dataset, *queued, *running, *age);
                        now.insert(dataset.clone());
                    } else {
                        other = (other.0 + queued, other.1 + running, other.2.max(*age), true);
                    }
                }
                if other.3 {
                    crate::metrics::queue_sample(
                        crate::metrics::OTHER_DATASETS,
                        other.0,
                        other.1,
                        other.2,
                    );
                    now.insert(crate::metrics::OTHER_DATASETS.to_string());
                }
                // A dataset that emptied reads 0, not its last value.
                for gone in seen.difference(&now) {
                    crate::metrics::queue_sample(gone, 0, 0, 0.0);
                }
                seen = now;
            }
            Err(e) => warn!(error = %e, "sampling queue depths failed"),
        }
        match store::reports::adaptive_rates(&shared.db).await {
            Ok(rows) => {
                for (is_shared, name, rate) in &rows {
                    crate::metrics::effective_rate_sample(*is_shared, name, *rate);
                }
            }
            Err(e) => warn!(error = %e, "sampling adaptive rates failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
    }
}
