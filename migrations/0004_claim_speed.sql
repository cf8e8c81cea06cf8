-- syncq schema, version 4: a faster claim, and no lost wake-ups.
--
-- * Datasets without max_concurrency and rate_limit are no longer locked
--   by the claim: nothing needs counting there, and the task rows' own
--   FOR UPDATE SKIP LOCKED keeps each task with one claimer. Processes now
--   claim from one busy dataset side by side instead of taking turns on
--   its row lock. Datasets with a cap or a limit are locked as before, so
--   their counts stay exact (docs/claim.md).
-- * The probes "has this dataset a ready task?" walk tasks_claim_idx in
--   claim order instead of letting the planner pick a sequential scan that
--   steps over every finished task first, and the claim's UPDATE finds its
--   rows by primary key instead of hashing the whole table.
-- * Marking a dataset idle (ready_at) could race a concurrent insert whose
--   trigger saw the old ready_at and so left it alone: the claim, not yet
--   seeing the uncommitted task, then cleared ready_at and the task waited
--   for the next insert in its dataset. Writers of queued tasks now hold a
--   KEY SHARE lock on their dataset rows from the trigger to their commit,
--   and the claim marks a dataset idle only under FOR UPDATE (which
--   conflicts with it) and with a snapshot taken after that lock.
-- * Storage settings for a queue table that is updated on every claim and
--   completion: autovacuum early, so a long drain leaves bounded sizes.

ALTER TABLE syncq.tasks SET (
    fillfactor = 90,
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_insert_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05
);
ALTER TABLE syncq.datasets SET (
    fillfactor = 50,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000
);
ALTER TABLE syncq.rate_log SET (
    autovacuum_vacuum_scale_factor = 0.02
);

CREATE OR REPLACE FUNCTION syncq.tasks_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO syncq.datasets (dataset_id)
    SELECT DISTINCT n.dataset_id FROM new_tasks n
    WHERE NOT EXISTS (SELECT 1 FROM syncq.datasets d WHERE d.dataset_id = n.dataset_id)
    ON CONFLICT (dataset_id) DO NOTHING;
    -- Held until commit: a claim cannot mark these datasets idle meanwhile.
    PERFORM 1 FROM syncq.datasets d
    WHERE d.dataset_id IN (SELECT n.dataset_id FROM new_tasks n
                           WHERE n.status = 'queued' AND NOT n.cancel_requested)
    ORDER BY d.dataset_id
    FOR KEY SHARE;
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

CREATE OR REPLACE FUNCTION syncq.tasks_requeued() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- Held until commit, as in tasks_after_insert().
    PERFORM 1 FROM syncq.datasets d WHERE d.dataset_id = NEW.dataset_id FOR KEY SHARE;
    UPDATE syncq.datasets d SET ready_at = NEW.run_at
    WHERE d.dataset_id = NEW.dataset_id AND (d.ready_at IS NULL OR d.ready_at > NEW.run_at);
    RETURN NULL;
END;
$$;

-- Marks idle those of `p_candidates` left without a task ready at `p_now`:
-- ready_at becomes the earliest queued run_at (NULL if none), so they drop
-- out of the claim's scan. Each is locked FOR UPDATE SKIP LOCKED first (a
-- writer of queued tasks holds KEY SHARE until it commits) and looked at
-- again by a later statement, whose snapshot sees every insert committed
-- before the lock. Used by the claim's step 3 and by refresh_ready().
CREATE FUNCTION syncq.mark_idle(p_candidates text[], p_now timestamptz)
RETURNS int
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    v_idle text[];
    v_done int;
BEGIN
    v_idle := ARRAY(
        SELECT d.dataset_id FROM syncq.datasets d
        WHERE d.dataset_id = ANY (p_candidates)
          AND (SELECT true FROM syncq.tasks t
               WHERE t.dataset_id = d.dataset_id AND t.status = 'queued' AND t.run_at <= p_now
               ORDER BY t.priority, t.run_at, t.id
               LIMIT 1) IS NULL
        FOR UPDATE OF d SKIP LOCKED);
    IF cardinality(v_idle) = 0 THEN
        RETURN 0;
    END IF;
    UPDATE syncq.datasets d
    SET ready_at = (SELECT min(t.run_at) FROM syncq.tasks t
                    WHERE t.dataset_id = d.dataset_id AND t.status = 'queued')
    WHERE d.dataset_id = ANY (v_idle)
      AND (SELECT true FROM syncq.tasks t
           WHERE t.dataset_id = d.dataset_id AND t.status = 'queued' AND t.run_at <= p_now
           ORDER BY t.priority, t.run_at, t.id
           LIMIT 1) IS NULL;
    GET DIAGNOSTICS v_done = ROW_COUNT;
    RETURN v_done;
