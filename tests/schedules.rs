//! SPEC §2 `syncq.schedules`: each tick enqueued exactly once across real
//! worker processes, whatever is killed or restarted; missed ticks
//! coalesced into one catch-up task; pause and resume; bad input refused.

mod common;

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use common::WorkerProcess;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

const OBSERVER: &str = "syncq-schedules-test";
const WAIT: Duration = Duration::from_secs(30);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A worker whose log says which process enqueued which tick.
fn worker(opts: &PgConnectOptions) -> WorkerProcess {
    WorkerProcess::start(
        &common::url(opts),
        &["--poll-interval", "100ms"],
        &[("RUST_LOG", "syncq=info,syncq::schedule=debug")],
    )
}

async fn syncq(opts: &PgConnectOptions, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_syncq"))
        .env("DATABASE_URL", common::url(opts))
        .args(args)
        .output()
        .await
        .expect("run syncq")
}

/// `syncq schedule add NAME` of a `noop` every second, on dataset `s`,
/// with `extra` options.
async fn add_every_second(opts: &PgConnectOptions, name: &str, extra: &[&str]) {
    let mut args = vec![
        "schedule",
        "add",
        name,
        "--dataset",
        "s",
        "--kind",
        "noop",
        "--every",
        "1s",
    ];
    args.extend_from_slice(extra);
    let out = syncq(opts, &args).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The ticks that have a task, in order.
async fn ticks(db: &PgPool, schedule: &str) -> Vec<DateTime<Utc>> {
    sqlx::query_scalar(
        "SELECT scheduled_for FROM syncq.tasks WHERE schedule_id = $1 ORDER BY scheduled_for",
    )
    .bind(schedule)
    .fetch_all(db)
    .await
    .unwrap()
}

/// Asserts consecutive ticks are exactly `every` apart: none lost.
fn assert_no_gap(ticks: &[DateTime<Utc>], every: TimeDelta) {
    for pair in ticks.windows(2) {
        assert_eq!(
            pair[1] - pair[0],
            every,
            "a gap or a double between ticks: {ticks:?}"
        );
    }
}

/// Waits until `schedule` has `n` ticks with a task; on a timeout, says
/// what its row and its tasks looked like.
async fn wait_ticks(db: &PgPool, schedule: &'static str, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while ticks(db, schedule).await.len() < n {
        if tokio::time::Instant::now() > deadline {
            let row: Option<String> = sqlx::query_scalar(
                "SELECT format('next_run_at %s, last_run_at %s, skipped_ticks %s, overlap %s',
                               next_run_at, last_run_at, skipped_ticks, overlap)
                 FROM syncq.schedules WHERE schedule_id = $1",
            )
            .bind(schedule)
            .fetch_optional(db)
            .await
            .unwrap();
            let tasks: Vec<(DateTime<Utc>, String, Option<String>)> = sqlx::query_as(
                "SELECT scheduled_for, status::text, locked_by FROM syncq.tasks
                 WHERE schedule_id = $1 ORDER BY scheduled_for",
            )
            .bind(schedule)
            .fetch_all(db)
            .await
            .unwrap();
            panic!(
                "timed out after {WAIT:?} waiting for {n} ticks of {schedule}:\n\
                 schedule: {row:?}\n\
                 tasks (tick, status, locked_by): {tasks:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three worker processes, a 1-second schedule, about 12 s: one task per
/// tick, consecutive ticks one second apart. Midway the process that
/// enqueued the latest tick is killed with -9: no tick is lost or doubled
/// (another process's scheduler takes the schedule's row). The schedule
/// overlaps: the killed process may hold the latest tick's task, and
/// without overlap the ticks would be skipped, by design, until that
/// task's lease runs out and it is rescued.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn three_processes_enqueue_each_tick_once_even_when_the_enqueuer_is_killed(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let _turn = SERIAL.lock().await;
    common::on_multi_thread(async move {
        let db = common::observer(&opts, OBSERVER, 2).await;
        add_every_second(&opts, "tick", &["--overlap"]).await;
        let workers: Vec<WorkerProcess> = (0..3).map(|_| worker(&opts)).collect();
        wait_ticks(&db, "tick", 5).await;
        // The enqueuer of the latest tick, by its own log.
        let latest = *ticks(&db, "tick").await.last().unwrap();
        let stamp = latest.format("%H:%M:%S").to_string();
        let enqueuer = workers
            .iter()
            .position(|w| {
                w.log()
                    .lines()
                    .any(|l| l.contains("schedule ticked") && l.contains(&stamp))
            })
            .unwrap_or(0);
        workers[enqueuer].signal("-KILL").await;
        let killed_at = *ticks(&db, "tick").await.last().unwrap();
        wait_ticks(&db, "tick", 12).await;
        let all = ticks(&db, "tick").await;
        assert_no_gap(&all, TimeDelta::seconds(1));
        assert!(
            all.iter().any(|t| *t > killed_at + TimeDelta::seconds(2)),
            "ticks went on after the kill: {all:?}"
        );
        let succeeded = common::count(&db, "schedule_id = 'tick' AND status = 'succeeded'").await;
        assert!(succeeded >= 10, "{succeeded} scheduled tasks succeeded");
        drop(workers);
    })
    .await;
}

/// Poison schedules beside a good one, three worker processes, about
/// 10 s: one whose ticks the tasks table refuses (a trigger of the
/// operator's raises, as a value no constraint foresaw would), one with a
/// payload nested 300 levels deep and one with a number past f64 (valid
/// jsonb this process cannot decode). The good 1-second schedule ticks
/// with no gap; the refused one is marked with its error, which
/// `syncq schedule list` shows; the odd payloads are copied as they are.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_poison_schedule_stops_no_other_schedule(_: PgPoolOptions, opts: PgConnectOptions) {
    let _turn = SERIAL.lock().await;
    common::on_multi_thread(async move {
        let db = common::observer(&opts, OBSERVER, 2).await;
        sqlx::raw_sql(
            r#"CREATE FUNCTION public.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'the mirror of % is gone', NEW.dataset_id; END $$;
               CREATE TRIGGER refuse BEFORE INSERT ON syncq.tasks FOR EACH ROW
                   WHEN (NEW.schedule_id = 'a-refused' AND NEW.dataset_id = 'p')
                   EXECUTE FUNCTION public.refuse();
               INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, every, payload) VALUES
                   ('a-refused', 'p', 'noop', '1 second', '{}'),
                   ('a-deep', 'p', 'noop', '1 second',
                    (repeat('[', 300) || repeat(']', 300))::jsonb),
                   ('a-huge', 'p', 'noop', '1 second', '{"n": 1e400}');"#,
        )
        .execute(&db)
        .await
        .unwrap();
        add_every_second(&opts, "tick", &["--overlap"]).await;
        let workers: Vec<WorkerProcess> = (0..3).map(|_| worker(&opts)).collect();
        wait_ticks(&db, "tick", 9).await;
        assert_no_gap(&ticks(&db, "tick").await, TimeDelta::seconds(1));
        let error: Option<String> =
            sqlx::query_scalar("SELECT error FROM syncq.schedules WHERE schedule_id = 'a-refused'")
                .fetch_one(&db)
                .await
                .unwrap();
        let error = error.expect("the refused schedule is marked with its error");
        assert!(error.contains("the mirror of p is gone"), "{error}");
        assert!(ticks(&db, "a-refused").await.is_empty());
        // The odd payloads tick, copied byte for byte.
        let copied: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM syncq.tasks t JOIN syncq.schedules s USING (schedule_id)
             WHERE s.schedule_id IN ('a-deep', 'a-huge') AND t.payload = s.payload",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert!(copied >= 2, "{copied} ticks of the odd payloads");
        let out = syncq(&opts, &["schedule", "list"]).await;
        let listed = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(listed.contains("the mirror of p is gone"), "{listed}");
        // Fixed: another dataset, and it ticks again.
        sqlx::query("UPDATE syncq.schedules SET dataset_id = 'p2' WHERE schedule_id = 'a-refused'")
            .execute(&db)
            .await
            .unwrap();
        wait_ticks(&db, "a-refused", 1).await;
        drop(workers);
    })
    .await;
}

