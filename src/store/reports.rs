//! Read models: what `syncq status`, `tasks`, `show` and the metrics read.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgExecutor;

use crate::task::{TaskId, TaskStatus};

/// One row of `syncq.dataset_stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStats {
    /// The dataset its tasks go to.
    pub dataset_id: String,
    /// Tasks waiting (delayed ones included).
    pub queued: i64,
    /// Tasks held by a worker now.
    pub running: i64,
    /// Tasks finished with a result (kept until pruned).
    pub succeeded: i64,
    /// Tasks failed for good (kept until pruned).
    pub failed: i64,
    /// Tasks cancelled (kept until pruned).
    pub cancelled: i64,
    /// Seconds since the oldest ready task became ready.
    pub oldest_ready_age_secs: Option<f64>,
    /// Starts allowed per `rate_window_secs`, if rate-limited.
    pub rate_limit: Option<i32>,
    /// The rate limit's sliding window, in seconds.
    pub rate_window_secs: f64,
    /// The cap on its running tasks across the fleet, if any.
    pub max_concurrency: Option<i32>,
    /// Paused: it enqueues nothing (for a dataset: nothing of it starts).
    pub paused: bool,
    /// Until when an upstream's "rate limit exceeded" holds it back.
    pub throttled_until: Option<DateTime<Utc>>,
    /// Held back now by a throttle.
    pub throttled: bool,
    /// Its rate limit learns from 429s without Retry-After (SPEC §6).
    pub adaptive: bool,
    /// Its effective rate now, in starts per `rate_window_secs`: the
    /// configured rate unless adaptive (then lower after a 429).
    pub effective_rate: Option<f64>,
}

/// Every dataset's stats, by id.
pub async fn dataset_stats(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<DatasetStats>> {
    let rows = sqlx::query!(
        r#"
        SELECT dataset_id AS "dataset_id!", queued AS "queued!", running AS "running!",
               succeeded AS "succeeded!", failed AS "failed!", cancelled AS "cancelled!",
               extract(epoch FROM oldest_ready_age)::float8 AS oldest_ready_age_secs,
               rate_limit, extract(epoch FROM rate_window)::float8 AS "rate_window_secs!",
               max_concurrency, paused AS "paused!", throttled_until,
               coalesce(throttled_until > now(), false) AS "throttled!",
               adaptive AS "adaptive!", effective_rate
        FROM syncq.dataset_stats ORDER BY dataset_id
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| DatasetStats {
            dataset_id: r.dataset_id,
            queued: r.queued,
            running: r.running,
            succeeded: r.succeeded,
            failed: r.failed,
            cancelled: r.cancelled,
            oldest_ready_age_secs: r.oldest_ready_age_secs,
            rate_limit: r.rate_limit,
            rate_window_secs: r.rate_window_secs,
            max_concurrency: r.max_concurrency,
            paused: r.paused,
            throttled_until: r.throttled_until,
            throttled: r.throttled,
            adaptive: r.adaptive,
            effective_rate: r.effective_rate,
        })
        .collect())
}

/// A live worker process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerInfo {
    /// The worker's id (`locked_by` of the tasks it holds).
    pub worker_id: String,
    /// Its host.
    pub host: String,
    /// Its process id there.
    pub pid: i32,
    /// The kinds it has handlers for.
    pub kinds: Vec<String>,
    /// Its slots: tasks it runs at once.
    pub concurrency: i32,
    /// Tasks held by a worker now.
    pub running: i64,
    /// When it started (for a task: its current or last attempt).
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub last_heartbeat_at: DateTime<Utc>,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_secs: f64,
    /// How often it beats: it is live while its last beat is younger than
    /// two of these (and a second).
    pub heartbeat_every_secs: f64,
}

