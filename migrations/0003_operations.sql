-- syncq schema, version 3: what operators use at a psql prompt.

-- Per dataset: counts per status, the age of its oldest ready task, and its
-- settings under their column names (SPEC §2).
CREATE VIEW syncq.dataset_stats AS
SELECT d.dataset_id,
       count(t.id) FILTER (WHERE t.status = 'queued')    AS queued,
       count(t.id) FILTER (WHERE t.status = 'running')   AS running,
       count(t.id) FILTER (WHERE t.status = 'succeeded') AS succeeded,
       count(t.id) FILTER (WHERE t.status = 'failed')    AS failed,
       count(t.id) FILTER (WHERE t.status = 'cancelled') AS cancelled,
       now() - min(t.run_at) FILTER (WHERE t.status = 'queued' AND t.run_at <= now())
                                                          AS oldest_ready_age,
       d.rate_limit, d.rate_window, d.max_concurrency, d.paused, d.throttled_until
FROM syncq.datasets d
LEFT JOIN syncq.tasks t ON t.dataset_id = d.dataset_id
GROUP BY d.dataset_id;

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

-- Puts failed or cancelled tasks back to queued, keeping their attempts and
-- error history, and raising max_attempts when needed so at least one more
-- attempt is allowed (as River and Oban do). Returns the ids retried; ids of
-- tasks that are not failed or cancelled are left alone.
--   SELECT syncq.retry(ARRAY[42]);
CREATE FUNCTION syncq.retry(p_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE syncq.tasks
    SET status = 'queued', run_at = now(), finished_at = NULL, cancel_requested = false,
        max_attempts = greatest(max_attempts, attempts + 1)
    WHERE id = ANY (p_ids) AND status IN ('failed', 'cancelled')
    RETURNING id
$$;

-- Finished tasks by finish time, for pruning.
CREATE INDEX tasks_finished_idx ON syncq.tasks (finished_at)
    WHERE status IN ('succeeded', 'failed', 'cancelled');

-- Trigger functions run as their owner, so a producer that may only INSERT
-- tasks still gets its datasets created and its workers woken, and a worker
-- need not own the datasets table. search_path is pinned: every name in
-- them is schema-qualified.
ALTER FUNCTION syncq.tasks_after_insert() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION syncq.tasks_requeued() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION syncq.tasks_cancel_requested() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