END;
$$;

-- Hands `p_limit` ready tasks of `p_kinds` to `p_worker`, round-robin across
-- datasets, honouring pause, throttle, max_concurrency and rate_limit.
--
-- Step 1 picks, in turn order (least recently served first), up to p_limit
-- datasets that look claimable in this statement's snapshot. Of those, the
-- ones with a cap or a rate limit are then locked (FOR NO KEY UPDATE SKIP
-- LOCKED: one claimer at a time counts them); the others are not locked.
-- Step 2 runs with a snapshot taken after those locks: every claim that
-- served a locked dataset before has committed, so its running count and
-- rate log are exact. Each dataset gets at most its fair share of the
-- slots, its free concurrency and its rate budget; tasks go in (priority,
-- run_at, id) order, every dataset's first task before any dataset's
-- second; the tasks themselves are taken FOR UPDATE SKIP LOCKED.
-- Step 3 records, for each dataset left without ready work, when it may
-- next have some (ready_at), so idle datasets drop out of step 1's scan.
-- It locks the dataset FOR UPDATE SKIP LOCKED first (a writer of queued
-- tasks holds KEY SHARE until it commits) and looks with a later snapshot.
CREATE OR REPLACE FUNCTION syncq.claim(p_worker text, p_kinds text[], p_datasets text[],
                                       p_limit int, p_lease_secs float8)
RETURNS TABLE (id bigint, dataset_id text, kind text, payload jsonb, priority smallint,
               attempts int, max_attempts int, runs int, checkpoint jsonb,
               created_at timestamptz, started_at timestamptz)
LANGUAGE plpgsql
-- Every statement here is built for index access. The datasets table is
-- small but churns (a new row version per turn), so between vacuums the
-- planner's statistics make a sequential scan look cheaper than it is.
SET enable_seqscan = off
AS $$
#variable_conflict use_column
DECLARE
    v_turns text[] := '{}';
    v_limited text[] := '{}';
    v_locked text[];
    v_row record;
    v_now timestamptz;