/// Workers whose heartbeat is current (`syncq.workers_live`).
pub async fn live_workers(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<WorkerInfo>> {
    let rows = sqlx::query!(
        r#"
        SELECT w.worker_id AS "worker_id!", w.host AS "host!", w.pid AS "pid!",
               w.kinds AS "kinds!", w.concurrency AS "concurrency!",
               w.started_at AS "started_at!", w.last_heartbeat_at AS "last_heartbeat_at!",
               extract(epoch FROM w.heartbeat_age)::float8 AS "age!",
               extract(epoch FROM w.heartbeat_every)::float8 AS "every!",
               (SELECT count(*) FROM syncq.tasks t
                 WHERE t.locked_by = w.worker_id AND t.status = 'running') AS "running!"
        FROM syncq.workers_live w
        ORDER BY w.host, w.pid
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| WorkerInfo {
            worker_id: r.worker_id,
            host: r.host,
            pid: r.pid,
            kinds: r.kinds,
            concurrency: r.concurrency,
            running: r.running,
            started_at: r.started_at,
            last_heartbeat_at: r.last_heartbeat_at,
            heartbeat_age_secs: r.age,
            heartbeat_every_secs: r.every,
        })
        .collect())
}

/// Kinds with queued tasks that no live worker handles.
pub async fn unhandled_kinds(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        r#"
        SELECT DISTINCT t.kind AS "kind!" FROM syncq.tasks t
        -- No holder: a task leased ahead is held by a worker of its kind
        -- (and this is a range of tasks_claim_idx, not the table).
        WHERE t.status = 'queued' AND t.locked_by IS NULL
          AND NOT EXISTS (SELECT 1 FROM syncq.workers_live w WHERE t.kind = ANY (w.kinds))
        ORDER BY 1
        "#
    )
    .fetch_all(db)
    .await
}

/// A task as `syncq tasks` and `syncq show` print it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskInfo {
    /// The task's id.
    pub id: TaskId,
    /// The dataset its tasks go to.
    pub dataset_id: String,
    /// The kind of its tasks.
    pub kind: String,
    /// Its status.
    pub status: TaskStatus,
    /// The priority of its tasks (lower runs first).
    pub priority: i16,
    /// Counted attempts so far.
    pub attempts: i32,
    /// `max_attempts` of its tasks.
    pub max_attempts: i32,
    /// Times its handler snoozed it (not attempts; see
    /// [`crate::TaskError::Snooze`]).
    pub snoozes: i32,
    /// When it may run (next).
    pub run_at: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When it started (for a task: its current or last attempt).
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished, if it did.
    pub finished_at: Option<DateTime<Utc>>,
    /// The worker holding it, while running.
    pub locked_by: Option<String>,
    /// When its holder's lease runs out, while running.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// Its deduplication key, if any.
    pub unique_key: Option<String>,
    /// A cancel was requested.
    pub cancel_requested: bool,
    /// The payload of every task it enqueues.
    pub payload: Value,
    /// The progress its handler last saved.
    pub checkpoint: Option<Value>,
    /// What its handler returned, once succeeded.
    pub result: Option<Value>,
    /// The error of its last failed attempt.
    pub last_error: Option<String>,
    /// Why a value of the row (payload, checkpoint or result) cannot be
    /// decoded here (naming the column): valid jsonb that a JSON decoder
    /// refuses, such as `{"n": 1e400}` or nesting past 128 levels. That
    /// value then holds its text, as a JSON string.
    pub unreadable: Option<String>,
}

/// A task row as read, its values as text (see [`TaskInfo::unreadable`]).
struct TaskRow {
    id: TaskId,
    dataset_id: String,
    kind: String,
    status: TaskStatus,
    priority: i16,
    attempts: i32,
    max_attempts: i32,
    snoozes: i32,
    run_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    locked_by: Option<String>,
    lease_expires_at: Option<DateTime<Utc>>,
    unique_key: Option<String>,
    cancel_requested: bool,
    payload: String,
    checkpoint: Option<String>,
    result: Option<String>,
    last_error: Option<String>,
}

/// Decodes a value read as text; one that cannot be is kept as its text,
/// and `why` names its column.
fn decode(column: &str, text: String, why: &mut Option<String>) -> Value {
    match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            if why.is_none() {
                *why = Some(format!("{column}: cannot be read: {e}"));
            }
            Value::String(text)
        }
    }
}

