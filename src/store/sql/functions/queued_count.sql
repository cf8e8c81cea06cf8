-- A dataset's queued tasks, without an index on every queued row.
--
-- The indexes split the tasks by holder (migrations/0010): a queued task
-- no worker holds is in tasks_claim_idx (and tasks_unheld_idx); one a
-- worker leased ahead is in tasks_held_idx. A lease ahead adds no entry
-- to the first two, which is why no index covers every queued task — and
-- why these read both halves, each a range of its own index.
--
-- Written to be inlined, as running_count: LANGUAGE sql, STABLE, one
-- SELECT, a set of one row, called in FROM (CROSS JOIN LATERAL
-- syncq.queued_count(d.dataset_id) AS q(queued)).

-- How many of the dataset's tasks are queued: waiting or ready (an
-- index-only range of tasks_claim_idx) and leased ahead (tasks_held_idx).
CREATE OR REPLACE FUNCTION syncq.queued_count(p_dataset text)
RETURNS SETOF bigint
LANGUAGE sql STABLE
AS $$
    SELECT (SELECT count(*) FROM syncq.tasks t
            WHERE t.dataset_id = p_dataset AND t.status = 'queued' AND t.locked_by IS NULL)
         + (SELECT count(*) FROM syncq.tasks t
            WHERE t.dataset_id = p_dataset AND t.status = 'queued' AND t.locked_by IS NOT NULL)
$$;

-- The earliest run_at of the dataset's queued tasks no worker holds (NULL:
-- none). tasks_claim_idx is ordered by priority first, so this reads the
-- first entry of each priority the dataset has queued tasks of (a loose
-- index scan), not every queued task: a dataset with a million delayed
-- tasks is a handful of probes.
CREATE OR REPLACE FUNCTION syncq.first_run_at(p_dataset text)
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
    WITH RECURSIVE firsts AS (
        (SELECT t.priority, t.run_at FROM syncq.tasks t
         WHERE t.dataset_id = p_dataset AND t.status = 'queued' AND t.locked_by IS NULL
         ORDER BY t.priority, t.run_at, t.id
         LIMIT 1)
        UNION ALL
        SELECT n.priority, n.run_at
        FROM firsts f
        CROSS JOIN LATERAL (
            SELECT t.priority, t.run_at FROM syncq.tasks t
            WHERE t.dataset_id = p_dataset AND t.status = 'queued' AND t.locked_by IS NULL
              AND t.priority > f.priority
            ORDER BY t.priority, t.run_at, t.id
            LIMIT 1) n
    )
    SELECT min(f.run_at) FROM firsts f
$$;

-- When the dataset's oldest ready task became ready (NULL: none ready):
-- the earliest run_at not after now of its queued tasks, those leased
-- ahead included (they are ready, waiting in a worker's local queue).
CREATE OR REPLACE FUNCTION syncq.oldest_ready_at(p_dataset text)
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
    SELECT min(x.at)
    FROM (SELECT syncq.first_run_at(p_dataset) AS at
          UNION ALL
          SELECT min(t.run_at) FROM syncq.tasks t
          WHERE t.dataset_id = p_dataset AND t.status = 'queued' AND t.locked_by IS NOT NULL) x
    WHERE x.at <= now()
$$;
