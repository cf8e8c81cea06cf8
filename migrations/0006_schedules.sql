-- Periodic tasks in rows (SPEC §2 syncq.schedules).
--
-- A schedule is a row; every worker process runs the scheduler
-- (src/schedule.rs), which takes the due schedules FOR UPDATE SKIP LOCKED,
-- enqueues the tick's task and moves next_run_at on, in one transaction.
-- The task carries (schedule_id, scheduled_for), unique together: however
-- many processes race, restart or disagree about the time (the database's
-- clock decides), a tick has at most one task; and since next_run_at only
-- moves on in the transaction that enqueued, no tick is skipped while any
-- worker runs. The tasks' schedule_id and scheduled_for columns and their
-- unique index (tasks_schedule_tick_idx) are in 0001_schema.sql.

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

-- A timezone must be one PostgreSQL knows (the IANA database); a change of
-- what decides the ticks recomputes the next one and clears the error.
CREATE FUNCTION syncq.schedules_check() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    BEGIN
        PERFORM now() AT TIME ZONE NEW.timezone;
    EXCEPTION WHEN invalid_parameter_value THEN
        RAISE EXCEPTION 'timezone: % is not an IANA time zone name', NEW.timezone
            USING ERRCODE = 'check_violation', COLUMN = 'timezone';
    END;
    IF TG_OP = 'UPDATE' AND (NEW.cron IS DISTINCT FROM OLD.cron
                             OR NEW.every IS DISTINCT FROM OLD.every
                             OR NEW.timezone IS DISTINCT FROM OLD.timezone) THEN
        NEW.next_run_at := NULL;
        NEW.error := NULL;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER schedules_check BEFORE INSERT OR UPDATE ON syncq.schedules
    FOR EACH ROW EXECUTE FUNCTION syncq.schedules_check();

-- Wakes the workers' schedulers when a schedule is added or changed.
CREATE FUNCTION syncq.schedules_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('syncq_schedules', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER schedules_changed AFTER INSERT OR UPDATE OF cron, every, timezone, paused OR DELETE
    ON syncq.schedules FOR EACH STATEMENT EXECUTE FUNCTION syncq.schedules_changed();
