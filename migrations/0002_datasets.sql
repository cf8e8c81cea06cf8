-- syncq schema, version 2: datasets as first-class queues.
--
-- * The claim moves into syncq.claim(): it first locks the datasets whose
--   turn it is, then — in a second statement, whose snapshot is taken after
--   those locks — counts each one's running tasks and recent starts, so caps
--   and rate limits are exact across every process (see docs/claim.md).
-- * syncq.rate_log: the sliding log of task starts of rate-limited datasets.
-- * datasets.ready_at: when the dataset may next have ready work (NULL: no
--   queued task). The claim's scan skips idle datasets through it, so a
--   thousand idle datasets cost nothing.

ALTER TABLE syncq.datasets
    ADD COLUMN ready_at timestamptz,
    ADD CONSTRAINT datasets_rate_limit_at_most_1000000 CHECK (rate_limit <= 1000000),
    ADD CONSTRAINT datasets_rate_window_at_most_1_day CHECK (rate_window <= interval '1 day'),
    ADD CONSTRAINT datasets_max_concurrency_at_most_100000 CHECK (max_concurrency <= 100000);

UPDATE syncq.datasets d
SET ready_at = (SELECT min(t.run_at) FROM syncq.tasks t
                WHERE t.dataset_id = d.dataset_id AND t.status = 'queued');

-- The claim's scan: datasets that may have ready work, in turn order.
CREATE INDEX datasets_turn_idx ON syncq.datasets (last_claimed_at NULLS FIRST, dataset_id)
    WHERE ready_at IS NOT NULL;

-- Counting a dataset's running tasks for its max_concurrency.
CREATE INDEX tasks_running_idx ON syncq.tasks (dataset_id) WHERE status = 'running';

-- The sliding log of starts of rate-limited datasets: at most rate_limit
-- rows with started_at in (now - rate_window, now]. Older rows are pruned.
CREATE TABLE syncq.rate_log (
    dataset_id text        NOT NULL,
    started_at timestamptz NOT NULL
);
CREATE INDEX rate_log_idx ON syncq.rate_log (dataset_id, started_at);

-- Inserts also mark their datasets as having work from the earliest run_at.
CREATE OR REPLACE FUNCTION syncq.tasks_after_insert() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO syncq.datasets (dataset_id)
    SELECT DISTINCT n.dataset_id FROM new_tasks n
    WHERE NOT EXISTS (SELECT 1 FROM syncq.datasets d WHERE d.dataset_id = n.dataset_id)
    ON CONFLICT (dataset_id) DO NOTHING;
    UPDATE syncq.datasets d SET ready_at = n.ready_at
    FROM (SELECT dataset_id, min(run_at) AS ready_at FROM new_tasks
          WHERE status = 'queued' AND NOT cancel_requested GROUP BY dataset_id) n
    WHERE d.dataset_id = n.dataset_id AND (d.ready_at IS NULL OR d.ready_at > n.ready_at);
    -- A task inserted already cancelled never starts.
    UPDATE syncq.tasks t SET status = 'cancelled', finished_at = now()
    FROM new_tasks n
    WHERE n.cancel_requested AND n.status = 'queued' AND t.id = n.id;
    PERFORM pg_notify('syncq_task_inserted', '');
    RETURN NULL;
END;
$$;

-- A task that becomes queued again (retry, release, rescue, an operator's
-- UPDATE) or is moved earlier marks its dataset as having work.
CREATE FUNCTION syncq.tasks_requeued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE syncq.datasets d SET ready_at = NEW.run_at
    WHERE d.dataset_id = NEW.dataset_id AND (d.ready_at IS NULL OR d.ready_at > NEW.run_at);
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_requeued
    AFTER UPDATE OF status, run_at ON syncq.tasks
    FOR EACH ROW
    WHEN (NEW.status = 'queued'
          AND (OLD.status IS DISTINCT FROM 'queued' OR NEW.run_at < OLD.run_at))
    EXECUTE FUNCTION syncq.tasks_requeued();

