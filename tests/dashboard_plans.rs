//! The dashboard stays quick on a big fleet (issue 25, finding 9): with
//! 1,000,000 finished tasks beside a small dataset, no page's query reads
//! `tasks` or `task_errors` by a sequential scan, nor more rows than the
//! page shows. Every statement a page runs is explained by PostgreSQL
//! itself (auto_explain with ANALYZE, sent to the dashboard's connections
//! as notices, which sqlx hands to tracing), so the plans checked are the
//! ones the pages ran — not copies of their SQL.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use syncq::dashboard::{DashboardOptions, router};
use tracing::field::{Field, Visit};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;

/// Collects the notices sqlx receives (auto_explain's plans).
#[derive(Clone, Default)]
struct Notices(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> Layer<S> for Notices {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() != "sqlx::postgres::notice" {
            return;
        }
        struct Message(String);
        impl Visit for Message {
            fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
            fn record_str(&mut self, field: &Field, value: &str) {
                if field.name() == "message" {
                    self.0 = value.to_string();
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        if let Ok(mut all) = self.0.lock() {
            all.push(m.0);
        }
    }
}

impl Notices {
    fn take(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// The most rows any plan node reading `table` went through: the rows it
/// returned and those its filter removed, over all its loops.
fn rows_read(plan: &str, table: &str) -> u64 {
    let number = |line: &str, key: &str| -> Option<u64> {
        let rest = line.split(key).nth(1)?;
        rest.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .ok()
    };
    let mut most = 0;
    // (rows, loops) of the node being read, if it reads `table`.
    let mut node: Option<(u64, u64)> = None;
    for line in plan.lines() {
        if line.contains("actual ") {
            if let Some((rows, loops)) = node {
                most = most.max(rows * loops);
            }
            node = (line.contains(&format!(" on {table} "))
                || line.ends_with(&format!(" on {table}")))
            .then(|| Some((number(line, "rows=")?, number(line, "loops=")?)))
            .flatten();
            // "actual rows=" is the second rows= on the line.
            if let Some((_, loops)) = node {
                let actual = line
                    .split("actual ")
                    .nth(1)
                    .and_then(|a| number(a, "rows="));
                node = actual.map(|rows| (rows, loops));
            }
        } else if let (Some((rows, loops)), Some(removed)) =
            (node, number(line, "Rows Removed by Filter: "))
        {
            node = Some((rows + removed, loops));
        }
    }
    if let Some((rows, loops)) = node {
        most = most.max(rows * loops);
    }
    most
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn no_page_scans_a_million_tasks(_: PgPoolOptions, opts: PgConnectOptions) {
    let notices = Notices::default();
    let subscriber = tracing_subscriber::registry().with(notices.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let db = common::connect(&opts).await;
    sqlx::raw_sql(
        "INSERT INTO syncq.datasets (dataset_id) VALUES ('big'), ('small');
         INSERT INTO syncq.tasks (dataset_id, kind, status, attempts, created_at, started_at, finished_at, last_error)
         SELECT 'big', 'fetch', CASE WHEN i % 1000 = 0 THEN 'failed' ELSE 'succeeded' END::syncq.task_status, 1,
                now() - interval '2 days', now() - interval '2 days', now() - interval '2 days',
                CASE WHEN i % 1000 = 0 THEN 'upstream 500' END
         FROM generate_series(1, 1000000) i;
         INSERT INTO syncq.task_errors (task_id, attempt, error)
         SELECT id, 1, 'upstream 500' FROM syncq.tasks WHERE status = 'failed';
         INSERT INTO syncq.tasks (dataset_id, kind) SELECT 'big', 'fetch' FROM generate_series(1, 100);
         INSERT INTO syncq.tasks (dataset_id, kind) VALUES ('small', 'fetch');
         ANALYZE syncq.tasks; ANALYZE syncq.task_errors; ANALYZE syncq.datasets;",
    )
    .execute(&db)
    .await
    .unwrap();
    let small: i64 = sqlx::query_scalar("SELECT id FROM syncq.tasks WHERE dataset_id = 'small'")
        .fetch_one(&db)
        .await
        .unwrap();
    let failed: i64 = sqlx::query_scalar("SELECT max(id) FROM syncq.tasks WHERE status = 'failed'")
        .fetch_one(&db)
        .await
        .unwrap();
    // Every statement of the dashboard's connections is explained, with
    // what it read, as a notice to that connection.
    let explained = opts.clone().options([
        ("session_preload_libraries", "auto_explain"),
        ("auto_explain.log_min_duration", "0"),
        ("auto_explain.log_analyze", "on"),
        ("auto_explain.log_timing", "off"),
        ("auto_explain.log_nested_statements", "on"),
        ("auto_explain.log_level", "notice"),
    ]);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(explained)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = router(pool, DashboardOptions::default());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    // Each page, and the most a plan of it may read of tasks or
    // task_errors: the counts of the overview (100 queued here), a page
    // of 50, the failures grouped (the newest 1,000 tasks per status).
    let pages = [
        ("/".to_string(), 1_000),
        ("/?sort=queued".into(), 1_000),
        ("/?q=sma".into(), 1_000),
        ("/datasets/small".into(), 5_500),
        ("/datasets/small?status=failed".into(), 5_500),
        ("/datasets/small?kind=fetch&error=zzz".into(), 5_500),
        ("/datasets/big".into(), 5_500),
        ("/datasets/big?status=failed&page=3".into(), 5_500),
        ("/datasets/big?status=succeeded".into(), 5_500),
        // A filter with no index looks through the newest 10,000 of each
        // of the five statuses.
        ("/datasets/big?error=zzz".into(), 50_000),
        (format!("/tasks/{small}"), 10),
        (format!("/tasks/{failed}"), 10),
        ("/workers".into(), 10),
        ("/schedules".into(), 10),
    ];
    // The first overview computes the last hour's activity in the
    // background; wait for its plans before looking at the others.
    let _ = client.get(format!("http://{addr}/")).send().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    notices.take();
    let mut faults = Vec::new();
    for (page, most) in &pages {
        let answer = client
            .get(format!("http://{addr}{page}"))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), reqwest::StatusCode::OK, "{page}");
        let plans = notices.take();
        assert!(!plans.is_empty(), "{page}: no plan was explained");
        for plan in &plans {
            for table in ["tasks", "task_errors"] {
                if plan.contains(&format!("Seq Scan on {table} ")) {
                    faults.push(format!("{page}: a sequential scan of {table}:\n{plan}"));
                }
                let read = rows_read(plan, table);
                if read > *most {
                    faults.push(format!(
                        "{page}: read {read} rows of {table} (at most {most}):\n{plan}"
                    ));
                }
            }
        }
    }
    assert!(faults.is_empty(), "{}", faults.join("\n\n"));
}
