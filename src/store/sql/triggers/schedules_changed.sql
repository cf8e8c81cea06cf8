-- Wakes the workers' schedulers when a schedule is added or changed.
CREATE OR REPLACE FUNCTION syncq.schedules_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_notify('syncq_schedules', '');
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER schedules_changed AFTER INSERT OR UPDATE OF cron, every, timezone, paused OR DELETE
    ON syncq.schedules FOR EACH STATEMENT EXECUTE FUNCTION syncq.schedules_changed();
