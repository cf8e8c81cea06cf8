//! A real `syncq worker` process with `--metrics-addr` and
//! `--log-format json`: the Prometheus endpoint is scraped over HTTP and
//! its numbers move as tasks run; every log line of a task carries the
//! task span's fields.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::{NewTask, TaskQueueManager};

const WAIT: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn scrape(port: u16) -> Option<String> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .ok()?;
    response.text().await.ok()
}

/// The value of one series (`name{labels}`) in a Prometheus text page.
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Seconds since the oldest ready task of `dataset` became ready, now
/// (database clock): what the oldest-ready-age gauge samples.
async fn oldest_ready_age(db: &PgPool, dataset: &str) -> f64 {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - min(run_at))::float8 FROM syncq.tasks
         WHERE dataset_id = $1 AND status = 'queued' AND run_at <= now()",
    )
    .bind(dataset)
    .fetch_one(db)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn metrics_are_served_and_move_and_logs_are_json(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    let mut shop = manager
        .enqueue_many((0..3).map(|_| NewTask::new("shop", "noop")))
        .await
        .unwrap();
    for payload in [
        json!({ "error": "retryable", "times": 1 }),
        json!({ "error": "invalid" }),
        json!({ "error": "rate_limited", "times": 1, "retry_after_ms": 200 }),
    ] {
        shop.push(
            manager
                .enqueue(NewTask::new("shop", "fail").payload(payload))
                .await
                .unwrap(),
        );
    }
    // Queued in a paused dataset: a queue depth that stays, and ready for
    // an hour, so its oldest-ready age is about an hour, not about zero.
    manager.queue("held").pause().await.unwrap();
    let an_hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    manager
        .enqueue_many((0..4).map(|_| NewTask::new("held", "noop").run_at(an_hour_ago)))
        .await
        .unwrap();

    // The age before the worker starts: its samples are taken later.
    let age_before = oldest_ready_age(&db, "held").await;
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut worker = common::WorkerProcess::start(
        &common::url(&opts),
        &[
            "--log-format",
            "json",
            "--poll-interval",
            "200ms",
            "--metrics-addr",
            &metrics_addr,
        ],
        // The worker's default level: each attempt's start and end are info.
        &[("RUST_LOG", "syncq=info")],
    );

    let page = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    common::wait_for("the shop tasks are counted", WAIT, || {
        let db = db.clone();
        let page = page.clone();
        async move {
            let done = common::count(
                &db,
                "dataset_id = 'shop' AND status IN ('succeeded', 'failed')",
            )
            .await
                == 6;
            match scrape(port).await {
                Some(p) if done => {
                    let moved = value(
                        &p,
                        r#"syncq_tasks_succeeded_total{dataset="shop",kind="noop"}"#,
                    ) == Some(3.0)
                        && value(&p, r#"syncq_queue_depth{dataset="held"}"#) == Some(4.0);
                    *page.lock().unwrap() = p;
                    moved
                }
                _ => false,
            }
        }
    })
    .await;
    // The age after the scrape: no sample can be older than this.
    let age_after = oldest_ready_age(&db, "held").await;
    let page = page.lock().unwrap().clone();
    let at =
        |series: &str| value(&page, series).unwrap_or_else(|| panic!("{series} missing:\n{page}"));
    assert_eq!(
        at(r#"syncq_tasks_started_total{dataset="shop",kind="noop"}"#),
        3.0
    );
    assert_eq!(
        at(r#"syncq_tasks_retried_total{dataset="shop",kind="fail"}"#),
        1.0
    );
    assert_eq!(
        at(r#"syncq_tasks_failed_total{dataset="shop",kind="fail"}"#),
        1.0
    );
    assert_eq!(
        at(r#"syncq_throttles_total{dataset="shop",kind="fail"}"#),
        1.0
    );
    assert_eq!(
        at(r#"syncq_tasks_succeeded_total{dataset="shop",kind="fail"}"#),
        2.0
    );
    // One duration per noop attempt: three tasks, one attempt each.
    assert_eq!(
        at(r#"syncq_task_duration_seconds_count{dataset="shop",kind="noop"}"#),
        3.0
    );
    assert!(at("syncq_claim_duration_seconds_count") >= 1.0);
    // Sampled by the worker between its start and the scrape: the held
    // tasks' age then, about an hour (1 ms of slack for rounding).
    let age = at(r#"syncq_oldest_ready_age_seconds{dataset="held"}"#);
    assert!(
        (age_before - 0.001..=age_after + 0.001).contains(&age),
        "oldest ready age {age} s, not between {age_before} and {age_after}"
    );

    // More work: the counters move.
    shop.extend(
        manager
            .enqueue_many((0..5).map(|_| NewTask::new("shop", "noop")))
            .await
            .unwrap(),
    );
    common::wait_for("the counter moves", WAIT, || async move {
        scrape(port).await.and_then(|p| {
            value(
                &p,
                r#"syncq_tasks_succeeded_total{dataset="shop",kind="noop"}"#,
            )
        }) == Some(8.0)
    })
    .await;

    worker.signal("-TERM").await;
    let status = worker.wait_exit(WAIT).await;
    let log = worker.log();
    assert!(status.success(), "the worker exited with {status}:\n{log}");
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    // Every line logged inside a task's span carries the span's fields.
    let task_lines: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["name"] == "task")
        .collect();
    for line in &task_lines {
        for field in ["task_id", "dataset", "kind", "attempt"] {
            assert!(!line["span"][field].is_null(), "{field} missing: {line}");
        }
    }
    // Among them, each shop task's start, and its end with the outcome and
    // how long the attempt took.
    let started: BTreeSet<i64> = task_lines
        .iter()
        .filter(|l| l["fields"]["message"] == "attempt started")
        .filter_map(|l| l["span"]["task_id"].as_i64())
        .collect();
    let ended: Vec<&&Value> = task_lines
        .iter()
        .filter(|l| l["fields"]["message"] == "attempt ended")
        .collect();
    for line in &ended {
        assert_eq!(line["level"], "INFO", "{line}");
        assert!(line["fields"]["outcome"].is_string(), "{line}");
        assert!(line["fields"]["millis"].is_u64(), "{line}");
    }
    let ended: BTreeSet<i64> = ended
        .iter()
        .filter(|l| l["fields"]["recorded"] == true)
        .filter_map(|l| l["span"]["task_id"].as_i64())
        .collect();
    let shop: BTreeSet<i64> = shop.into_iter().map(i64::from).collect();
    assert!(
        shop.is_subset(&started),
        "'attempt started' lines: {started:?}\n{log}"
    );
    assert!(
        shop.is_subset(&ended),
        "'attempt ended' lines: {ended:?}\n{log}"
    );
    // List fields read as plain values, not Rust debug strings.
    let started_line = lines
        .iter()
        .find(|l| l["fields"]["message"] == "worker pool started")
        .unwrap_or_else(|| panic!("no start line in:\n{log}"));
    assert_eq!(
        started_line["fields"]["kinds"], "count,fail,noop,paged,sleep",
        "{started_line}"
    );
}

/// 300 datasets of one task each: the worker's page holds series of their
/// own for at most 100 datasets, the rest counted under
/// `dataset="(other)"`, and every task is counted.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn dataset_series_are_bounded(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    sqlx::query(
        "INSERT INTO syncq.tasks (dataset_id, kind)
         SELECT 'd-' || g, 'noop' FROM generate_series(1, 300) g",
    )
    .execute(&db)
    .await
    .unwrap();
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let _worker = common::WorkerProcess::start(
        &common::url(&opts),
        &["--poll-interval", "100ms", "--metrics-addr", &metrics_addr],
        &[],
    );
    let page = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    common::wait_for("every task counted", WAIT, || {
        let page = page.clone();
        async move {
            let Some(p) = scrape(port).await else {
                return false;
            };
            let started: f64 = p
                .lines()
                .filter(|l| l.starts_with("syncq_tasks_succeeded_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            *page.lock().unwrap() = p;
            started == 300.0
        }
    })
    .await;
    let page = page.lock().unwrap().clone();
    let datasets: BTreeSet<&str> = page
        .lines()
        .filter_map(|l| l.split("dataset=\"").nth(1)?.split('"').next())
        .collect();
    assert!(datasets.contains("(other)"), "{datasets:?}");
    assert!(datasets.len() <= 101, "{} dataset labels", datasets.len());
}
