-- Cancellation by plain UPDATE: a queued task (leased ahead by a worker or
-- not) is cancelled on the spot; a
-- running one is announced to its holder (NOTIFY, payload = task id), whose
-- handler hears it through its SyncTask. Runs as its owner, as the
-- readiness triggers do (tasks_after_insert.sql).
CREATE OR REPLACE FUNCTION syncq.tasks_cancel_requested() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.status = 'queued' THEN
        -- Leased ahead or not: it never starts (syncq.start_leased only
        -- starts queued tasks).
        NEW.status := 'cancelled';
        NEW.finished_at := now();
        NEW.locked_by := NULL;
        NEW.lease_expires_at := NULL;
        -- Leased ahead: its worker must not start it.
        IF OLD.locked_by IS NOT NULL THEN
            PERFORM pg_notify('syncq_cancel', NEW.id::text);
        END IF;
    ELSIF NEW.status = 'running' THEN
        PERFORM pg_notify('syncq_cancel', NEW.id::text);
    END IF;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER tasks_cancel_requested
    BEFORE UPDATE OF cancel_requested ON syncq.tasks
    FOR EACH ROW
    WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested)
    EXECUTE FUNCTION syncq.tasks_cancel_requested();