-- Hands `p_limit` ready tasks of `p_kinds` to `p_worker`, round-robin across
-- datasets, honouring pause, throttle, max_concurrency and rate_limit.
--
-- Step 1 locks, in turn order (least recently served first), up to p_limit
-- datasets that look claimable. The scan follows datasets_turn_idx and stops
-- at p_limit; the limit checks here read this statement's snapshot, so they
-- are only a filter.
-- Step 2 runs with a snapshot taken after those locks: every claim that
-- served these datasets before has committed, so the running counts and
-- the rate log are exact. Each dataset gets at most its fair share of the
-- slots, its free concurrency, and its rate budget; tasks go in (priority,
-- run_at, id) order; every dataset's first task before any dataset's second.
-- Step 3 records, for each locked dataset left without ready work, when it
-- may next have some (ready_at), so idle datasets drop out of step 1's scan.
CREATE FUNCTION syncq.claim(p_worker text, p_kinds text[], p_datasets text[],
                            p_limit int, p_lease_secs float8)
RETURNS TABLE (id bigint, dataset_id text, kind text, payload jsonb, priority smallint,
               attempts int, max_attempts int, runs int, checkpoint jsonb,
               created_at timestamptz, started_at timestamptz)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_turns text[] := '{}';
    v_row record;
    v_now timestamptz;
BEGIN
    FOR v_row IN
        SELECT d.dataset_id FROM syncq.datasets d
        WHERE d.ready_at IS NOT NULL AND d.ready_at <= now()
          AND NOT d.paused
          AND (d.throttled_until IS NULL OR d.throttled_until <= now())
          AND (p_datasets IS NULL OR d.dataset_id = ANY (p_datasets))
          AND (d.max_concurrency IS NULL OR d.max_concurrency > (
                SELECT count(*) FROM syncq.tasks r
                WHERE r.dataset_id = d.dataset_id AND r.status = 'running'))
          AND (d.rate_limit IS NULL OR d.rate_limit > (
                SELECT count(*) FROM syncq.rate_log l
                WHERE l.dataset_id = d.dataset_id AND l.started_at > now() - d.rate_window))
          -- A correlated scalar subquery, not EXISTS: the planner would turn
          -- EXISTS into a hash semi-join over every queued task.
          AND (SELECT true FROM syncq.tasks t
               WHERE t.dataset_id = d.dataset_id AND t.status = 'queued'
                 AND t.run_at <= now() AND t.kind = ANY (p_kinds) AND NOT t.cancel_requested
               LIMIT 1)
        ORDER BY d.last_claimed_at NULLS FIRST, d.dataset_id
        LIMIT p_limit
        FOR NO KEY UPDATE OF d SKIP LOCKED
    LOOP
        v_turns := v_turns || v_row.dataset_id;
    END LOOP;
    IF cardinality(v_turns) = 0 THEN
        RETURN;
    END IF;

    v_now := clock_timestamp();
    RETURN QUERY
    WITH turns AS (
        SELECT d.dataset_id, u.turn, d.rate_limit,
               greatest(0, least(
                   ceil(p_limit::float8 / cardinality(v_turns))::int,
                   coalesce(d.max_concurrency - (
                       SELECT count(*) FROM syncq.tasks r
                       WHERE r.dataset_id = d.dataset_id AND r.status = 'running')::int, p_limit),
                   coalesce(d.rate_limit - (
                       SELECT count(*) FROM syncq.rate_log l
                       WHERE l.dataset_id = d.dataset_id
                         AND l.started_at > v_now - d.rate_window)::int, p_limit)
               )) AS share
        FROM unnest(v_turns) WITH ORDINALITY AS u(dataset_id, turn)
        JOIN syncq.datasets d ON d.dataset_id = u.dataset_id
    ),
    candidates AS (
        SELECT c.id, turns.turn,
               row_number() OVER (PARTITION BY turns.dataset_id
                                  ORDER BY c.priority, c.run_at, c.id) AS rank
        FROM turns
        CROSS JOIN LATERAL (
            SELECT t.id, t.priority, t.run_at
            FROM syncq.tasks t
            WHERE t.dataset_id = turns.dataset_id AND t.status = 'queued'
              AND t.run_at <= v_now AND t.kind = ANY (p_kinds) AND NOT t.cancel_requested
            ORDER BY t.priority, t.run_at, t.id
            LIMIT turns.share
            FOR UPDATE SKIP LOCKED
        ) c
    ),
    picked AS (
        SELECT c.id FROM candidates c ORDER BY c.rank, c.turn LIMIT p_limit
    ),
    claimed AS (
        UPDATE syncq.tasks t
        SET status = 'running',
            attempts = t.attempts + 1,
            runs = t.runs + 1,
            locked_by = p_worker,
            lease_expires_at = v_now + make_interval(secs => p_lease_secs),
            started_at = v_now,
            finished_at = NULL
        FROM picked
        WHERE t.id = picked.id
        RETURNING t.id, t.dataset_id, t.kind, t.payload, t.priority, t.attempts,
                  t.max_attempts, t.runs, t.checkpoint, t.created_at, t.started_at
    ),
    logged AS (
        INSERT INTO syncq.rate_log (dataset_id, started_at)
        SELECT c.dataset_id, v_now
        FROM claimed c JOIN turns ON turns.dataset_id = c.dataset_id
        WHERE turns.rate_limit IS NOT NULL
    ),
    turned AS (
        UPDATE syncq.datasets d SET last_claimed_at = v_now
        WHERE d.dataset_id = ANY (ARRAY(SELECT c.dataset_id FROM claimed c))
    )
    SELECT c.id, c.dataset_id, c.kind, c.payload, c.priority, c.attempts,
           c.max_attempts, c.runs, c.checkpoint, c.created_at, c.started_at
    FROM claimed c
    ORDER BY c.id;

    UPDATE syncq.datasets d
    SET ready_at = (SELECT min(t.run_at) FROM syncq.tasks t
                    WHERE t.dataset_id = d.dataset_id AND t.status = 'queued')
    WHERE d.dataset_id = ANY (v_turns)
      AND (SELECT true FROM syncq.tasks t
           WHERE t.dataset_id = d.dataset_id AND t.status = 'queued' AND t.run_at <= v_now
           LIMIT 1) IS NULL;
