-- A timezone must be an IANA name (as the scheduler reads them); a change of
-- what decides the ticks recomputes the next one and clears the error, as
-- does, after a refused tick, a change of what a tick enqueues.
CREATE OR REPLACE FUNCTION syncq.schedules_check() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- An IANA name as the scheduler reads it, exactly: PostgreSQL also
    -- takes abbreviations (PST), POSIX specs (UTC+5) and any case
    -- (europe/berlin), which the scheduler refuses, and such a schedule
    -- would never tick.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_timezone_names z WHERE z.name = NEW.timezone)
       OR NEW.timezone ~ '^(posix|right)/|^(posixrules|localtime|Factory)$' THEN
        RAISE EXCEPTION 'timezone: % is not an IANA time zone name', NEW.timezone
            USING ERRCODE = 'check_violation', COLUMN = 'timezone';
    END IF;
    IF TG_OP = 'UPDATE' AND (NEW.cron IS DISTINCT FROM OLD.cron
                             OR NEW.every IS DISTINCT FROM OLD.every
                             OR NEW.timezone IS DISTINCT FROM OLD.timezone) THEN
        NEW.next_run_at := NULL;
        NEW.error := NULL;
    -- A tick the tasks table refused (the scheduler's error): changing
    -- what the tick enqueues is the fix, and the schedule ticks again.
    ELSIF TG_OP = 'UPDATE' AND OLD.error IS NOT NULL AND NEW.error IS NOT DISTINCT FROM OLD.error
          AND (NEW.dataset_id, NEW.kind, NEW.payload, NEW.priority, NEW.max_attempts)
              IS DISTINCT FROM (OLD.dataset_id, OLD.kind, OLD.payload, OLD.priority, OLD.max_attempts) THEN
        NEW.next_run_at := NULL;
        NEW.error := NULL;
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER schedules_check BEFORE INSERT OR UPDATE ON syncq.schedules
    FOR EACH ROW EXECUTE FUNCTION syncq.schedules_check();
