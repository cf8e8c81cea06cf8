-- Resuming a schedule by SQL does what `syncq schedule resume` does: its
-- next tick is computed afresh, from the resume (issue 25: an UPDATE of
-- paused left the old next_run_at, and the ticks of the pause came back
-- as a catch-up task; the CLI's resume enqueued none).
CREATE OR REPLACE FUNCTION syncq.schedules_resumed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.next_run_at := NULL;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER schedules_resumed BEFORE UPDATE OF paused ON syncq.schedules
    FOR EACH ROW WHEN (OLD.paused AND NOT NEW.paused)
    EXECUTE FUNCTION syncq.schedules_resumed();
