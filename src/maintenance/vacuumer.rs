//! The vacuumer: `VACUUM (ANALYZE)` of syncq's tables once enough of their
//! rows are dead, by one process at a time (an advisory lock).
//!
//! Every claim and completion leaves a dead row version in `syncq.tasks`,
//! every turn one in `syncq.datasets`. Autovacuum reclaims them when it is
//! on — but it wakes once a minute per database (`autovacuum_naptime`) and
//! some servers run with it off, and then a busy queue's tables and
//! indexes grow without bound and the claim slows down scanning dead
//! entries. The pruner deletes finished tasks; this reclaims their space.

use sqlx::ConnectOptions;
use sqlx::postgres::PgConnectOptions;

use crate::db::{Db, Pooler};

use crate::store;

/// Vacuums a table once its dead rows pass `threshold + scale × live`.
#[derive(Debug, Clone)]
pub struct Vacuumer {
    /// Dead rows always tolerated.
    pub threshold: i64,
    /// Dead rows tolerated per live row.
    pub scale: f64,
}

impl Default for Vacuumer {
    fn default() -> Self {
        Vacuumer {
            threshold: 2_000,
            scale: 0.2,
        }
    }
}

impl Vacuumer {
    /// One sweep: returns the tables vacuumed (none when another process
    /// holds the vacuum lock or nothing is due). The lock and `VACUUM`
    /// need a session: `direct` if given, else a connection of `db` — and
    /// nothing is done when `db` goes through a transaction-mode pooler
    /// and no direct connection was given.
    pub async fn run_once(
        &self,
        db: &Db,
        direct: Option<&PgConnectOptions>,
    ) -> sqlx::Result<Vec<String>> {
        if direct.is_none() && db.pooler() == Pooler::Transaction {
            return Ok(Vec::new());
        }
        let due: Vec<String> = store::vacuum::churn(db)
            .await?
            .into_iter()
            .filter(|(_, dead, live)| {
                *dead as f64 > self.threshold as f64 + self.scale * *live as f64
            })
            .map(|(table, _, _)| table)
            .collect();
        if due.is_empty() {
            return Ok(due);
        }
        // Detached from the pool: if this future is dropped mid-sweep the
        // connection closes and the session's advisory lock goes with it,
        // instead of going back to the pool still held.
        let mut conn = match direct {
            Some(options) => options.connect().await?,
            None => db.pool().acquire().await?.detach(),
        };
        if !store::vacuum::try_vacuum_lock(&mut conn).await? {
            let _ = sqlx::Connection::close(conn).await;
            return Ok(Vec::new());
        }
        let mut result = Ok(());
        for table in &due {
            result = store::vacuum::vacuum(&mut conn, table).await;
            if result.is_err() {
                break;
            }
            tracing::debug!(table = %table, "vacuumed");
        }
        let _ = store::vacuum::vacuum_unlock(&mut conn).await;
        let _ = sqlx::Connection::close(conn).await;
        result.map(|()| due)
    }
}