impl From<TaskRow> for TaskInfo {
    fn from(r: TaskRow) -> Self {
        let mut unreadable = None;
        let payload = decode("payload", r.payload, &mut unreadable);
        let checkpoint = r
            .checkpoint
            .map(|c| decode("checkpoint", c, &mut unreadable));
        let result = r.result.map(|c| decode("result", c, &mut unreadable));
        TaskInfo {
            id: r.id,
            dataset_id: r.dataset_id,
            kind: r.kind,
            status: r.status,
            priority: r.priority,
            attempts: r.attempts,
            max_attempts: r.max_attempts,
            snoozes: r.snoozes,
            run_at: r.run_at,
            created_at: r.created_at,
            started_at: r.started_at,
            finished_at: r.finished_at,
            locked_by: r.locked_by,
            lease_expires_at: r.lease_expires_at,
            unique_key: r.unique_key,
            cancel_requested: r.cancel_requested,
            payload,
            checkpoint,
            result,
            last_error: r.last_error,
            unreadable,
        }
    }
}

/// Which tasks [`tasks`] lists: each `None` matches all.
#[derive(Debug, Clone, Copy, Default)]
pub struct TaskQuery<'a> {
    /// Only this dataset's.
    pub dataset_id: Option<&'a str>,
    /// Only in this status.
    pub status: Option<&'a str>,
    /// Only of this kind.
    pub kind: Option<&'a str>,
    /// Only those whose last error contains this.
    pub error_contains: Option<&'a str>,
    /// At most this many.
    pub limit: i64,
    /// After skipping this many.
    pub offset: i64,
    /// With payload, checkpoint and result (false: null, never read).
    pub values: bool,
}

/// How many of a dataset's newest tasks (per status) a filter by kind or
/// error text looks through: such a filter has no index, so its search
/// is bounded instead (a page past it shows nothing more).
pub const FILTER_WINDOW: i64 = 10_000;

/// Tasks, newest first, by `q`. Of one dataset, bounded by the page: per
/// status a backward range of tasks_unheld_idx and one of tasks_held_idx
/// (migrations/0010), merged; a kind or
/// error filter looks through the newest [`FILTER_WINDOW`] (or the page's
/// depth, if deeper) of each status.
pub async fn tasks(db: impl PgExecutor<'_>, q: TaskQuery<'_>) -> sqlx::Result<Vec<TaskInfo>> {
    if let Some(dataset_id) = q.dataset_id {
        let rows = sqlx::query_as!(
            TaskRow,
            r#"
            WITH picked AS (
                SELECT w.id
                FROM unnest(CASE WHEN $2::text IS NULL THEN enum_range(NULL::syncq.task_status)
                                 ELSE ARRAY[$2::text::syncq.task_status] END) AS s(status)
                CROSS JOIN LATERAL (
                    (SELECT t.id, t.kind, t.last_error FROM syncq.tasks t
                     WHERE t.dataset_id = $1 AND t.status = s.status AND t.locked_by IS NULL
                     ORDER BY t.id DESC
                     LIMIT CASE WHEN $3::text IS NULL AND $4::text IS NULL THEN $5::int8 + $6::int8
                                ELSE greatest($8::int8, $5::int8 + $6::int8) END)
                    UNION ALL
                    (SELECT t.id, t.kind, t.last_error FROM syncq.tasks t
                     WHERE t.dataset_id = $1 AND t.status = s.status AND t.locked_by IS NOT NULL
                     ORDER BY t.id DESC
                     LIMIT CASE WHEN $3::text IS NULL AND $4::text IS NULL THEN $5::int8 + $6::int8
                                ELSE greatest($8::int8, $5::int8 + $6::int8) END)
                ) w
                WHERE ($3::text IS NULL OR w.kind = $3)
                  AND ($4::text IS NULL OR strpos(coalesce(w.last_error, ''), $4) > 0)
                ORDER BY w.id DESC
                LIMIT $5::int8 OFFSET $6::int8
            )
            SELECT t.id AS "id: TaskId", t.dataset_id, t.kind, t.status::text AS "status!: TaskStatus",
                   t.priority, t.attempts, t.max_attempts, t.snoozes, t.run_at, t.created_at, t.started_at,
                   t.finished_at, t.locked_by, t.lease_expires_at, t.unique_key, t.cancel_requested,
                   CASE WHEN $7::bool THEN t.payload::text ELSE 'null' END AS "payload!",
                   CASE WHEN $7::bool THEN t.checkpoint::text END AS checkpoint,
                   CASE WHEN $7::bool THEN t.result::text END AS result,
                   t.last_error
            FROM picked p
            -- By primary key, one probe per task shown.
            CROSS JOIN LATERAL (SELECT * FROM syncq.tasks t1 WHERE t1.id = p.id) t
            ORDER BY t.id DESC
            "#,
            dataset_id,
            q.status,
            q.kind,
            q.error_contains,
            q.limit,
            q.offset,
            q.values,
            FILTER_WINDOW,
        )
        .fetch_all(db)
        .await?;
        return Ok(rows.into_iter().map(TaskInfo::from).collect());
    }
    let rows = sqlx::query_as!(
        TaskRow,
        r#"
        SELECT id AS "id: TaskId", dataset_id, kind, status::text AS "status!: TaskStatus", priority, attempts,
               max_attempts, snoozes, run_at, created_at, started_at, finished_at, locked_by,
               lease_expires_at, unique_key, cancel_requested,
               -- Not read (not detoasted) unless asked for.
               -- As text, decoded per row (TaskInfo::unreadable).
               CASE WHEN $7 THEN payload::text ELSE 'null' END AS "payload!",
               CASE WHEN $7 THEN checkpoint::text END AS checkpoint,
               CASE WHEN $7 THEN result::text END AS result,
               last_error
        FROM syncq.tasks
        WHERE ($1::text IS NULL OR dataset_id = $1) AND ($2::text IS NULL OR status::text = $2)
          AND ($3::text IS NULL OR kind = $3)
          AND ($4::text IS NULL OR strpos(coalesce(last_error, ''), $4) > 0)
        ORDER BY id DESC
        LIMIT $5 OFFSET $6
        "#,
        q.dataset_id,
        q.status,
        q.kind,
        q.error_contains,
        q.limit,
        q.offset,
        q.values,
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(TaskInfo::from).collect())
}

