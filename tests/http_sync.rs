//! `examples/http_sync.rs` against a local HTTP API that enforces a rate
//! limit, answers 503 and 429 now and then, and 404 for an unknown
//! resource: every page is fetched successfully exactly once, the API's
//! limit is never exceeded, and each upstream answer has its outcome.

mod common;

#[allow(dead_code)]
#[path = "../examples/http_sync.rs"]
mod http_sync;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{NewTask, PoolConfig, TaskQueueManager, WorkerPool};

/// Requests the API allows per second (sliding).
const LIMIT: usize = 8;
const PAGES: u64 = 6;

#[derive(Default)]
struct Api {
    /// When each request arrived.
    arrivals: VecDeque<Instant>,
    /// The most requests seen in any one-second window.
    busiest_second: usize,
    /// Requests answered 429 because the limit was reached.
    over_limit: usize,
    /// 200s served per (resource, cursor).
    served: HashMap<(String, u64), usize>,
    /// Requests per (resource, cursor), any answer.
    asked: HashMap<(String, u64), usize>,
}

#[derive(serde::Deserialize)]
struct Cursor {
    cursor: u64,
}

async fn page(
    State(api): State<Arc<Mutex<Api>>>,
    Path(resource): Path<String>,
    Query(Cursor { cursor }): Query<Cursor>,
) -> Response {
    let mut api = api.lock().unwrap();
    let now = Instant::now();
    while api
        .arrivals
        .front()
        .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
    {
        api.arrivals.pop_front();
    }
    if api.arrivals.len() >= LIMIT {
        api.over_limit += 1;
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "1")]).into_response();
    }
    api.arrivals.push_back(now);
    api.busiest_second = api.busiest_second.max(api.arrivals.len());
    let key = (resource.clone(), cursor);
    let asked = {
        let n = api.asked.entry(key.clone()).or_default();
        *n += 1;
        *n
    };
    if resource == "missing" {
        return StatusCode::NOT_FOUND.into_response();
    }
    // A flaky upstream: the first request for page 2 of every resource
    // fails; the first for page 4 of "comments" says "slow down".
    if cursor == 2 && asked == 1 {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    if resource == "comments" && cursor == 4 && asked == 1 {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("1"));
        return (StatusCode::TOO_MANY_REQUESTS, headers).into_response();
    }
    *api.served.entry(key).or_default() += 1;
    let items: Vec<_> = (0..10).map(|i| json!({ "id": cursor * 10 + i })).collect();
    let next = (cursor + 1 < PAGES).then_some(cursor + 1);
    axum::Json(json!({ "items": items, "next": next })).into_response()
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn every_page_once_within_the_limit_and_each_answer_mapped(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let api = Arc::new(Mutex::new(Api::default()));
    let app = axum::Router::new()
        .route("/resources/{resource}", axum::routing::get(page))
        .with_state(api.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    // The API token's budget, a little under the API's own limit (which
    // counts arrivals, milliseconds after the grants), shared by every
    // request of every task in both pools: starts and permits.
    manager
        .set_limit(
            "api-token",
            &[syncq::RateLimit::new(LIMIT as u32 - 2, Duration::from_secs(1)).unwrap()],
        )
        .await
        .unwrap();
    manager
        .queue("api")
        .use_limits(&["api-token".to_string()])
        .await
        .unwrap();
    let mut ids = HashMap::new();
    for resource in ["issues", "comments", "labels", "missing"] {
        let id = manager
            .enqueue(NewTask::new("api", "http_sync").payload(json!({ "resource": resource })))
            .await
            .unwrap();
        ids.insert(resource, id);
    }
    // Two pools, as two hosts: the cap and the throttle hold across both.
    let mut running = Vec::new();
    for _ in 0..2 {
        let pool = WorkerPool::builder(db.clone())
            .register("http_sync", http_sync::HttpSync::new(base.clone()).unwrap())
            .config(PoolConfig {
                concurrency: 4,
                ..common::fast_config()
            })
            .build()
            .unwrap();
        running.push(common::spawn(pool));
    }
    common::wait_for("every sync finished", Duration::from_secs(60), || {
        let db = db.clone();
        async move { common::count(&db, "status IN ('queued', 'running')").await == 0 }
    })
    .await;
    for (handle, run) in running {
        handle.checkpoint();
        run.await.unwrap().unwrap();
    }

    let (served, busiest_second, over_limit) = {
        let api = api.lock().unwrap();
        (api.served.clone(), api.busiest_second, api.over_limit)
    };
    for resource in ["issues", "comments", "labels"] {
        for cursor in 0..PAGES {
            assert_eq!(
                served.get(&(resource.to_string(), cursor)).copied(),
                Some(1),
                "{resource} page {cursor} was not fetched exactly once"
            );
        }
        let (status, result) = final_row(&db, ids[resource].into()).await;
        assert_eq!(status, "succeeded", "{resource}");
        assert_eq!(
            result,
            json!({ "resource": resource, "pages": PAGES, "items": PAGES * 10 })
        );
    }
    assert!(
        busiest_second <= LIMIT,
        "{busiest_second} requests in one second"
    );
    assert_eq!(over_limit, 0, "the API's own limit was hit");

    // 404: failed at once, not retried.
    let missing = common::task(&db, ids["missing"]).await;
    assert_eq!((missing.status.as_str(), missing.attempts), ("failed", 1));
    // 503: retried (one counted failure); 429: throttled, not counted.
    let comments = common::task(&db, ids["comments"]).await;
    assert_eq!(
        comments.attempts, 2,
        "one 503 retry; the 429 is not counted"
    );
    let errors: Vec<String> =
        sqlx::query_scalar("SELECT error FROM syncq.task_errors WHERE task_id = $1 ORDER BY id")
            .bind(ids["comments"])
            .fetch_all(&db)
            .await
            .unwrap();
    assert!(errors[0].contains("503"), "{errors:?}");
    assert!(errors[1].starts_with("rate limited"), "{errors:?}");
}

async fn final_row(db: &sqlx::PgPool, id: i64) -> (String, serde_json::Value) {
    let row = common::task(db, id).await;
    (row.status, row.result.unwrap_or_default())
}
