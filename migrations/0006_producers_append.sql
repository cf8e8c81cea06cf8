-- syncq schema, version 6: producers only append (SPEC §2).
--
-- Until now an insert created its dataset's row and moved its ready_at,
-- holding a lock on that row until the producer committed: two producers
-- inserting into the same datasets in opposite orders deadlocked, and a
-- producer that kept its transaction open held up the workers that needed
-- the row (their failure writes and lease renewals waited, leases ran out).
--
-- Now an insert, and a task put back to queued, only append a readiness
-- signal to syncq.ready_signals. Claimers own the dataset rows: every claim
-- first absorbs the signals whose dataset row it can lock — creating the
-- row of a new dataset, moving ready_at earlier — and deletes them. A
-- signal is visible exactly when its task is (same transaction), and stays
-- until a claimer absorbs it, so no wake-up is lost: a claim that marks a
-- dataset idle while a producer is still open leaves that producer's signal
-- for the next claim.

CREATE TABLE syncq.ready_signals (
    dataset_id text        NOT NULL,
    ready_at   timestamptz NOT NULL
);
-- Read through this index, never by a sequential scan: every row is
-- deleted soon after it is written, and an index scan learns to skip the
-- dead entries (a heap scan reads every dead row again until a vacuum).
CREATE INDEX ready_signals_ready_at_idx ON syncq.ready_signals (ready_at);
ALTER TABLE syncq.ready_signals SET (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000
);

CREATE OR REPLACE FUNCTION syncq.tasks_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- One signal per dataset per statement; no lock on any shared row.
    INSERT INTO syncq.ready_signals (dataset_id, ready_at)
    SELECT n.dataset_id, min(n.run_at) FROM new_tasks n
    WHERE n.status = 'queued' AND NOT n.cancel_requested
    GROUP BY n.dataset_id;
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
    INSERT INTO syncq.ready_signals (dataset_id, ready_at) VALUES (NEW.dataset_id, NEW.run_at);
    RETURN NULL;
END;
$$;

-- Moves readiness signals into dataset rows, for the claim's step 0. Takes
-- the signals no other claimer is absorbing (SKIP LOCKED), creates the rows
-- of new datasets (default settings, SPEC §2), locks the rows it can (FOR
-- NO KEY UPDATE SKIP LOCKED: a row another claimer holds keeps its signals
-- for a later claim), moves their ready_at earlier and deletes those
-- signals. Security definer: producers and workers need no rights on the
-- signals. Returns the signals absorbed.
CREATE FUNCTION syncq.absorb_signals() RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Index scans only (see ready_signals_ready_at_idx), and no JIT: a plan
-- priced out of range by a disabled scan was JIT-compiled on every call.
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    v_ctids tid[];
    v_sets text[];
    v_mine text[];
    v_done int;