/// One dataset as the dashboard's overview shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverviewRow {
    /// The dataset.
    pub dataset_id: String,
    /// Tasks waiting (delayed ones included).
    pub queued: i64,
    /// Tasks held by a worker now.
    pub running: i64,
    /// The cap on its running tasks across the fleet, if any.
    pub max_concurrency: Option<i32>,
    /// Seconds since the oldest ready task became ready.
    pub oldest_ready_age_secs: Option<f64>,
    /// Starts allowed per `rate_window_secs`, if rate-limited.
    pub rate_limit: Option<i32>,
    /// The rate limit's sliding window, in seconds.
    pub rate_window_secs: f64,
    /// Starts counted in the current window (rate-limited datasets).
    pub rate_used: i64,
    /// Its share of starts when datasets compete.
    pub weight: i32,
    /// Paused: nothing of it starts.
    pub paused: bool,
    /// Held back now by an upstream's throttle.
    pub throttled: bool,
}

/// How the overview's datasets are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverviewSort {
    /// By name.
    #[default]
    Name,
    /// Most queued first.
    Queued,
    /// Most running first.
    Running,
}

impl OverviewSort {
    fn as_str(self) -> &'static str {
        match self {
            OverviewSort::Name => "name",
            OverviewSort::Queued => "queued",
            OverviewSort::Running => "running",
        }
    }
}

