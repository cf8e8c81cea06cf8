-- syncq schema, the versioned part: types, tables, indexes and
-- constraints (what must be versioned, because it holds data). Every
-- function, trigger and view is in src/store/sql/, one file each, applied
-- by `syncq migrate` after the versioned migrations (src/store/objects.rs).
--
-- Every constraint is named after the column it guards, so the message a
-- producer sees ("violates check constraint tasks_max_attempts_at_least_1")
-- names what to fix.
--
-- No row anyone can write makes a claim fail. Every counter and time the
-- claim computes with is bounded by a constraint named after its column:
-- attempts within 0..=max_attempts (and below it while queued, so the
-- claim's attempts + 1 stays in range), max_attempts at most 10,000,
-- finite times. runs, the fencing token, wraps instead of overflowing.
--
-- Columns are in the order that databases migrated by earlier builds have
-- them (tests/fixtures/pre_squash_migrations, squashed_migrations): the
-- schemas must be the same.
--
-- The roles and their grants are made by `syncq roles` (src/store/roles.rs),
-- not here.

CREATE SCHEMA IF NOT EXISTS syncq;

CREATE TYPE syncq.task_status AS ENUM ('queued', 'running', 'succeeded', 'failed', 'cancelled');

-- One row per TaskQueue (dataset), with its settings (SPEC §2). Producers
-- never create datasets: a claim creates the row of a new dataset, with
-- default settings, when it absorbs the dataset's first readiness signal
-- (syncq.absorb_signals).
--
-- Storage settings for tables updated on every claim and completion
-- (datasets, tasks, rate_log, ready_signals): autovacuum early, so a long
-- drain leaves bounded sizes.
CREATE TABLE syncq.datasets (
    dataset_id      text        PRIMARY KEY
                    CONSTRAINT datasets_dataset_id_not_empty CHECK (dataset_id <> ''),
    rate_limit      int
                    CONSTRAINT datasets_rate_limit_positive CHECK (rate_limit IS NULL OR rate_limit > 0)
                    CONSTRAINT datasets_rate_limit_at_most_1000000 CHECK (rate_limit <= 1000000),
    rate_window     interval    NOT NULL DEFAULT interval '1 second'
                    CONSTRAINT datasets_rate_window_positive CHECK (rate_window > interval '0')
                    CONSTRAINT datasets_rate_window_at_most_1_day CHECK (rate_window <= interval '1 day'),
    max_concurrency int
                    CONSTRAINT datasets_max_concurrency_positive CHECK (max_concurrency IS NULL OR max_concurrency > 0)
                    CONSTRAINT datasets_max_concurrency_at_most_100000 CHECK (max_concurrency <= 100000),
    paused          boolean     NOT NULL DEFAULT false,
    throttled_until timestamptz
                    CONSTRAINT datasets_throttled_until_finite CHECK (isfinite(throttled_until)),
    -- The dataset's place in the claim's round, a virtual time (see
    -- syncq.claim): the lowest place goes first.
    last_claimed_at timestamptz
                    CONSTRAINT datasets_last_claimed_at_finite CHECK (isfinite(last_claimed_at)),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- When the dataset may next have ready work (NULL: no queued task). The
    -- claim's scan skips idle datasets through it, so a thousand idle
    -- datasets cost nothing.
    ready_at        timestamptz
                    CONSTRAINT datasets_ready_at_finite CHECK (isfinite(ready_at)),
    -- SPEC §2: a dataset's share of starts when datasets compete (§6).
    weight          int         NOT NULL DEFAULT 1
                    CONSTRAINT datasets_weight_between_1_and_1000 CHECK (weight BETWEEN 1 AND 1000),
    -- When it was last served (wall clock): among datasets at the same
    -- place in the round, the one served longest ago goes first.
    served_at       timestamptz
                    CONSTRAINT datasets_served_at_finite CHECK (isfinite(served_at))
) WITH (
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000
);

-- The claim's scan: datasets that may have ready work, in turn order.
CREATE INDEX datasets_turn_idx
    ON syncq.datasets (last_claimed_at NULLS FIRST, served_at NULLS FIRST, dataset_id)
    WHERE ready_at IS NOT NULL;

CREATE TABLE syncq.tasks (
    -- GENERATED ALWAYS: nobody can take an id the sequence will hand out
    -- later.
    id               bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dataset_id       text        NOT NULL
                     CONSTRAINT tasks_dataset_id_not_empty CHECK (dataset_id <> ''),
    kind             text        NOT NULL
                     CONSTRAINT tasks_kind_not_empty CHECK (kind <> ''),
    payload          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    status           syncq.task_status NOT NULL DEFAULT 'queued',
    priority         smallint    NOT NULL DEFAULT 0,
    run_at           timestamptz NOT NULL DEFAULT now()
                     CONSTRAINT tasks_run_at_finite CHECK (isfinite(run_at)),
    attempts         int         NOT NULL DEFAULT 0
                     CONSTRAINT tasks_attempts_not_negative CHECK (attempts >= 0),
    max_attempts     int         NOT NULL DEFAULT 5
                     CONSTRAINT tasks_max_attempts_at_least_1 CHECK (max_attempts >= 1)
                     CONSTRAINT tasks_max_attempts_at_most_10000 CHECK (max_attempts <= 10000),
    unique_key       text,
    checkpoint       jsonb,
    result           jsonb,
    last_error       text,
    cancel_requested boolean     NOT NULL DEFAULT false,
    locked_by        text,
    lease_expires_at timestamptz
                     CONSTRAINT tasks_lease_expires_at_finite CHECK (isfinite(lease_expires_at)),
    -- Every claim, counted or not, increments it: the fencing token that a
    -- holder must present to heartbeat, checkpoint or complete.
    runs             int         NOT NULL DEFAULT 0
                     CONSTRAINT tasks_runs_not_negative CHECK (runs >= 0),
    created_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    -- Which schedule and tick a task was enqueued for (syncq.schedules);
    -- one task per tick (tasks_schedule_tick_idx).
    schedule_id      text,
    scheduled_for    timestamptz,
    CONSTRAINT tasks_running_needs_locked_by_and_lease_expires_at
        CHECK (status <> 'running' OR (locked_by IS NOT NULL AND lease_expires_at IS NOT NULL)),
    CONSTRAINT tasks_attempts_at_most_max_attempts CHECK (attempts <= max_attempts),
    CONSTRAINT tasks_queued_needs_attempts_below_max_attempts
        CHECK (status <> 'queued' OR attempts < max_attempts),
    CONSTRAINT tasks_schedule_id_and_scheduled_for_together
        CHECK ((schedule_id IS NULL) = (scheduled_for IS NULL))
) WITH (
    fillfactor = 90,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05
);

-- The claim path: the next ready tasks of one dataset in the documented order
-- (priority, then run_at, then id). Partial, so finished rows cost nothing.
CREATE INDEX tasks_claim_idx ON syncq.tasks (dataset_id, priority, run_at, id)
    WHERE status = 'queued';

-- The rescuer: running tasks by lease expiry.
CREATE INDEX tasks_lease_idx ON syncq.tasks (lease_expires_at)
    WHERE status = 'running';

-- Counting a dataset's running tasks for its max_concurrency.
CREATE INDEX tasks_running_idx ON syncq.tasks (dataset_id) WHERE status = 'running';

-- Finished tasks by finish time, for pruning.
CREATE INDEX tasks_finished_idx ON syncq.tasks (finished_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled');

-- At most one queued or running task per (dataset_id, unique_key).
CREATE UNIQUE INDEX tasks_unique_key_idx ON syncq.tasks (dataset_id, unique_key)
    WHERE unique_key IS NOT NULL AND status IN ('queued', 'running');

-- One task per schedule tick.
CREATE UNIQUE INDEX tasks_schedule_tick_idx ON syncq.tasks (schedule_id, scheduled_for)
    WHERE schedule_id IS NOT NULL;

-- Every attempt's error, in order.
CREATE TABLE syncq.task_errors (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id   bigint      NOT NULL REFERENCES syncq.tasks (id) ON DELETE CASCADE,
    attempt   int         NOT NULL,
    worker_id text,
    error     text        NOT NULL,
    at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX task_errors_task_idx ON syncq.task_errors (task_id, id);

-- Live worker processes; last_heartbeat_at is renewed by each pool.
CREATE TABLE syncq.workers (
    worker_id         text        PRIMARY KEY,
    host              text        NOT NULL,
    pid               int         NOT NULL,
    kinds             text[]      NOT NULL DEFAULT '{}',
    datasets          text[],
    concurrency       int         NOT NULL,
    started_at        timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now(),
    -- A worker's heartbeat interval: it is live while its last beat is less
    -- than two intervals (and a second) old (syncq.workers_live), so a
    -- killed worker stops showing as live after ~21 s by default.
    heartbeat_every   interval    NOT NULL DEFAULT interval '10 seconds'
                      CONSTRAINT workers_heartbeat_every_positive CHECK (heartbeat_every > interval '0')
);

-- The sliding log of starts of rate-limited datasets: at most rate_limit
-- rows with started_at in (now - rate_window, now]. Older rows are pruned
-- (syncq.prune_rate_log).
CREATE TABLE syncq.rate_log (
    dataset_id text        NOT NULL,
    started_at timestamptz NOT NULL
) WITH (
    autovacuum_vacuum_scale_factor = 0.02
);
CREATE INDEX rate_log_idx ON syncq.rate_log (dataset_id, started_at);

-- Readiness that producers appended and no claim has absorbed yet: a
-- dataset has queued work from ready_at on (src/store/sql/functions/absorb_signals.sql).
CREATE TABLE syncq.ready_signals (
    dataset_id text        NOT NULL,
    ready_at   timestamptz NOT NULL
) WITH (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000
);
-- Read through this index, never by a sequential scan: every row is
-- deleted soon after it is written, and an index scan learns to skip the
-- dead entries (a heap scan reads every dead row again until a vacuum).
CREATE INDEX ready_signals_ready_at_idx ON syncq.ready_signals (ready_at);

-- Periodic tasks in rows (SPEC §2 syncq.schedules). Every worker process
-- runs the scheduler (src/schedule.rs), which takes the due schedules FOR
-- UPDATE SKIP LOCKED, enqueues the tick's task and moves next_run_at on,
-- in one transaction. The task carries (schedule_id, scheduled_for),
-- unique together (tasks_schedule_tick_idx): however many processes race,
-- restart or disagree about the time (the database's clock decides), a
-- tick has at most one task; and since next_run_at only moves on in the
-- transaction that enqueued, no tick is skipped while any worker runs.
CREATE TABLE syncq.schedules (
    schedule_id   text        PRIMARY KEY
        CONSTRAINT schedules_schedule_id_not_empty CHECK (schedule_id <> ''),
    dataset_id    text        NOT NULL
        CONSTRAINT schedules_dataset_id_not_empty CHECK (dataset_id <> ''),
    kind          text        NOT NULL
        CONSTRAINT schedules_kind_not_empty CHECK (kind <> ''),
    payload       jsonb       NOT NULL DEFAULT '{}',
    -- 5 fields, or 6 with seconds first, or a macro (@hourly, @daily, …);
    -- parsed by the workers (croner), shape-checked here.
    cron          text
        CONSTRAINT schedules_cron_has_5_or_6_fields
        CHECK (cron ~ '^\s*(@[a-z]+|\S+(\s+\S+){4,5})\s*$'),
    every         interval
        CONSTRAINT schedules_every_positive CHECK (every > interval '0'),
    timezone      text        NOT NULL DEFAULT 'UTC',
    priority      smallint    NOT NULL DEFAULT 0,
    max_attempts  int         NOT NULL DEFAULT 5
        CONSTRAINT schedules_max_attempts_between_1_and_10000 CHECK (max_attempts BETWEEN 1 AND 10000),
    paused        boolean     NOT NULL DEFAULT false,
    -- Ticks missed while no worker ran: one catch-up task (true), or none.
    catch_up      boolean     NOT NULL DEFAULT true,
    -- Enqueue a tick even while the previous task is still queued or
    -- running (false: skip it and count it in skipped_ticks).
    overlap       boolean     NOT NULL DEFAULT false,
    next_run_at   timestamptz
        CONSTRAINT schedules_next_run_at_finite CHECK (isfinite(next_run_at)),
    last_run_at   timestamptz,
    last_task_id  bigint,
    skipped_ticks bigint      NOT NULL DEFAULT 0,
    -- Why the workers cannot compute the next tick (an expression the
    -- shape check let through); cleared when cron, every or timezone change.
    error         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedules_cron_or_every CHECK ((cron IS NULL) <> (every IS NULL))
);
