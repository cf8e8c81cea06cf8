//! `Db`: how syncq reaches PostgreSQL — directly, or through a
//! transaction-mode connection pooler (PgBouncer `pool_mode = transaction`,
//! RDS Proxy and the like).
//!
//! A transaction-mode pooler hands each *transaction* to whichever server
//! connection is free, so nothing may outlive one: not a named prepared
//! statement (sqlx prepares and caches one per statement text and
//! connection, and the next transaction may run on a server that has
//! never seen it — or has another client's statement of the same name),
//! not a `LISTEN`, not a session advisory lock. sqlx also parses a
//! statement and binds its arguments in two exchanges, each ended by a
//! `Sync`, and a pooler may switch servers between them unless a
//! transaction is open.
//!
//! So, told [`Pooler::Transaction`], every statement syncq runs through a
//! [`Db`] goes in its own transaction (or the one the caller opened) and
//! uses the unnamed prepared statement, which lives only until the next
//! parse on that server connection. It costs two extra round trips a
//! statement (`BEGIN`, `COMMIT`); direct connections keep sqlx's cached
//! statements. Session work — `LISTEN`, the vacuum lock, migrations —
//! needs a direct connection: see `WorkerPoolBuilder::direct`.
//!
//! ```no_run
//! # async fn example() -> syncq::Result<()> {
//! use syncq::{Db, Pooler, TaskQueueManager, NewTask};
//!
//! // PgBouncer at :6432, in transaction mode.
//! let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1:6432/app").await?;
//! let db = Db::new(pool).with_pooler(Pooler::Transaction);
//! TaskQueueManager::new(db).enqueue(NewTask::new("github", "sync")).await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::str::FromStr;

use futures_core::future::BoxFuture;
use futures_core::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use sqlx::postgres::{PgQueryResult, PgRow, PgStatement, PgTypeInfo};
use sqlx::{Describe, Either, Execute, Executor, PgConnection, PgPool, Postgres, SqlStr};

/// What stands between syncq and PostgreSQL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Pooler {
    /// Direct connections, or a session-mode pooler: statements are
    /// prepared once per connection and cached.
    #[default]
    None,
    /// A transaction-mode pooler: one transaction per statement, no named
    /// prepared statements, no session state.
    Transaction,
}

impl Pooler {
    /// The name used by `SYNCQ_POOLER` and `--pooler`.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooler::None => "none",
            Pooler::Transaction => "transaction",
        }
    }
}

impl fmt::Display for Pooler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Pooler {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "direct" | "session" => Ok(Pooler::None),
            "transaction" => Ok(Pooler::Transaction),
            other => Err(format!(
                "unknown pooler {other:?}: expected `none` (direct or session-mode) or `transaction`"
            )),
        }
    }
}

/// A connection pool and how its connections reach PostgreSQL. Every
/// syncq entry point takes one; a plain `PgPool` converts into a direct one.
///
/// `&Db` is an sqlx [`Executor`]: through a transaction-mode pooler each
/// statement runs in a transaction of its own, with an unnamed statement.
#[derive(Clone)]
pub struct Db {
    pool: PgPool,
    pooler: Pooler,
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("pooler", &self.pooler)
            .finish_non_exhaustive()
    }
}

impl From<PgPool> for Db {
    fn from(pool: PgPool) -> Self {
        Db::new(pool)
    }
}

impl From<&PgPool> for Db {
    fn from(pool: &PgPool) -> Self {
        Db::new(pool.clone())
    }
}

impl Db {
    /// Direct connections (the default).
    pub fn new(pool: PgPool) -> Self {
        Db {
            pool,
            pooler: Pooler::None,
        }
    }

    /// Says what the pool's connections go through.
    pub fn with_pooler(mut self, pooler: Pooler) -> Self {
        self.pooler = pooler;
        self
    }

    /// What the pool's connections go through.
    pub fn pooler(&self) -> Pooler {
        self.pooler
    }

    /// The sqlx connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn persistent(&self) -> bool {
        self.pooler == Pooler::None
    }

    /// Opens a transaction whose statements follow this `Db`'s pooler rule.
    pub async fn begin(&self) -> sqlx::Result<Tx> {
        Ok(Tx {
            tx: self.pool.begin().await?,
            persistent: self.persistent(),
        })
    }
}

/// A transaction opened by [`Db::begin`].
pub struct Tx {
    tx: sqlx::Transaction<'static, Postgres>,
    persistent: bool,
}

impl fmt::Debug for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

impl Tx {
    /// The executor for this transaction's statements.
    pub fn ex(&mut self) -> Ex<'_> {
        Ex {
            conn: &mut self.tx,
            persistent: self.persistent,
        }
    }

    /// The raw connection, for what the executor cannot do (`COPY`).
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Commits.
    pub async fn commit(self) -> sqlx::Result<()> {
        self.tx.commit().await
    }

    /// Rolls back.
    pub async fn rollback(self) -> sqlx::Result<()> {
        self.tx.rollback().await
    }
}

/// An executor on one connection that prepares statements by the pooler
/// rule: cached when direct, unnamed behind a transaction-mode pooler.
#[derive(Debug)]
pub struct Ex<'c> {
    conn: &'c mut PgConnection,
    persistent: bool,
}