/// One page of the overview: the datasets whose name contains `filter`
/// (case-insensitive), ordered by `sort`. Only the page's datasets are
/// counted, so its cost follows the page, not the fleet (except sorting
/// by counts, which counts every matching dataset's queued or running
/// tasks through their partial indexes). What finished in the last hour
/// is [`activity`]'s.
pub async fn overview(
    db: impl PgExecutor<'_>,
    filter: Option<&str>,
    sort: OverviewSort,
    limit: i64,
    offset: i64,
) -> sqlx::Result<Vec<OverviewRow>> {
    sqlx::query_as!(
        OverviewRow,
        r#"
        WITH known AS (
            SELECT dataset_id FROM syncq.datasets
            UNION SELECT DISTINCT dataset_id FROM syncq.ready_signals
        ),
        page AS (
            SELECT k.dataset_id,
                   CASE $2::text
                       WHEN 'queued' THEN (SELECT q.queued
                                           FROM syncq.queued_count(k.dataset_id) AS q(queued))
                       WHEN 'running' THEN (SELECT r.running
                                            FROM syncq.running_count(k.dataset_id) AS r(running))
                       ELSE 0 END AS rank
            FROM known k
            WHERE $1::text IS NULL OR strpos(lower(k.dataset_id), lower($1)) > 0
            ORDER BY 2 DESC, 1
            LIMIT $3 OFFSET $4
        )
        SELECT p.dataset_id AS "dataset_id!",
               (SELECT q.queued FROM syncq.queued_count(p.dataset_id) AS q(queued)) AS "queued!",
               (SELECT r.running FROM syncq.running_count(p.dataset_id) AS r(running)) AS "running!",
               d.max_concurrency,
               extract(epoch FROM now() - syncq.oldest_ready_at(p.dataset_id))::float8
                   AS oldest_ready_age_secs,
               d.rate_limit,
               coalesce(extract(epoch FROM d.rate_window)::float8, 1.0) AS "rate_window_secs!",
               CASE WHEN d.rate_limit IS NULL THEN 0
                    ELSE (SELECT u.used FROM syncq.rate_used(p.dataset_id, d.rate_window, now()) AS u(used))
               END AS "rate_used!",
               coalesce(d.weight, 1) AS "weight!",
               coalesce(d.paused, false) AS "paused!",
               coalesce(d.throttled_until > now(), false) AS "throttled!"
        FROM page p
        LEFT JOIN syncq.datasets d ON d.dataset_id = p.dataset_id
        ORDER BY p.rank DESC, p.dataset_id
        "#,
        filter,
        sort.as_str(),
        limit,
        offset,
    )
    .fetch_all(db)
    .await
}

/// How many datasets match the overview's `filter`.
pub async fn dataset_count(db: impl PgExecutor<'_>, filter: Option<&str>) -> sqlx::Result<i64> {
    sqlx::query_scalar!(
        r#"
        SELECT count(*) AS "n!" FROM (
            SELECT dataset_id FROM syncq.datasets
            UNION SELECT DISTINCT dataset_id FROM syncq.ready_signals
        ) k
        WHERE $1::text IS NULL OR strpos(lower(k.dataset_id), lower($1)) > 0
        "#,
        filter
    )
    .fetch_one(db)
    .await
}

/// Tasks queued and running across the fleet: ranges of tasks_claim_idx
/// (queued, no holder) and tasks_held_idx (leased ahead, running).
pub async fn queued_running(db: impl PgExecutor<'_>) -> sqlx::Result<(i64, i64)> {
    let r = sqlx::query!(
        r#"
        SELECT (SELECT count(*) FROM syncq.tasks WHERE status = 'queued' AND locked_by IS NULL)
               + (SELECT count(*) FROM syncq.tasks WHERE status = 'queued' AND locked_by IS NOT NULL)
                   AS "queued!",
               (SELECT count(*) FROM syncq.tasks WHERE status = 'running' AND locked_by IS NOT NULL)
                   AS "running!"
        "#
    )
    .fetch_one(db)
    .await?;
    Ok((r.queued, r.running))
}

/// Starts and finishes in one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Minute {
    /// The minute's start.
    pub at: DateTime<Utc>,
    /// Attempts started in it (of tasks running now or finished since).
    pub starts: i64,
    /// Tasks finished in it.
    pub finishes: i64,
}

