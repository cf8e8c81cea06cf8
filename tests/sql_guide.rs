//! docs/sql.md: every SQL block of the guide runs, in order, and does what
//! the guide says.

mod common;

use sqlx::PgPool;

fn blocks() -> Vec<String> {
    let guide = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/sql.md"))
        .expect("docs/sql.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in guide.lines() {
        match (&mut current, line.trim_start()) {
            (None, l) if l.starts_with("```sql") => current = Some(String::new()),
            (Some(_), l) if l.starts_with("```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn every_statement_of_the_sql_guide_runs(db: PgPool) {
    let blocks = blocks();
    assert!(blocks.len() >= 15, "found {} blocks", blocks.len());
    for block in &blocks {
        // The retry block needs a failed task to act on.
        if block.contains("syncq.retry(") {
            sqlx::query("UPDATE syncq.tasks SET status = 'failed', attempts = 5, finished_at = now() WHERE payload->>'page' = '2'")
                .execute(&db)
                .await
                .unwrap();
        }
        sqlx::raw_sql(sqlx::AssertSqlSafe(block.clone()))
            .execute(&db)
            .await
            .unwrap_or_else(|e| panic!("guide block failed: {e}\n{block}"));
    }
    // What the guide promised.
    assert_eq!(common::count(&db, "dataset_id = 'github'").await, 102);
    // The nightly task and the delayed page 101 were cancelled by the guide,
    // then queued again by its retry block: one row each, queued, cancel
    // request cleared, never started.
    for which in ["unique_key = 'nightly'", "payload->>'page' = '101'"] {
        let rows: Vec<(String, bool, i32)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT status::text, cancel_requested, runs FROM syncq.tasks WHERE {which}"
        )))
        .fetch_all(&db)
        .await
        .unwrap();
        assert_eq!(rows, vec![("queued".to_string(), false, 0)], "{which}");
    }
    let errors: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.recent_failures")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(errors, 0);
    // The unique insert is a no-op while the first one is queued.
    let unique = blocks.iter().find(|b| b.contains("'nightly')")).unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(unique.clone()))
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(common::count(&db, "unique_key = 'nightly'").await, 1);
    // The failed task was retried with its attempts kept and one more allowed.
    let retried: (String, i32, i32) = sqlx::query_as(
        "SELECT status::text, attempts, max_attempts FROM syncq.tasks WHERE payload->>'page' = '2'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(retried, ("queued".to_string(), 5, 6));
    // Limits removed, then an adaptive rate limit set; no throttle left.
    let settings: (bool, Option<i32>, Option<i32>, bool, bool) = sqlx::query_as(
        "SELECT paused, rate_limit, max_concurrency, adaptive, throttled_until IS NULL
         FROM syncq.datasets WHERE dataset_id = 'github'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(settings, (false, Some(10), None, true, true));
}
