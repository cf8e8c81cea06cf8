-- A task that becomes queued again (retry, release, rescue, an operator's
-- UPDATE), is moved earlier, or is given back unstarted by the worker that
-- leased it ahead (given back, or freed by the rescuer after its worker
-- died) signals its dataset as having work.
CREATE OR REPLACE FUNCTION syncq.tasks_requeued() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO syncq.ready_signals (dataset_id, ready_at) VALUES (NEW.dataset_id, NEW.run_at);
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER tasks_requeued
    AFTER UPDATE OF status, run_at, locked_by ON syncq.tasks
    FOR EACH ROW
    WHEN (NEW.status = 'queued'
          AND (OLD.status IS DISTINCT FROM 'queued' OR NEW.run_at < OLD.run_at
               OR (OLD.locked_by IS NOT NULL AND NEW.locked_by IS NULL)))
    EXECUTE FUNCTION syncq.tasks_requeued();