BEGIN
    SELECT array_agg(s.ctid), array_agg(DISTINCT s.dataset_id) INTO v_ctids, v_sets
    FROM (SELECT r.ctid, r.dataset_id FROM syncq.ready_signals r
          ORDER BY r.ready_at
          LIMIT 10000 FOR UPDATE SKIP LOCKED) s;
    IF v_ctids IS NULL THEN
        RETURN 0;
    END IF;
    -- In one order, so two claimers creating the same new rows cannot
    -- deadlock (the second waits for the first's commit).
    INSERT INTO syncq.datasets (dataset_id)
    SELECT u.dataset_id FROM unnest(v_sets) AS u(dataset_id)
    WHERE NOT EXISTS (SELECT 1 FROM syncq.datasets d WHERE d.dataset_id = u.dataset_id)
    ORDER BY u.dataset_id
    ON CONFLICT (dataset_id) DO NOTHING;
    v_mine := ARRAY(SELECT d.dataset_id FROM syncq.datasets d
                    WHERE d.dataset_id = ANY (v_sets)
                    ORDER BY d.dataset_id
                    FOR NO KEY UPDATE SKIP LOCKED);
    IF cardinality(v_mine) = 0 THEN
        RETURN 0;
    END IF;
    UPDATE syncq.datasets d SET ready_at = s.ready_at
    FROM (SELECT r.dataset_id, min(r.ready_at) AS ready_at FROM syncq.ready_signals r
          WHERE r.ctid = ANY (v_ctids) AND r.dataset_id = ANY (v_mine)
          GROUP BY r.dataset_id) s
    WHERE d.dataset_id = s.dataset_id AND (d.ready_at IS NULL OR d.ready_at > s.ready_at);
    DELETE FROM syncq.ready_signals r WHERE r.ctid = ANY (v_ctids) AND r.dataset_id = ANY (v_mine);
    GET DIAGNOSTICS v_done = ROW_COUNT;
    RETURN v_done;
END;
$$;
REVOKE ALL ON FUNCTION syncq.absorb_signals() FROM PUBLIC;

-- SPEC §2: a dataset's share of starts when datasets compete (§6).
ALTER TABLE syncq.datasets
    ADD COLUMN weight int NOT NULL DEFAULT 1
        CONSTRAINT datasets_weight_between_1_and_1000 CHECK (weight BETWEEN 1 AND 1000),
    -- When it was last served (wall clock): among datasets at the same
    -- place in the round, the one served longest ago goes first.
    ADD COLUMN served_at timestamptz
        CONSTRAINT datasets_served_at_finite CHECK (isfinite(served_at));
UPDATE syncq.datasets SET served_at = last_claimed_at;

-- The claim's scan, in the new turn order.
DROP INDEX syncq.datasets_turn_idx;
CREATE INDEX datasets_turn_idx
    ON syncq.datasets (last_claimed_at NULLS FIRST, served_at NULLS FIRST, dataset_id)
    WHERE ready_at IS NOT NULL;

-- As in 0005, with step 0 (absorb the readiness producers appended) and
-- weighted rounds (SPEC §6). A round is one pass over the ready datasets
-- in turn order; `last_claimed_at` is now each dataset's place in it, a
-- virtual time: serving n tasks moves it n × 1 ms / weight past the
-- round's start (the earliest place of any ready dataset, so a dataset
-- back from idle starts at the round, not ahead with an old place, nor
-- behind by its idle time); at equal places the one served longest ago
-- (served_at) goes first. Within one claim each dataset's
-- share is ceil(limit × weight / the weights of the claim's turn), its
-- tasks picked weight at a time. Over claims a dataset of weight w is
-- served w times as often as one of weight 1, as long as both are ready
-- and below their limits; the quantum is one claim's worth per weight.
CREATE OR REPLACE FUNCTION syncq.claim(p_worker text, p_kinds text[], p_datasets text[], p_skip text[],
                            p_limit int, p_lease_secs float8)
RETURNS TABLE (id bigint, dataset_id text, kind text, payload jsonb, priority smallint,
               attempts int, max_attempts int, runs int, checkpoint jsonb,
               created_at timestamptz, started_at timestamptz)
LANGUAGE plpgsql
-- Every statement here is built for index access. The datasets table is
-- small but churns (a new row version per turn), so between vacuums the
-- planner's statistics make a sequential scan look cheaper than it is.
SET enable_seqscan = off
-- Never JIT-compiled: milliseconds of compiling for a statement of
-- microseconds (a disabled scan or stale statistics can push its estimated
-- cost past jit_above_cost).
SET jit = off
AS $$
#variable_conflict use_column
DECLARE
    v_turns text[] := '{}';
    v_limited text[] := '{}';
    v_locked text[];
    v_row record;
    v_now timestamptz;
    -- The round's start: the earliest place among the turn's datasets.
    v_base timestamptz;
BEGIN
    -- Step 0: readiness that producers appended since the last claim.
    PERFORM syncq.absorb_signals();
    FOR v_row IN
        SELECT d.dataset_id, (d.max_concurrency IS NOT NULL OR d.rate_limit IS NOT NULL) AS limited,
               d.last_claimed_at
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
        ORDER BY d.last_claimed_at NULLS FIRST, d.served_at NULLS FIRST, d.dataset_id
        LIMIT p_limit
    LOOP
        v_turns := v_turns || v_row.dataset_id;
        IF v_base IS NULL THEN
            v_base := v_row.last_claimed_at;
        END IF;
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
        SELECT d.dataset_id, u.turn, d.rate_limit, d.weight, d.last_claimed_at,
               -- CASE, not coalesce: no counting for a dataset without
               -- that setting.
               greatest(0, least(
                   -- A cap or limit set since step 1 on a dataset this claim
                   -- did not lock: skip it now; the next claim locks it.
                   CASE WHEN (d.max_concurrency IS NOT NULL OR d.rate_limit IS NOT NULL)
                             AND NOT (d.dataset_id = ANY (coalesce(v_locked, '{}')))
                        THEN 0 END,
                   ceil(p_limit::float8 * d.weight / sum(d.weight) OVER ())::int,
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
        SELECT c.id, turns.dataset_id, turns.turn, turns.weight,
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
        -- Weight at a time: a dataset of weight 2 gives two tasks per pass.
        SELECT c.id, c.dataset_id FROM candidates c
        ORDER BY (c.rank - 1) / c.weight, c.turn LIMIT p_limit
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
        UPDATE syncq.datasets d
        SET last_claimed_at = greatest(coalesce(d.last_claimed_at, b.base), b.base)
                              + make_interval(secs => n.picked * 0.001 / d.weight),
            served_at = v_now
        -- The round's start: the earliest place in this turn; if the turn
        -- holds only new datasets, the earliest place of a ready dataset
        -- (one index probe); the epoch on a database that never served any.
        FROM (SELECT coalesce(
                  v_base,
                  (SELECT r.last_claimed_at FROM syncq.datasets r
                   WHERE r.ready_at IS NOT NULL AND r.last_claimed_at IS NOT NULL
                   ORDER BY r.last_claimed_at NULLS FIRST, r.served_at NULLS FIRST, r.dataset_id
                   LIMIT 1),
                  timestamptz 'epoch') AS base) b,
             (SELECT p.dataset_id, count(*) AS picked FROM picked p GROUP BY p.dataset_id) n
        WHERE d.dataset_id = n.dataset_id
          AND d.dataset_id = ANY (ARRAY(
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

-- As in 0005, counting readiness not yet absorbed.
CREATE OR REPLACE FUNCTION syncq.next_claim_in(p_kinds text[], p_datasets text[], p_skip text[])
RETURNS float8
LANGUAGE sql STABLE
-- As the claim: never JIT-compiled (with stale statistics on a churned
-- datasets table its estimate passed jit_above_cost: 12–35 ms a call).
SET jit = off
AS $$
    -- Readiness not yet absorbed (its dataset row was busy, or no claim
    -- has run since) counts as work from its ready_at.
    SELECT CASE WHEN least(w.wait, s.wait) IS NULL THEN NULL
                ELSE greatest(0, extract(epoch FROM least(w.wait, s.wait)))::float8 END
    FROM (SELECT (SELECT r.ready_at FROM syncq.ready_signals r ORDER BY r.ready_at LIMIT 1)
                 - now() AS wait) s,
    (
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

-- As in 0003, with datasets that have tasks but no row yet (their row is
-- made at their first claim): default settings; and the weight.
CREATE OR REPLACE VIEW syncq.dataset_stats AS
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

-- The claim's step 3 and the stale-ready repair: never JIT-compiled either.
ALTER FUNCTION syncq.mark_idle(text[], timestamptz) SET jit = off;
ALTER FUNCTION syncq.refresh_ready(text[]) SET jit = off;