/// Workers stopped for 5 s, then one restarted: the ticks missed in
/// between become one catch-up task (for the latest of them), then the
/// schedule ticks on as before. Pause stops the ticks; resume starts them
/// again from the next tick after now, without a catch-up.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn missed_ticks_become_one_catch_up_task_and_pause_stops_ticking(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let _turn = SERIAL.lock().await;
    common::on_multi_thread(async move {
        let db = common::observer(&opts, OBSERVER, 2).await;
        add_every_second(&opts, "beat", &[]).await;
        let mut w = worker(&opts);
        wait_ticks(&db, "beat", 2).await;
        w.signal("-TERM").await;
        assert!(w.wait_exit(WAIT).await.success());
        let before = ticks(&db, "beat").await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let _w = worker(&opts);
        wait_ticks(&db, "beat", before.len() + 3).await;
        let after = ticks(&db, "beat").await;
        let caught_up = after[before.len()];
        let gap = caught_up - *before.last().unwrap();
        assert!(
            gap >= TimeDelta::seconds(4),
            "the catch-up task is for the latest missed tick: {after:?}"
        );
        // After the catch-up, one tick per second again.
        assert_no_gap(&after[before.len()..], TimeDelta::seconds(1));

        let out = syncq(&opts, &["schedule", "pause", "beat"]).await;
        assert!(out.status.success());
        let paused_at = ticks(&db, "beat").await.len();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            ticks(&db, "beat").await.len() <= paused_at + 1,
            "ticks went on while paused"
        );
        let held = ticks(&db, "beat").await.len();
        let out = syncq(&opts, &["schedule", "resume", "beat"]).await;
        assert!(out.status.success());
        wait_ticks(&db, "beat", held + 2).await;
        let resumed = ticks(&db, "beat").await;
        assert!(
            resumed[held] - resumed[held - 1] >= TimeDelta::seconds(3),
            "no catch-up for a pause: {resumed:?}"
        );
        let list = syncq(&opts, &["schedule", "list", "--json"]).await;
        let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
        assert_eq!(list[0]["schedule_id"], "beat");
        assert!(list[0]["next_run_at"].is_string(), "{list:#}");
    })
    .await;
}

