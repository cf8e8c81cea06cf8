//! The private, throwaway PostgreSQL: starts from the installed server
//! programs, answers, and is gone — server and directory — when dropped.

use sqlx::Connection;
use syncq::local_postgres::{LocalPostgres, find_server_bin};

#[tokio::test]
async fn a_private_cluster_answers_and_is_removed_on_drop() {
    if find_server_bin().is_none() {
        eprintln!("skipped: no PostgreSQL server programs installed");
        return;
    }
    let pg = tokio::task::spawn_blocking(LocalPostgres::start)
        .await
        .unwrap()
        .expect("start a private cluster");
    let dir = pg.dir().to_path_buf();
    let url = pg.url("postgres");
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    conn.close().await.unwrap();

    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        sqlx::PgConnection::connect(&url).await.is_err(),
        "the server still answers"
    );
}
