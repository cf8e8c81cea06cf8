-- What operators use at a psql prompt: cancellation by UPDATE, retry,
-- pruning, and views.

-- Cancellation by plain UPDATE: a queued task is cancelled on the spot; a
-- running one is announced to its holder (NOTIFY, payload = task id), whose
-- handler hears it through its SyncTask. Runs as its owner, as the
-- readiness triggers do (0002_readiness.sql).
CREATE FUNCTION syncq.tasks_cancel_requested() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NEW.status = 'queued' THEN
        NEW.status := 'cancelled';
        NEW.finished_at := now();
    ELSIF NEW.status = 'running' THEN
        PERFORM pg_notify('syncq_cancel', NEW.id::text);
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER tasks_cancel_requested
    BEFORE UPDATE OF cancel_requested ON syncq.tasks
    FOR EACH ROW
    WHEN (NEW.cancel_requested AND NOT OLD.cancel_requested)
    EXECUTE FUNCTION syncq.tasks_cancel_requested();

-- Puts failed or cancelled tasks back to queued, keeping their attempts and
-- error history, and raising max_attempts when needed so at least one more
-- attempt is allowed (as River and Oban do); at the attempts bound (10,000)
-- one attempt is given back instead of raising max_attempts past it.
-- Returns the ids retried; ids of tasks that are not failed or cancelled
-- are left alone.
--   SELECT syncq.retry(ARRAY[42]);
CREATE FUNCTION syncq.retry(p_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE syncq.tasks
    SET status = 'queued', run_at = now(), finished_at = NULL, cancel_requested = false,
        -- At the bound (10,000) one attempt is given back instead.
        attempts = least(attempts, 9999),
        max_attempts = least(greatest(max_attempts, attempts + 1), 10000)
    WHERE id = ANY (p_ids) AND status IN ('failed', 'cancelled')
    RETURNING id
$$;

-- Deletes up to p_batch finished tasks (of p_statuses) that finished more
-- than p_older_than_secs ago, with their error history; returns how many.
-- Runs as its owner: whoever may execute it can prune, and nothing else;
-- the worker role needs no DELETE on syncq.tasks.
CREATE FUNCTION syncq.prune_finished(p_older_than_secs float8, p_statuses text[], p_batch int)
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (
        DELETE FROM syncq.tasks
        WHERE id IN (
            SELECT id FROM syncq.tasks
            WHERE status IN ('succeeded', 'failed', 'cancelled') AND status::text = ANY (p_statuses)
              AND finished_at < now() - make_interval(secs => greatest(p_older_than_secs, 0))
            LIMIT p_batch
            FOR UPDATE SKIP LOCKED)
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
REVOKE ALL ON FUNCTION syncq.prune_finished(float8, text[], int) FROM PUBLIC;

-- Per dataset: counts per status, the age of its oldest ready task, and its
-- settings under their column names (SPEC §2). A dataset that has tasks but
-- no row yet (its row is made at its first claim) shows default settings.
CREATE VIEW syncq.dataset_stats AS
SELECT k.dataset_id,
       count(t.id) FILTER (WHERE t.status = 'queued')    AS queued,
       count(t.id) FILTER (WHERE t.status = 'running')   AS running,
       count(t.id) FILTER (WHERE t.status = 'succeeded') AS succeeded,
       count(t.id) FILTER (WHERE t.status = 'failed')    AS failed,
       count(t.id) FILTER (WHERE t.status = 'cancelled') AS cancelled,
       now() - min(t.run_at) FILTER (WHERE t.status = 'queued' AND t.run_at <= now())
                                                          AS oldest_ready_age,
       d.rate_limit, coalesce(d.rate_window, interval '1 second') AS rate_window,
       d.max_concurrency, coalesce(d.paused, false) AS paused, d.throttled_until,
       coalesce(d.weight, 1) AS weight
FROM (SELECT s.dataset_id FROM syncq.datasets s
      UNION SELECT DISTINCT q.dataset_id FROM syncq.tasks q) k
LEFT JOIN syncq.datasets d ON d.dataset_id = k.dataset_id
LEFT JOIN syncq.tasks t ON t.dataset_id = k.dataset_id
GROUP BY k.dataset_id, d.dataset_id;

-- Running tasks with their holders and how much lease they have left.
CREATE VIEW syncq.running_tasks AS
SELECT t.id, t.dataset_id, t.kind, t.attempts, t.max_attempts, t.locked_by,
       w.host, w.pid, t.started_at, now() - t.started_at AS running_for,
       t.lease_expires_at - now() AS lease_left, t.cancel_requested
FROM syncq.tasks t
LEFT JOIN syncq.workers w ON w.worker_id = t.locked_by
WHERE t.status = 'running';

-- Every failed attempt of the last day, newest first.
CREATE VIEW syncq.recent_failures AS
SELECT e.task_id, t.dataset_id, t.kind, t.status, e.attempt, e.worker_id, e.error, e.at
FROM syncq.task_errors e
JOIN syncq.tasks t ON t.id = e.task_id
WHERE e.at > now() - interval '1 day'
ORDER BY e.at DESC;

-- The workers whose heartbeat is current, with how stale it is.
CREATE VIEW syncq.workers_live AS
SELECT w.*, now() - w.last_heartbeat_at AS heartbeat_age
FROM syncq.workers w
WHERE w.last_heartbeat_at > now() - 2 * w.heartbeat_every - interval '1 second';