/// Issue 25, finding 5: an operator's transaction holding a schedule's row
/// for 6 s coalesces the ticks it held up into one catch-up task and
/// counts the others in skipped_ticks (before: 0); every tick is on a
/// whole second (cron ticks carried now's fraction: 23:00:00.255); and
/// resuming by SQL does what `schedule resume` does — no catch-up for the
/// pause (before, SQL's resume enqueued one).
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn a_held_row_counts_its_ticks_and_sql_resumes_as_the_cli(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    let _turn = SERIAL.lock().await;
    common::on_multi_thread(async move {
        let db = common::observer(&opts, OBSERVER, 2).await;
        add_every_second(&opts, "beat", &[]).await;
        let _w = worker(&opts);
        wait_ticks(&db, "beat", 2).await;
        let mut held = db.begin().await.unwrap();
        sqlx::query("SELECT 1 FROM syncq.schedules WHERE schedule_id = 'beat' FOR UPDATE")
            .execute(&mut *held)
            .await
            .unwrap();
        let before = ticks(&db, "beat").await.len();
        // The scenario: an operator's open transaction, 6 s.
        tokio::time::sleep(Duration::from_secs(6)).await;
        held.commit().await.unwrap();
        wait_ticks(&db, "beat", before + 2).await;
        let skipped: i64 = sqlx::query_scalar(
            "SELECT skipped_ticks FROM syncq.schedules WHERE schedule_id = 'beat'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert!(
            skipped >= 3,
            "coalesced ticks were not counted: skipped_ticks {skipped}"
        );
        let all = ticks(&db, "beat").await;
        assert!(
            all.iter().all(|t| t.timestamp_subsec_micros() == 0),
            "a tick off a whole second: {all:?}"
        );

        sqlx::query("UPDATE syncq.schedules SET paused = true WHERE schedule_id = 'beat'")
            .execute(&db)
            .await
            .unwrap();
        // Paused 3 s.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let held = ticks(&db, "beat").await.len();
        sqlx::query("UPDATE syncq.schedules SET paused = false WHERE schedule_id = 'beat'")
            .execute(&db)
            .await
            .unwrap();
        wait_ticks(&db, "beat", held + 2).await;
        let resumed = ticks(&db, "beat").await;
        assert!(
            resumed[held] - resumed[held - 1] >= TimeDelta::seconds(3),
            "SQL's resume caught up the pause: {resumed:?}"
        );
        assert_no_gap(&resumed[held..], TimeDelta::seconds(1));
    })
    .await;
}

