//! A real integration: a `SyncWorker` that pages through a rate-limited
//! HTTP API with reqwest.
//!
//! Each task syncs one resource, page by page. After every page it saves
//! the next cursor as its checkpoint, so a retry, a throttle or a restart
//! resumes at the page it stopped at — no page is fetched twice. Upstream
//! answers map to syncq's outcomes:
//!
//! | upstream | `TaskError` | the task |
//! |---|---|---|
//! | 429 + `Retry-After` | `RateLimited` | the whole dataset (and its shared limits) pause that long, in every process; not counted |
//! | 429 without it | `RateLimited` | an adaptive limit lowers its rate (else the pool's default pause); not counted |
//! | other 4xx | `Invalid` | failed at once |
//! | 5xx, timeout, connection error | `Retryable` | retried with backoff |
//!
//! The upstream counts requests, so the handler takes a permit (SPEC §3)
//! before each request after its first: its start paid for the first.
//! Every dataset synced with the same credential uses one shared limit
//! (`syncq limits set api-token --rate 5/1s`, `syncq limit D --uses
//! api-token`), so the credential's budget holds across every dataset and
//! every process — set it a little under the upstream's own limit, which
//! counts arrivals a few milliseconds after syncq grants them. If the
//! upstream still says 429, every dataset using the limit waits out its
//! `Retry-After`.
//!
//! Run it against your API:
//!
//! ```sh
//! API_BASE=http://127.0.0.1:8080 cargo run --example http_sync
//! ```
//!
//! It enqueues a sync of `issues` and `comments` into dataset `http-demo`
//! and works until Ctrl-C. Its test (`tests/http_sync.rs`) runs it against
//! a local server that enforces a rate limit and sometimes fails.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use syncq::{SyncTask, SyncWorker, TaskError, TaskResult, async_trait};

/// Syncs one resource of an HTTP API, page by page.
pub struct HttpSync {
    client: reqwest::Client,
    base_url: String,
}

/// The task's payload.
#[derive(Debug, Deserialize)]
pub struct SyncRequest {
    /// The resource to page through: `GET {base}/resources/{resource}?cursor=N`.
    pub resource: String,
}

/// The progress saved after every page.
#[derive(Debug, Deserialize, serde::Serialize)]
struct Progress {
    cursor: u64,
    pages: u64,
    items: u64,
}

/// One page of the API.
#[derive(Debug, Deserialize)]
struct Page {
    items: Vec<serde_json::Value>,
    next: Option<u64>,
}

impl HttpSync {
    /// A worker for the API at `base_url`, with a per-request timeout.
    pub fn new(base_url: impl Into<String>) -> Result<Self, reqwest::Error> {
        Ok(HttpSync {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            base_url: base_url.into(),
        })
    }

    /// GETs one page, mapping the answer to a `TaskError` when it is not one.
    async fn fetch(&self, resource: &str, cursor: u64) -> Result<Page, TaskError> {
        let url = format!("{}/resources/{resource}?cursor={cursor}", self.base_url);
        let response = self
            .client
            .get(&url)
            .send()
            .await
            // Timeouts and connection errors: the upstream may be back soon.
            .map_err(|e| TaskError::Retryable(format!("GET {url}: {e}")))?;
        let status = response.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            // Seconds or an HTTP date; without one, an adaptive limit
            // slows down instead.
            return Err(TaskError::too_many_requests(
                response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()),
            ));
        }
        if status.is_client_error() {
            return Err(TaskError::Invalid(format!("GET {url}: {status}")));
        }
        if !status.is_success() {
            return Err(TaskError::Retryable(format!("GET {url}: {status}")));
        }
        response
            .json::<Page>()
            .await
            .map_err(|e| TaskError::Retryable(format!("GET {url}: bad body: {e}")))
    }
}

#[async_trait]
impl SyncWorker for HttpSync {
    async fn handle(&self, task: &mut SyncTask) -> TaskResult {
        let request: SyncRequest = task.payload_as()?;
        let mut progress = task.checkpoint_as::<Progress>()?.unwrap_or(Progress {
            cursor: 0,
            pages: 0,
            items: 0,
        });
        // This run's first request is paid for by its start.
        let mut first = true;
        loop {
            if !first {
                // Budget for the next request, from every limit the
                // dataset uses; hears checkpoint and cancel meanwhile.
                task.permit().await?;
            }
            first = false;
            let page = self.fetch(&request.resource, progress.cursor).await?;
            progress.pages += 1;
            progress.items += page.items.len() as u64;
            // … write `page.items` to your store here, idempotently …
            match page.next {
                Some(next) => {
                    progress.cursor = next;
                    // Saved before the next request: a retry starts there.
                    task.save_checkpoint(&progress).await?;
                }
                None => {
                    return Ok(
                        json!({ "resource": request.resource, "pages": progress.pages, "items": progress.items }),
                    );
                }
            }
            if let Some(stop) = task.stop_requested() {
                return Err(stop.into());
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("syncq=info"))
        .init();
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/syncq".into());
    let api = std::env::var("API_BASE").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let db = sqlx::PgPool::connect(&url).await?;
    syncq::migrate(&db).await?;
    let manager = syncq::TaskQueueManager::new(db.clone());
    // One credential, one budget: 5 requests a second for every dataset
    // synced with it, in every process.
    manager
        .set_limit(
            "api-token",
            &[syncq::RateLimit::new(5, Duration::from_secs(1))?],
        )
        .await?;
    manager
        .queue("http-demo")
        .use_limits(&["api-token".to_string()])
        .await?;
    for resource in ["issues", "comments"] {
        manager
            .enqueue(
                syncq::NewTask::new("http-demo", "http_sync")
                    .payload(json!({ "resource": resource }))
                    .unique_key(resource),
            )
            .await?;
    }
    syncq::WorkerPool::builder(db)
        .register("http_sync", HttpSync::new(api)?)
        .build()?
        .run_with_signals()
        .await?;
    Ok(())
}