BEGIN
    FOR v_row IN
        SELECT d.dataset_id, (d.max_concurrency IS NOT NULL OR d.rate_limit IS NOT NULL) AS limited
        FROM syncq.datasets d
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
          -- A correlated scalar subquery, not EXISTS (which the planner
          -- turns into a hash semi-join over every queued task), ordered
          -- as tasks_claim_idx so it is one index probe.
          AND (SELECT true FROM syncq.tasks t
               WHERE t.dataset_id = d.dataset_id AND t.status = 'queued'
                 AND t.run_at <= now() AND t.kind = ANY (p_kinds) AND NOT t.cancel_requested
               ORDER BY t.priority, t.run_at, t.id
               LIMIT 1)
        ORDER BY d.last_claimed_at NULLS FIRST, d.dataset_id
        LIMIT p_limit
    LOOP
        v_turns := v_turns || v_row.dataset_id;
        IF v_row.limited THEN
            v_limited := v_limited || v_row.dataset_id;
        END IF;
    END LOOP;
    IF cardinality(v_limited) > 0 THEN
        v_locked := ARRAY(SELECT d.dataset_id FROM syncq.datasets d
                          WHERE d.dataset_id = ANY (v_limited)
                          FOR NO KEY UPDATE SKIP LOCKED);
        IF cardinality(v_locked) < cardinality(v_limited) THEN
            -- Keep the limited datasets this claimer could lock, in turn order.
            v_turns := ARRAY(
                SELECT u.turn_id FROM unnest(v_turns) WITH ORDINALITY AS u(turn_id, n)
                WHERE NOT (u.turn_id = ANY (v_limited)) OR u.turn_id = ANY (v_locked)
                ORDER BY u.n);
        END IF;
    END IF;
    IF cardinality(v_turns) = 0 THEN
        RETURN;
    END IF;

    v_now := clock_timestamp();
    RETURN QUERY
    WITH turns AS (
        SELECT d.dataset_id, u.turn, d.rate_limit,
               -- CASE, not coalesce: no counting for a dataset without
               -- that setting.
               greatest(0, least(
                   -- A cap or limit set since step 1 on a dataset this claim
                   -- did not lock: skip it now; the next claim locks it.
                   CASE WHEN (d.max_concurrency IS NOT NULL OR d.rate_limit IS NOT NULL)
                             AND NOT (d.dataset_id = ANY (coalesce(v_locked, '{}')))
                        THEN 0 END,
                   ceil(p_limit::float8 / cardinality(v_turns))::int,
                   CASE WHEN d.max_concurrency IS NULL THEN p_limit
                        ELSE d.max_concurrency - (
                            SELECT count(*) FROM syncq.tasks r
                            WHERE r.dataset_id = d.dataset_id AND r.status = 'running')::int
                   END,
                   CASE WHEN d.rate_limit IS NULL THEN p_limit
                        ELSE d.rate_limit - (
                            SELECT count(*) FROM syncq.rate_log l
                            WHERE l.dataset_id = d.dataset_id
                              AND l.started_at > v_now - d.rate_window)::int
                   END
               )) AS share
        FROM unnest(v_turns) WITH ORDINALITY AS u(dataset_id, turn)
        -- LATERAL: one primary-key probe per turn, not a hash of the table.
        CROSS JOIN LATERAL (SELECT * FROM syncq.datasets d1
                            WHERE d1.dataset_id = u.dataset_id) d
        -- Re-read here: an unlocked dataset may have been paused or
        -- throttled since step 1.
        WHERE NOT d.paused AND (d.throttled_until IS NULL OR d.throttled_until <= v_now)
    ),
    candidates AS (
        SELECT c.id, turns.dataset_id, turns.turn,
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
        SELECT c.id, c.dataset_id FROM candidates c ORDER BY c.rank, c.turn LIMIT p_limit
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
        -- By primary key: a join here was planned as a hash of the table.
        WHERE t.id = ANY (ARRAY(SELECT p.id FROM picked p))
        RETURNING t.id, t.dataset_id, t.kind, t.payload, t.priority, t.attempts,
                  t.max_attempts, t.runs, t.checkpoint, t.created_at, t.started_at
    ),
    logged AS (
        INSERT INTO syncq.rate_log (dataset_id, started_at)
        SELECT p.dataset_id, v_now
        FROM picked p JOIN turns ON turns.dataset_id = p.dataset_id
        WHERE turns.rate_limit IS NOT NULL
    ),
    turned AS (
        -- A dataset locked by someone else is being claimed, paused or
        -- filled right now; its turn moves without us.
        UPDATE syncq.datasets d SET last_claimed_at = v_now
        WHERE d.dataset_id = ANY (ARRAY(
            SELECT s.dataset_id FROM syncq.datasets s
            WHERE s.dataset_id = ANY (ARRAY(SELECT DISTINCT p.dataset_id FROM picked p))
            FOR NO KEY UPDATE SKIP LOCKED))
    )
    SELECT c.id, c.dataset_id, c.kind, c.payload, c.priority, c.attempts,
           c.max_attempts, c.runs, c.checkpoint, c.created_at, c.started_at
    FROM claimed c
    ORDER BY c.id;

    PERFORM syncq.mark_idle(v_turns, v_now);
END;
$$;

-- As in 0002, with the task probe ordered as tasks_claim_idx.
CREATE OR REPLACE FUNCTION syncq.next_claim_in(p_kinds text[], p_datasets text[])
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
           ORDER BY t.priority, t.run_at, t.id
           LIMIT 1)
$$;

-- Repairs ready_at of datasets it says are ready when none of their queued
-- tasks is. Two claimers that take a dataset's last ready tasks side by
-- side each still see the other's (uncommitted) claims as queued in step 3,
-- so neither marks it idle, and step 1 never picks it again to do so; if it
-- also has delayed tasks, ready_at stays in the past and next_claim_in
-- keeps answering "now". A worker calls this after a few such answers in a
-- row. Same protocol as the claim's step 3. Returns the datasets repaired.
CREATE FUNCTION syncq.refresh_ready(p_datasets text[])
RETURNS int
LANGUAGE sql
AS $$
    SELECT syncq.mark_idle(ARRAY(
        SELECT d.dataset_id FROM syncq.datasets d
        WHERE d.ready_at IS NOT NULL AND d.ready_at <= clock_timestamp()
          AND (p_datasets IS NULL OR d.dataset_id = ANY (p_datasets))), clock_timestamp())
$$;