/// Starts and finishes per minute over the last hour (60 minutes, oldest
/// first), of one dataset or all. Starts are those of tasks running now
/// or finished within the hour: an attempt retried since is not counted.
pub async fn throughput(
    db: impl PgExecutor<'_>,
    dataset_id: Option<&str>,
) -> sqlx::Result<Vec<Minute>> {
    let rows = sqlx::query!(
        r#"
        WITH recent AS MATERIALIZED (
            SELECT t.started_at, t.finished_at FROM syncq.tasks t
            WHERE ((t.status IN ('succeeded', 'failed', 'cancelled')
                    AND t.finished_at > now() - interval '1 hour')
                   -- Running tasks have a holder: tasks_held_idx.
                   OR (t.status = 'running' AND t.locked_by IS NOT NULL))
              AND ($1::text IS NULL OR t.dataset_id = $1)
        ),
        starts AS (
            SELECT date_trunc('minute', started_at) AS m, count(*) AS n FROM recent
            WHERE started_at > now() - interval '1 hour' GROUP BY 1
        ),
        finishes AS (
            SELECT date_trunc('minute', finished_at) AS m, count(*) AS n FROM recent
            WHERE finished_at IS NOT NULL GROUP BY 1
        )
        SELECT g.m AS "at!", coalesce(s.n, 0) AS "starts!", coalesce(f.n, 0) AS "finishes!"
        FROM generate_series(date_trunc('minute', now()) - interval '59 minutes',
                             date_trunc('minute', now()), interval '1 minute') AS g(m)
        LEFT JOIN starts s ON s.m = g.m
        LEFT JOIN finishes f ON f.m = g.m
        ORDER BY g.m
        "#,
        dataset_id
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Minute {
            at: r.at,
            starts: r.starts,
            finishes: r.finishes,
        })
        .collect())
}

/// What finished in the last hour, fleet-wide: per dataset, and per
/// minute (with the starts).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Activity {
    /// Starts and finishes per minute, oldest first (60 minutes).
    pub minutes: Vec<Minute>,
    /// Per dataset with something finished: (dataset, succeeded, failed).
    pub datasets: Vec<(String, i64, i64)>,
}

/// [`Activity`], from one pass over the hour's finished tasks (and the
/// running ones, for their starts).
pub async fn activity(db: impl PgExecutor<'_>) -> sqlx::Result<Activity> {
    let rows = sqlx::query!(
        r#"
        WITH recent AS MATERIALIZED (
            SELECT t.dataset_id, t.status, t.started_at, t.finished_at FROM syncq.tasks t
            WHERE t.status IN ('succeeded', 'failed', 'cancelled')
              AND t.finished_at > now() - interval '1 hour'
            UNION ALL
            SELECT t.dataset_id, t.status, t.started_at, NULL FROM syncq.tasks t
            WHERE t.status = 'running' AND t.locked_by IS NOT NULL
        ),
        starts AS (
            SELECT date_trunc('minute', started_at) AS m, count(*) AS n FROM recent
            WHERE started_at > now() - interval '1 hour' GROUP BY 1
        ),
        finishes AS (
            SELECT date_trunc('minute', finished_at) AS m, count(*) AS n FROM recent
            WHERE finished_at IS NOT NULL GROUP BY 1
        )
        SELECT NULL::text AS dataset_id, g.m AS at, coalesce(s.n, 0) AS "a!", coalesce(f.n, 0) AS "b!"
        FROM generate_series(date_trunc('minute', now()) - interval '59 minutes',
                             date_trunc('minute', now()), interval '1 minute') AS g(m)
        LEFT JOIN starts s ON s.m = g.m
        LEFT JOIN finishes f ON f.m = g.m
        UNION ALL
        SELECT dataset_id, NULL, count(*) FILTER (WHERE status = 'succeeded'),
               count(*) FILTER (WHERE status = 'failed')
        FROM recent WHERE finished_at IS NOT NULL
        GROUP BY dataset_id
        "#
    )
    .fetch_all(db)
    .await?;
    let mut activity = Activity::default();
    for r in rows {
        match (r.dataset_id, r.at) {
            (Some(dataset), _) => activity.datasets.push((dataset, r.a, r.b)),
            (None, Some(at)) => activity.minutes.push(Minute {
                at,
                starts: r.a,
                finishes: r.b,
            }),
            (None, None) => {}
        }
    }
    activity.minutes.sort_by_key(|m| m.at);
    Ok(activity)
}