/// Bad expressions and zones are refused, naming the field: exit 2 from
/// the CLI, a constraint or the trigger from SQL; nothing is saved.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn bad_schedules_are_refused_naming_the_field(_: PgPoolOptions, opts: PgConnectOptions) {
    let db = common::connect(&opts).await;
    for (args, field) in [
        (&["--cron", "61 * * * *"][..], "cron"),
        (&["--cron", "* * *"][..], "cron"),
        (
            &["--cron", "* * * * *", "--timezone", "Mars/Olympus"][..],
            "timezone",
        ),
        (&["--every", "0s"][..], "every"),
    ] {
        let mut all = vec!["schedule", "add", "x", "--dataset", "d", "--kind", "noop"];
        all.extend_from_slice(args);
        let out = syncq(&opts, &all).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(field), "{args:?}: {err}");
    }
    for (sql, names) in [
        (
            "INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, cron) VALUES ('x', 'd', 'k', '* *')",
            "schedules_cron_has_5_or_6_fields",
        ),
        (
            "INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, cron, every) VALUES ('x', 'd', 'k', '* * * * *', '1 minute')",
            "schedules_cron_or_every",
        ),
        (
            "INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, cron, timezone) VALUES ('x', 'd', 'k', '* * * * *', 'Mars/Olympus')",
            "timezone",
        ),
        // What PostgreSQL reads as a time zone but the scheduler does not:
        // such a schedule would never tick.
        (
            "INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, cron, timezone) VALUES ('x', 'd', 'k', '* * * * *', 'europe/berlin')",
            "timezone",
        ),
        (
            "INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, cron, timezone) VALUES ('x', 'd', 'k', '* * * * *', 'PST')",
            "timezone",
        ),
        (
            "INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, cron, timezone) VALUES ('x', 'd', 'k', '* * * * *', 'UTC+5')",
            "timezone",
        ),
        // The CLI's floor is the table's.
        (
            "INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, every) VALUES ('x', 'd', 'k', '1 microsecond')",
            "schedules_every_at_least_1_second",
        ),
        (
            "INSERT INTO syncq.schedules (schedule_id, dataset_id, kind, every) VALUES ('x', 'd', 'k', '1 month')",
            "schedules_every_without_months",
        ),
    ] {
        let err = sqlx::query(sql).execute(&db).await.unwrap_err().to_string();
        assert!(err.contains(names), "{sql}: {err}");
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM syncq.schedules")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(n, 0);
}

/// A task's id and the tick its handler saw.
type Seen = (i64, Option<DateTime<Utc>>);

/// A handler that records the tick its task was enqueued for.
#[derive(Clone, Default)]
struct TickRecorder(std::sync::Arc<std::sync::Mutex<Vec<Seen>>>);

#[syncq::async_trait]
impl syncq::SyncWorker for TickRecorder {
    async fn handle(&self, task: &mut syncq::SyncTask) -> syncq::TaskResult {
        let tick = task.scheduled_for().await?;
        self.0.lock().unwrap().push((task.id().into(), tick));
        Ok(serde_json::Value::Null)
    }
}

/// The Rust API: a declared set of schedules is reconciled with the rows
/// (added, changed, removed), and a handler reads its task's tick.
#[sqlx::test(migrator = "syncq::MIGRATOR")]
async fn declared_schedules_are_reconciled_and_handlers_see_their_tick(
    _: PgPoolOptions,
    opts: PgConnectOptions,
) {
    use syncq::{Schedule, TaskQueueManager, Timing, WorkerPool};
    let db = common::connect(&opts).await;
    let manager = TaskQueueManager::new(db.clone());
    let every = |s| Timing::Every(Duration::from_secs(s));
    let hourly = Schedule::new("hourly", "d", "rec", Timing::Cron("@hourly".into()));
    let fast = Schedule::new("fast", "d", "rec", every(1));
    assert_eq!(
        manager
            .reconcile_schedules(&[hourly.clone(), fast.clone()])
            .await
            .unwrap(),
        (2, 0)
    );
    let bad = Schedule::new("bad", "d", "rec", Timing::Cron("61 * * * *".into()));
    let err = manager
        .reconcile_schedules(&[bad])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("cron"), "{err}");
    let recorder = TickRecorder::default();
    let pool = WorkerPool::builder(db.clone())
        .register("rec", recorder.clone())
        .config(common::fast_config())
        .build()
        .unwrap();
    let (handle, run) = common::spawn(pool);
    common::wait_for("a scheduled task ran", WAIT, || {
        let recorder = recorder.clone();
        async move { !recorder.0.lock().unwrap().is_empty() }
    })
    .await;
    handle.checkpoint();
    run.await.unwrap().unwrap();
    let (id, tick) = recorder.0.lock().unwrap()[0];
    let row: (String, DateTime<Utc>) =
        sqlx::query_as("SELECT schedule_id, scheduled_for FROM syncq.tasks WHERE id = $1")
            .bind(id)
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(row.0, "fast");
    assert_eq!(tick, Some(row.1), "the handler saw its task's tick");

    // Declared again without "hourly", "fast" slower: one removed, one changed.
    let slower = Schedule::new("fast", "d", "rec", every(60));
    assert_eq!(
        manager.reconcile_schedules(&[slower]).await.unwrap(),
        (1, 1)
    );
    let rows: Vec<(String, Option<f64>)> = sqlx::query_as(
        "SELECT schedule_id, extract(epoch FROM every)::float8 FROM syncq.schedules",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(rows, vec![("fast".to_string(), Some(60.0))]);
}
