-- syncq schema, version 5: trust boundaries.
--
-- * No row anyone can write makes a claim fail. Every counter and time the
--   claim computes with is bounded by a constraint named after its column:
--   attempts within 0..=max_attempts (and below it while queued, so the
--   claim's attempts + 1 stays in range), max_attempts at most 10,000,
--   finite times. runs, the fencing token, wraps instead of overflowing.
-- * id is GENERATED ALWAYS: nobody can take an id the sequence will hand
--   out later.
-- * The claim and next_claim_in take the datasets a worker has set aside
--   (p_skip): a dataset whose claim fails for a reason of its own is left
--   out for a while, so it cannot stop the others being served.
-- * next_claim_in answers NULL when nothing is queued (idle workers wait);
--   retry() allows one more attempt even at the attempts bound.
-- * Pruning finished tasks is a function (syncq.prune_finished) that runs
--   as its owner, so the worker role needs no DELETE on syncq.tasks.
-- The roles' grants themselves are made by `syncq roles` (src/store/roles.rs).

-- Repair rows the new constraints would refuse, as an operator's retry would.
UPDATE syncq.tasks SET max_attempts = 10000 WHERE max_attempts > 10000;
UPDATE syncq.tasks SET attempts = max_attempts WHERE attempts > max_attempts;
UPDATE syncq.tasks SET max_attempts = attempts + 1
WHERE status = 'queued' AND attempts >= max_attempts AND attempts < 10000;
UPDATE syncq.tasks SET attempts = max_attempts - 1
WHERE status = 'queued' AND attempts >= max_attempts;
UPDATE syncq.tasks SET run_at = now() WHERE NOT isfinite(run_at);
UPDATE syncq.tasks SET lease_expires_at = now() WHERE NOT isfinite(lease_expires_at);
UPDATE syncq.datasets SET throttled_until = NULL WHERE NOT isfinite(throttled_until);
UPDATE syncq.datasets SET ready_at = now() WHERE NOT isfinite(ready_at);
UPDATE syncq.datasets SET last_claimed_at = NULL WHERE NOT isfinite(last_claimed_at);

ALTER TABLE syncq.tasks
    ALTER COLUMN id SET GENERATED ALWAYS,
    ADD CONSTRAINT tasks_max_attempts_at_most_10000 CHECK (max_attempts <= 10000),
    ADD CONSTRAINT tasks_attempts_at_most_max_attempts CHECK (attempts <= max_attempts),
    ADD CONSTRAINT tasks_queued_needs_attempts_below_max_attempts
        CHECK (status <> 'queued' OR attempts < max_attempts),
    ADD CONSTRAINT tasks_run_at_finite CHECK (isfinite(run_at)),
    ADD CONSTRAINT tasks_lease_expires_at_finite CHECK (isfinite(lease_expires_at));

ALTER TABLE syncq.datasets
    ADD CONSTRAINT datasets_throttled_until_finite CHECK (isfinite(throttled_until)),
    ADD CONSTRAINT datasets_ready_at_finite CHECK (isfinite(ready_at)),
    ADD CONSTRAINT datasets_last_claimed_at_finite CHECK (isfinite(last_claimed_at));

-- Deletes up to p_batch finished tasks (of p_statuses) that finished more
-- than p_older_than_secs ago, with their error history; returns how many.
-- Runs as its owner: whoever may execute it can prune, and nothing else.
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

DROP FUNCTION syncq.claim(text, text[], text[], int, float8);
DROP FUNCTION syncq.next_claim_in(text[], text[]);

-- Hands `p_limit` ready tasks of `p_kinds` to `p_worker`, round-robin across
-- datasets (of `p_datasets` if given, never of `p_skip`), honouring pause,
-- throttle, max_concurrency and rate_limit.
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
CREATE FUNCTION syncq.claim(p_worker text, p_kinds text[], p_datasets text[], p_skip text[],
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
          AND (p_skip IS NULL OR NOT (d.dataset_id = ANY (p_skip)))
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
            -- Wraps rather than overflows: a token only has to change.
            runs = t.runs % 2147483647 + 1,
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

-- As in 0004, leaving out the datasets this worker set aside, and NULL
-- (nothing to wait for but new work) when no dataset qualifies: 0004's
-- greatest(0, NULL) answered 0, "claimable now", and an idle worker claimed
-- every 5–25 ms instead of waiting for a NOTIFY or its poll.
CREATE FUNCTION syncq.next_claim_in(p_kinds text[], p_datasets text[], p_skip text[])
RETURNS float8
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN w.wait IS NULL THEN NULL
                ELSE greatest(0, extract(epoch FROM w.wait))::float8 END
    FROM (
        SELECT min(greatest(
                   d.ready_at,
                   coalesce(d.throttled_until, now()),
                   CASE WHEN d.rate_limit IS NULL THEN now()
                        ELSE coalesce((SELECT l.started_at + d.rate_window FROM syncq.rate_log l
                                       WHERE l.dataset_id = d.dataset_id
                                         AND l.started_at > now() - d.rate_window
                                       ORDER BY l.started_at DESC
                                       OFFSET d.rate_limit - 1 LIMIT 1), now())
                   END)) - now() AS wait
        FROM syncq.datasets d
        WHERE d.ready_at IS NOT NULL
          AND NOT d.paused
          AND (p_datasets IS NULL OR d.dataset_id = ANY (p_datasets))
          AND (p_skip IS NULL OR NOT (d.dataset_id = ANY (p_skip)))
          AND (d.max_concurrency IS NULL OR d.max_concurrency > (
                SELECT count(*) FROM syncq.tasks r
                WHERE r.dataset_id = d.dataset_id AND r.status = 'running'))
          AND (SELECT true FROM syncq.tasks t
               WHERE t.dataset_id = d.dataset_id AND t.status = 'queued'
                 AND t.kind = ANY (p_kinds) AND NOT t.cancel_requested
               ORDER BY t.priority, t.run_at, t.id
               LIMIT 1)
    ) w
$$;

-- As in 0003; at the attempts bound (10,000) one attempt is given back
-- instead of raising max_attempts past it, so one more is always allowed.
CREATE OR REPLACE FUNCTION syncq.retry(p_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE syncq.tasks
    SET status = 'queued', run_at = now(), finished_at = NULL, cancel_requested = false,
        -- At the bound (10,000) one attempt is given back instead.
        attempts = least(attempts, 9999),
        max_attempts = least(greatest(max_attempts, attempts + 1), 10000)
    WHERE id = ANY (p_ids) AND status IN ('failed', 'cancelled')
    RETURNING id
$$;