/// A dataset's failed attempts of the last day, grouped by error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorGroup {
    /// The error (its first 300 characters).
    pub error: String,
    /// Attempts that failed with it.
    pub attempts: i64,
    /// Tasks that failed with it.
    pub tasks: i64,
    /// The last time.
    pub last_at: DateTime<Utc>,
    /// One task that failed with it, the latest.
    pub example: TaskId,
}

/// How many of a dataset's newest tasks per status [`failures_by_error`]
/// looks at.
pub const FAILURES_WINDOW: i64 = 1_000;

/// The errors of a dataset's attempts in the last day, most frequent
/// first: of its newest [`FAILURES_WINDOW`] tasks of each status that
/// have an error (bounded: a dataset's whole history is not read).
pub async fn failures_by_error(
    db: impl PgExecutor<'_>,
    dataset_id: &str,
) -> sqlx::Result<Vec<ErrorGroup>> {
    sqlx::query_as!(
        ErrorGroup,
        r#"
        WITH recent AS MATERIALIZED (
            SELECT w.id
            FROM unnest(enum_range(NULL::syncq.task_status)) AS s(status)
            CROSS JOIN LATERAL (
                (SELECT t.id, t.last_error FROM syncq.tasks t
                 WHERE t.dataset_id = $1 AND t.status = s.status AND t.locked_by IS NULL
                 ORDER BY t.id DESC LIMIT $2)
                UNION ALL
                (SELECT t.id, t.last_error FROM syncq.tasks t
                 WHERE t.dataset_id = $1 AND t.status = s.status AND t.locked_by IS NOT NULL
                 ORDER BY t.id DESC LIMIT $2)
            ) w
            WHERE w.last_error IS NOT NULL
        )
        SELECT left(e.error, 300) AS "error!", count(*) AS "attempts!",
               count(DISTINCT e.task_id) AS "tasks!", max(e.at) AS "last_at!",
               max(e.task_id) AS "example!: TaskId"
        FROM recent r
        -- One range of task_errors_task_idx per task, its latest 100 (the
        -- LIMIT also keeps this a probe per task, not a hash of the table).
        CROSS JOIN LATERAL (SELECT * FROM syncq.task_errors e1
                            WHERE e1.task_id = r.id AND e1.at > now() - interval '1 day'
                            ORDER BY e1.id DESC LIMIT 100) e
        GROUP BY 1
        ORDER BY 2 DESC, 4 DESC
        LIMIT 20
        "#,
        dataset_id,
        FAILURES_WINDOW,
    )
    .fetch_all(db)
    .await
}

/// One attempt's error.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptError {
    /// Which attempt.
    pub attempt: i32,
    /// The worker's id (`locked_by` of the tasks it holds).
    pub worker_id: Option<String>,
    /// The error, as stored.
    pub error: String,
    /// When (database clock).
    pub at: DateTime<Utc>,
}

/// A task's error history, oldest first.
pub async fn errors(db: impl PgExecutor<'_>, id: TaskId) -> sqlx::Result<Vec<AttemptError>> {
    sqlx::query_as!(
        AttemptError,
        "SELECT attempt, worker_id, error, at FROM syncq.task_errors WHERE task_id = $1 ORDER BY id",
        id.0
    )
    .fetch_all(db)
    .await
}

/// One page of a task's error history, newest first, and how many errors
/// it has in all (one range of task_errors_task_idx each).
pub async fn errors_page(
    db: &crate::db::Db,
    id: TaskId,
    limit: i64,
    offset: i64,
) -> sqlx::Result<(Vec<AttemptError>, i64)> {
    let page = sqlx::query_as!(
        AttemptError,
        "SELECT attempt, worker_id, error, at FROM syncq.task_errors WHERE task_id = $1
         ORDER BY id DESC LIMIT $2 OFFSET $3",
        id.0,
        limit,
        offset
    )
    .fetch_all(db)
    .await?;
    let total = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM syncq.task_errors WHERE task_id = $1"#,
        id.0
    )
    .fetch_one(db)
    .await?;
    Ok((page, total))
}

