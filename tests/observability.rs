//! A real `syncq worker` process with `--metrics-addr` and
//! `--log-format json`: the Prometheus endpoint is scraped over HTTP and
//! its numbers move as tasks run; every log line of a task carries the
//! task span's fields.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
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

#[sqlx::test]
async fn metrics_are_served_and_move_and_logs_are_json(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    manager
        .enqueue_many((0..3).map(|_| NewTask::new("shop", "noop")))
        .await
        .unwrap();
    manager
        .enqueue(NewTask::new("shop", "fail").payload(json!({ "error": "retryable", "times": 1 })))
        .await
        .unwrap();
    manager
        .enqueue(NewTask::new("shop", "fail").payload(json!({ "error": "invalid" })))
        .await
        .unwrap();
    manager
        .enqueue(
            NewTask::new("shop", "fail")
                .payload(json!({ "error": "rate_limited", "times": 1, "retry_after_ms": 200 })),
        )
        .await
        .unwrap();
    // Queued in a paused dataset: a queue depth that stays.
    manager.queue("held").pause().await.unwrap();
    manager
        .enqueue_many((0..4).map(|_| NewTask::new("held", "noop")))
        .await
        .unwrap();

    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(&opts))
        .env("RUST_LOG", "syncq=debug")
        .args([
            "--log-format",
            "json",
            "worker",
            "--poll-interval",
            "200ms",
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a worker");

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
    assert!(at(r#"syncq_task_duration_seconds_count{dataset="shop",kind="noop"}"#) >= 3.0);
    assert!(at("syncq_claim_duration_seconds_count") >= 1.0);
    assert!(at(r#"syncq_oldest_ready_age_seconds{dataset="held"}"#) >= 0.0);

    // More work: the counters move.
    manager
        .enqueue_many((0..5).map(|_| NewTask::new("shop", "noop")))
        .await
        .unwrap();
    common::wait_for("the counter moves", WAIT, || async move {
        scrape(port).await.and_then(|p| {
            value(
                &p,
                r#"syncq_tasks_succeeded_total{dataset="shop",kind="noop"}"#,
            )
        }) == Some(8.0)
    })
    .await;

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let recorded = lines
        .iter()
        .find(|l| l["fields"]["message"] == "attempt recorded")
        .unwrap_or_else(|| panic!("no 'attempt recorded' line in:\n{stderr}"));
    for field in ["task_id", "dataset", "kind", "attempt"] {
        assert!(
            !recorded["span"][field].is_null(),
            "{field} missing: {recorded}"
        );
    }
}