/// A statement with its caching overridden.
struct Prepared<E> {
    inner: E,
    persistent: bool,
}

impl<'q, E: Execute<'q, Postgres>> Execute<'q, Postgres> for Prepared<E> {
    fn sql(self) -> SqlStr {
        self.inner.sql()
    }

    fn statement(&self) -> Option<&PgStatement> {
        self.inner.statement()
    }

    fn take_arguments(
        &mut self,
    ) -> Result<Option<sqlx::postgres::PgArguments>, sqlx::error::BoxDynError> {
        self.inner.take_arguments()
    }

    fn persistent(&self) -> bool {
        self.persistent && self.inner.persistent()
    }
}

type Item = Either<PgQueryResult, PgRow>;

impl<'c> Executor<'c> for Ex<'c> {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, sqlx::Result<Item>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let persistent = self.persistent;
        self.conn.fetch_many(Prepared {
            inner: query,
            persistent,
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, sqlx::Result<Option<PgRow>>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        let persistent = self.persistent;
        self.conn.fetch_optional(Prepared {
            inner: query,
            persistent,
        })
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, sqlx::Result<PgStatement>>
    where
        'c: 'e,
    {
        self.conn.prepare_with(sql, parameters)
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, sqlx::Result<Describe<Postgres>>>
    where
        'c: 'e,
    {
        self.conn.describe(sql)
    }
}

impl<'c> Executor<'c> for &'c Db {
    type Database = Postgres;

    fn fetch_many<'e, 'q: 'e, E>(self, query: E) -> BoxStream<'e, sqlx::Result<Item>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        match self.pooler {
            Pooler::None => self.pool.fetch_many(query),
            // The rows are collected before the commit, so a failed commit
            // (a deferred constraint, a lost connection) is the stream's
            // error, not a success the caller already saw.
            Pooler::Transaction => {
                let db = self.clone();
                futures_util::stream::once(async move {
                    let mut tx = db.begin().await?;
                    let items: Vec<Item> = tx.ex().fetch_many(query).try_collect().await?;
                    tx.commit().await?;
                    Ok::<_, sqlx::Error>(futures_util::stream::iter(items.into_iter().map(Ok)))
                })
                .try_flatten()
                .boxed()
            }
        }
    }

    fn fetch_optional<'e, 'q: 'e, E>(self, query: E) -> BoxFuture<'e, sqlx::Result<Option<PgRow>>>
    where
        'c: 'e,
        E: 'q + Execute<'q, Postgres>,
    {
        match self.pooler {
            Pooler::None => self.pool.fetch_optional(query),
            Pooler::Transaction => {
                let db = self.clone();
                Box::pin(async move {
                    let mut tx = db.begin().await?;
                    let row = tx.ex().fetch_optional(query).await?;
                    tx.commit().await?;
                    Ok(row)
                })
            }
        }
    }

    fn prepare_with<'e>(
        self,
        sql: SqlStr,
        parameters: &'e [PgTypeInfo],
    ) -> BoxFuture<'e, sqlx::Result<PgStatement>>
    where
        'c: 'e,
    {
        self.pool.prepare_with(sql, parameters)
    }

    fn describe<'e>(self, sql: SqlStr) -> BoxFuture<'e, sqlx::Result<Describe<Postgres>>>
    where
        'c: 'e,
    {
        self.pool.describe(sql)
    }
}

/// Whether trying the same statement again may work: the connection or the
/// server failed, not the statement (SQLSTATE classes 08 connection
/// exception, 53 insufficient resources, 57P0x shutdown and start-up,
/// 58 system error, 55000 "database is not currently accepting
/// connections", and serialization failures and deadlocks).
pub(crate) fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d.code().is_some_and(|code| {
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code.starts_with("58")
                || code == "55000"
                || code == "40001"
                || code == "40P01"
        }),
        _ => false,
    }
}

/// Logs database failures once per outage, not once per try: the first
/// failure of a connection kind says the database is unreachable, the
/// next success says for how long. Other failures are logged each time.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    since: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl Outage {
    /// A statement failed doing `what`.
    pub(crate) fn failed(&self, what: &str, e: &sqlx::Error) {
        if !is_transient(e) {
            tracing::warn!(error = %e, "{what} failed");
            return;
        }
        let mut since = self
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if since.is_none() {
            *since = Some(tokio::time::Instant::now());
            tracing::warn!(error = %e, "database unreachable ({what} failed): retrying with backoff until it is back");
        } else {
            tracing::debug!(error = %e, "{what} failed: database still unreachable");
        }
    }

    /// A statement succeeded.
    pub(crate) fn ok(&self) {
        let ended = self
            .since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(since) = ended {
            tracing::info!(after = ?since.elapsed(), "database reachable again");
        }
    }

    /// Whether the last statement failed for want of a database.
    pub(crate) fn is_down(&self) -> bool {
        self.since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }
}

/// Where syncq looks when `DATABASE_URL` is not set: the local server's
/// `syncq` database (created on first use by the commands that need it).
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/syncq";