/// One task by id.
pub async fn task(db: impl PgExecutor<'_>, id: TaskId) -> sqlx::Result<Option<TaskInfo>> {
    let row = sqlx::query_as!(
        TaskRow,
        r#"
        SELECT id AS "id: TaskId", dataset_id, kind, status::text AS "status!: TaskStatus", priority, attempts, max_attempts,
               snoozes, run_at, created_at, started_at, finished_at, locked_by, lease_expires_at,
               unique_key, cancel_requested, payload::text AS "payload!", checkpoint::text AS checkpoint,
               result::text AS result, last_error
        FROM syncq.tasks WHERE id = $1
        "#,
        id.0
    )
    .fetch_optional(db)
    .await?;
    Ok(row.map(TaskInfo::from))
}

/// `(id, payload, priority, unique_key)` of the queued tasks of `kind` in
/// `dataset`, oldest first (for `syncq::testing`).
pub async fn queued_of_kind(
    db: impl PgExecutor<'_>,
    dataset: &str,
    kind: &str,
) -> sqlx::Result<Vec<(TaskId, Value, i16, Option<String>)>> {
    let rows = sqlx::query!(
        r#"
        SELECT id, payload, priority, unique_key FROM syncq.tasks
        WHERE dataset_id = $1 AND kind = $2 AND status = 'queued'
          -- Both halves (held or not), each a range of its index.
          AND (locked_by IS NULL OR locked_by IS NOT NULL)
        ORDER BY id
        "#,
        dataset,
        kind
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (TaskId(r.id), r.payload, r.priority, r.unique_key))
        .collect())
}

/// Per dataset with queued or running tasks: `(dataset, queued, running,
/// age in seconds of its oldest ready task)`, for the metrics sampler.
pub async fn queue_depths(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i64, i64, f64)>> {
    let rows = sqlx::query!(
        r#"
        SELECT dataset_id AS "dataset_id!",
               count(*) FILTER (WHERE status = 'queued') AS "queued!",
               count(*) FILTER (WHERE status = 'running') AS "running!",
               coalesce(extract(epoch FROM now() - min(run_at) FILTER (
                   WHERE status = 'queued' AND run_at <= now())), 0)::float8 AS "oldest_ready_age!"
        -- The live tasks: queued without a holder (tasks_claim_idx) and
        -- held (tasks_held_idx), never the finished rows.
        FROM syncq.tasks
        WHERE (status = 'queued' AND locked_by IS NULL)
           OR (locked_by IS NOT NULL AND status IN ('queued', 'running'))
        GROUP BY dataset_id
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.dataset_id, r.queued, r.running, r.oldest_ready_age))
        .collect())
}

/// The effective rates of adaptive limits now: `(true for a shared
/// limit, name, effective rate)`, for the metrics sampler. Few rows: only
/// adaptive ones.
pub async fn adaptive_rates(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(bool, String, f64)>> {
    let rows = sqlx::query!(
        r#"
        SELECT false AS "shared!", d.dataset_id AS "name!",
               syncq.effective_rate(d.rate_limit, d.rate_window, d.adapted_from, d.adapted_at, now())
                   AS "rate!"
        FROM syncq.datasets d WHERE d.adaptive AND d.rate_limit IS NOT NULL
        UNION ALL
        SELECT DISTINCT true, s.limit_id, s.effective_rate
        FROM syncq.limit_stats s WHERE s.adaptive AND s.effective_rate IS NOT NULL
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.shared, r.name, r.rate))
        .collect())
}

/// Registered workers whose heartbeat stopped (killed, or cut off from the
/// database): `(host, pid, seconds since their last beat)`. Their rows go
/// when they exit cleanly; their tasks come back when their leases expire.
pub async fn stale_workers(db: impl PgExecutor<'_>) -> sqlx::Result<Vec<(String, i32, f64)>> {
    let rows = sqlx::query!(
        r#"
        SELECT w.host, w.pid, extract(epoch FROM now() - w.last_heartbeat_at)::float8 AS "age!"
        FROM syncq.workers w
        WHERE NOT EXISTS (SELECT 1 FROM syncq.workers_live l WHERE l.worker_id = w.worker_id)
        ORDER BY 3
        "#
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.host, r.pid, r.age)).collect())
}