END;
$$;

-- How long until this worker may be able to claim something, in seconds:
-- 0 when a dataset is claimable now (a claim that came back empty lost a
-- race for its lock), the wait for the earliest throttle, rate budget or
-- delayed task otherwise, NULL when nothing this worker handles is queued
-- in a dataset that is not paused or at its concurrency cap.
CREATE FUNCTION syncq.next_claim_in(p_kinds text[], p_datasets text[])
RETURNS float8
LANGUAGE sql STABLE AS $$
    SELECT greatest(0, extract(epoch FROM min(greatest(
               d.ready_at,
               coalesce(d.throttled_until, now()),
               CASE WHEN d.rate_limit IS NULL THEN now()
                    ELSE coalesce((SELECT l.started_at + d.rate_window FROM syncq.rate_log l
                                   WHERE l.dataset_id = d.dataset_id
                                     AND l.started_at > now() - d.rate_window
                                   ORDER BY l.started_at DESC
                                   OFFSET d.rate_limit - 1 LIMIT 1), now())
               END)) - now()))::float8
    FROM syncq.datasets d
    WHERE d.ready_at IS NOT NULL
      AND NOT d.paused
      AND (p_datasets IS NULL OR d.dataset_id = ANY (p_datasets))
      AND (d.max_concurrency IS NULL OR d.max_concurrency > (
            SELECT count(*) FROM syncq.tasks r
            WHERE r.dataset_id = d.dataset_id AND r.status = 'running'))
      AND (SELECT true FROM syncq.tasks t
           WHERE t.dataset_id = d.dataset_id AND t.status = 'queued'
             AND t.kind = ANY (p_kinds) AND NOT t.cancel_requested
           LIMIT 1)
$$;

-- Drops rate-log rows that can no longer count (older than their window,
-- or of datasets without a limit). Bounded per call.
CREATE FUNCTION syncq.prune_rate_log(p_batch int) RETURNS bigint
LANGUAGE sql AS $$
    WITH old AS (
        SELECT l.ctid FROM syncq.rate_log l
        LEFT JOIN syncq.datasets d ON d.dataset_id = l.dataset_id
        WHERE d.rate_limit IS NULL OR l.started_at <= now() - d.rate_window
        LIMIT p_batch
    ), gone AS (
        DELETE FROM syncq.rate_log l USING old WHERE l.ctid = old.ctid RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
