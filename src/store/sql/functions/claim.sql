-- The claim (docs/claim.md): hands `p_limit` ready tasks of `p_kinds` to `p_worker`, round-robin across
-- datasets (of `p_datasets` if given, never of `p_skip`), honouring pause,
-- throttle, max_concurrency and rate_limit. `p_skip` holds the datasets the
-- worker has set aside: a dataset whose claim fails for a reason of its own
-- is left out for a while, so it cannot stop the others being served.
--
-- Step 0 absorbs the readiness producers appended (syncq.absorb_signals).
-- Step 1 picks, in turn order, up to ceil(p_limit / 4) datasets that look
-- claimable (syncq.claimable_datasets) in this statement's snapshot. Of those, the ones with a cap or
-- a rate limit are then locked (FOR NO KEY UPDATE SKIP LOCKED: one claimer
-- at a time counts them); the others are not locked: nothing needs
-- counting there, and the task rows' own FOR UPDATE SKIP LOCKED keeps each
-- task with one claimer, so processes claim from one busy dataset side by
-- side instead of taking turns on its row lock. Their limit buckets are
-- held shared instead (see triggers/datasets_limits_set.sql).
-- A dataset using shared limits (syncq.limits) is limited: its limits'
-- rows are locked as well, and its share bounded by their room
-- (limits_room); its starts are logged in limit_log.
-- Step 2 runs with a snapshot taken after those locks: every claim that
-- served a locked dataset before has committed, so its running count and
-- rate log are exact. Each dataset gets at most its share of the slots,
-- its free concurrency and its rate budget; tasks go in (priority, run_at,
-- id) order; the tasks themselves are taken FOR UPDATE SKIP LOCKED, and
-- returned in the order picked.
-- Tasks of datasets with a cap or rate limit start now, up to `p_start`
-- (the slots the pool holds free for them): they are attempts (counted,
-- `started_at` set, logged for the rate limit) as the rows say, counted by
-- the statement that checks their budget under its lock. Tasks of
-- unlimited datasets are leased ahead for the pool's local queue: they
-- stay `queued`, not counted, held in the worker's name (`locked_by`,
-- `lease_expires_at`, renewed by its heartbeat like a running task's),
-- and start when the pool has a slot for them and has not heard them
-- cancelled or their dataset paused; their start is written by the one
-- outcome writer (write_outcomes), with their end when they end soon.
-- Another claim takes one only once that lease ran out (its worker died:
-- nothing to rescue, no attempt counted). NULL `p_start` starts them all.
-- Step 3 records, for each dataset left without ready work, when it may
-- next have some (ready_at), so idle datasets drop out of step 1's scan
-- (syncq.mark_idle).
--
-- Weighted rounds (SPEC §6). A round is one pass over the ready datasets
-- in turn order; `last_claimed_at` is each dataset's place in it, a
-- virtual time: serving n tasks moves it n × 1 ms / weight past the
-- round's start (the earliest place of any ready dataset, so a dataset
-- back from idle starts at the round, not ahead with an old place, nor
-- behind by its idle time); a claim that cannot lock the row at once owes
-- the move (syncq.turn_debts), added by the next claim that moves it; at equal places the one served longest ago
-- (served_at) goes first. Within one claim each dataset's share is
-- ceil(limit × weight / the weights of the claim's turn), its tasks picked
-- weight at a time. Over claims a dataset of weight w is served w times as
-- often as one of weight 1, as long as both are ready and below their
-- limits.
--
-- The quantum is 4 tasks per weight per pass: step 1 visits a quarter as
-- many datasets as the claim takes tasks. With one task per visit, a claim
-- of 500 over 1,000 backlogged datasets visited 500 of them, and each
-- visit costs a probe, a new row version of the dataset (its place in the
-- round) and an idle check: 70–90 ms a claim against 10 ms for one
-- dataset. With 4 it visits 125.
CREATE OR REPLACE FUNCTION syncq.claim(p_worker text, p_kinds text[], p_datasets text[], p_skip text[],
                            p_limit int, p_lease_secs float8,
                            p_start int DEFAULT NULL)
RETURNS TABLE (id bigint, dataset_id text, kind text, payload jsonb, priority smallint,
               attempts int, max_attempts int, runs int, checkpoint jsonb,
               created_at timestamptz, started_at timestamptz, started boolean, snoozes int)
LANGUAGE plpgsql
-- Every statement here is built for index access. The datasets table is
-- small but churns (a new row version per turn), so between vacuums the
-- planner's statistics make a sequential scan look cheaper than it is.
SET enable_seqscan = off
-- Never JIT-compiled: milliseconds of compiling for a statement of
-- microseconds (a disabled scan or stale statistics can push its estimated
-- cost past jit_above_cost).
SET jit = off
-- Planned once per connection, not per call: the statements here are
-- planned for index access whatever their parameters, and re-planning
-- them (a custom plan per call, which plpgsql kept choosing) cost 1–4 ms
-- of a claim of one task that otherwise takes 1 ms.
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_turns text[] := '{}';
    v_limited text[] := '{}';
    v_locked text[];
    v_free text[];
    v_busy int[];
    v_row record;
    -- The round's start: the earliest place among the turn's datasets.
    v_base timestamptz;
    v_start int := least(coalesce(p_start, p_limit), p_limit);
    -- Shared limits: those of the locked datasets, those locked here, and
    -- those a dataset of this turn already counts under.
    v_shared text[];
    v_shared_locked text[];
    v_shared_taken text[] := '{}';
    v_keep text[] := '{}';
    v_got bigint;
BEGIN
    -- Step 0: readiness that producers appended since the last claim.
    PERFORM syncq.absorb_signals();
    -- Up to three passes: a pass that takes nothing because another
    -- claimer holds the rows of its datasets (two processes walk the round
    -- in the same order, and with many small datasets the first claimer's
    -- share of each is all of it) moves on to the next datasets of the
    -- round instead of answering "nothing" — which sent the worker to
    -- next_claim_in, a walk of every ready dataset, and a sleep.
    FOR v_pass IN 1..3 LOOP
        IF v_pass > 1 THEN
            p_skip := coalesce(p_skip, '{}') || v_turns;
            v_turns := '{}';
            v_limited := '{}';
            v_locked := NULL;
            v_base := NULL;
            v_shared_taken := '{}';
            v_keep := '{}';
        END IF;
        FOR v_row IN
            SELECT d.dataset_id,
                   (d.max_concurrency IS NOT NULL OR d.rate_limit IS NOT NULL
                    OR cardinality(d.shared_limits) > 0) AS limited,
                   d.last_claimed_at
            FROM syncq.claimable_datasets(p_kinds, p_datasets, p_skip) d
            ORDER BY d.last_claimed_at NULLS FIRST, d.served_at NULLS FIRST, d.dataset_id
            -- The quantum: a full turn gives each dataset 4 tasks per weight,
            -- so a claim visits a quarter as many datasets as it takes tasks
            -- (each visit costs a probe, a turn and maybe an idle mark).
            LIMIT ceil(p_limit / 4.0)::int
        LOOP
            v_turns := v_turns || v_row.dataset_id;
            IF v_base IS NULL THEN
                v_base := v_row.last_claimed_at;
            END IF;
            IF v_row.limited THEN
                v_limited := v_limited || v_row.dataset_id;
            END IF;
        END LOOP;
        -- Unlimited datasets: hold their limit buckets shared until this
        -- claim commits, so a cap or rate limit set on one of them now waits
        -- for this claim (syncq.datasets_limits_set) and any later claim sees
        -- it. A bucket an operator is setting a limit in is skipped for now.
        v_free := ARRAY(SELECT u.turn_id FROM unnest(v_turns) AS u(turn_id)
                        WHERE NOT (u.turn_id = ANY (v_limited)));
        IF cardinality(v_free) > 0 THEN
            v_busy := ARRAY(SELECT b.bucket
                            FROM (SELECT DISTINCT syncq.limit_bucket(f.dataset_id) AS bucket
                                  FROM unnest(v_free) AS f(dataset_id) ORDER BY 1) b
                            WHERE NOT pg_try_advisory_xact_lock_shared(syncq.limit_lock_key(), b.bucket));
            IF cardinality(v_busy) > 0 THEN
                v_turns := ARRAY(
                    SELECT u.turn_id FROM unnest(v_turns) WITH ORDINALITY AS u(turn_id, n)
                    WHERE u.turn_id = ANY (v_limited)
                       OR NOT (syncq.limit_bucket(u.turn_id) = ANY (v_busy))
                    ORDER BY u.n);
            END IF;
        END IF;
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
            -- Shared limits (migrations/0008): the locked datasets' limits are
            -- locked too, in name order, SKIP LOCKED (a limit another claim or
            -- a permit is counting under is left, with its datasets, for the
            -- next claim), so each limit's log is exact here as a dataset's
            -- is. A dataset is served only if every limit it uses is locked
            -- and no earlier dataset of this turn counts under one of them:
            -- each limit's room is then read for one dataset per claim.
            v_shared := ARRAY(SELECT DISTINCT u.l FROM syncq.datasets d, unnest(d.shared_limits) AS u(l)
                              WHERE d.dataset_id = ANY (v_locked));
            IF cardinality(v_shared) > 0 THEN
                v_shared_locked := ARRAY(SELECT l.limit_id FROM syncq.limits l
                                         WHERE l.limit_id = ANY (v_shared)
                                         ORDER BY l.limit_id
                                         FOR NO KEY UPDATE SKIP LOCKED);
                FOR v_row IN
                    SELECT u.turn_id, d.shared_limits
                    FROM unnest(v_turns) WITH ORDINALITY AS u(turn_id, n)
                    JOIN syncq.datasets d ON d.dataset_id = u.turn_id
                    WHERE u.turn_id = ANY (v_locked)
                    ORDER BY u.n
                LOOP
                    IF cardinality(v_row.shared_limits) = 0
                       OR (v_row.shared_limits <@ v_shared_locked
                           AND NOT (v_row.shared_limits && v_shared_taken)) THEN
                        v_keep := v_keep || v_row.turn_id;
                        v_shared_taken := v_shared_taken || v_row.shared_limits;
                    END IF;
                END LOOP;
                -- The others get no share (turns, below: limited, not locked).
                v_locked := v_keep;
            END IF;
        END IF;
        IF cardinality(v_turns) = 0 THEN
            RETURN;
        END IF;

        RETURN QUERY
        -- The claim's time, read after this statement's snapshot: a task that
        -- finished before the snapshot (not counted as running) has its
        -- finished_at before every start this claim writes.
        WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now),
        turns AS (
            SELECT d.dataset_id, u.turn, d.rate_limit, d.weight, d.last_claimed_at, d.shared_limits,
                   (d.max_concurrency IS NOT NULL OR d.rate_limit IS NOT NULL
                    OR cardinality(d.shared_limits) > 0) AS limited,
                   -- CASE, not coalesce: no counting for a dataset without
                   -- that setting.
                   greatest(0, least(
                       -- A cap or limit set since step 1 on a dataset this claim
                       -- did not lock: skip it now; the next claim locks it.
                       CASE WHEN (d.max_concurrency IS NOT NULL OR d.rate_limit IS NOT NULL
                                  OR cardinality(d.shared_limits) > 0)
                                 AND NOT (d.dataset_id = ANY (coalesce(v_locked, '{}')))
                            THEN 0 END,
                       ceil(p_limit::float8 * d.weight / sum(d.weight) OVER ())::int,
                       -- A limited dataset's tasks are only started, never
                       -- leased ahead.
                       CASE WHEN d.max_concurrency IS NOT NULL OR d.rate_limit IS NOT NULL
                                 OR cardinality(d.shared_limits) > 0
                            THEN v_start END,
                       -- The room its shared limits leave (NULL: none).
                       CASE WHEN cardinality(d.shared_limits) > 0
                            THEN syncq.limits_room(d.shared_limits, clk.now) END,
                       CASE WHEN d.max_concurrency IS NULL THEN p_limit
                            ELSE d.max_concurrency - r.running::int
                       END,
                       CASE WHEN d.rate_limit IS NULL THEN p_limit
                            ELSE d.rate_limit - w.used::int
                       END,
                       -- An adaptive one also paces: 1 per its spacing.
                       CASE WHEN d.adaptive THEN 1 - p.paced::int END
                   )) AS share
            FROM unnest(v_turns) WITH ORDINALITY AS u(dataset_id, turn)
            -- LATERAL: one primary-key probe per turn, not a hash of the table.
            CROSS JOIN LATERAL (SELECT * FROM syncq.datasets d1
                                WHERE d1.dataset_id = u.dataset_id) d
            -- The counts, exact here (see step 2 above), each only where read;
            -- the clock joined, not a sub-select: an argument with a
            -- sub-select would keep rate_used from being inlined.
            CROSS JOIN clock clk
            CROSS JOIN LATERAL syncq.running_count(d.dataset_id) AS r(running)
            CROSS JOIN LATERAL syncq.rate_used(d.dataset_id, d.rate_window, clk.now) AS w(used)
            CROSS JOIN LATERAL syncq.rate_used(d.dataset_id, syncq.paced_window(d.rate_limit, d.rate_window, d.adapted_from, d.adapted_at, clk.now),
                                               clk.now) AS p(paced)
            -- Re-read here: an unlocked dataset may have been paused or
            -- throttled since step 1.
            WHERE NOT d.paused AND (d.throttled_until IS NULL OR d.throttled_until <= (SELECT clk.now FROM clock clk))
        ),
        candidates AS (
            SELECT c.id, turns.dataset_id, turns.turn, turns.weight, turns.limited,
                   row_number() OVER (PARTITION BY turns.dataset_id
                                      ORDER BY c.priority, c.run_at, c.id) AS rank
            FROM turns
            CROSS JOIN LATERAL (
                SELECT t.id, t.priority, t.run_at
                FROM syncq.tasks t
                WHERE t.dataset_id = turns.dataset_id AND t.status = 'queued'
                  AND t.run_at <= (SELECT clk.now FROM clock clk) AND t.kind = ANY (p_kinds) AND NOT t.cancel_requested
                  -- Not leased ahead by a worker (one whose worker died is
                  -- freed by the rescuer once its lease runs out).
                  AND t.locked_by IS NULL
                ORDER BY t.priority, t.run_at, t.id
                LIMIT turns.share
                FOR UPDATE SKIP LOCKED
            ) c
        ),
        ordered AS (
            -- Weight at a time: a dataset of weight 2 gives two tasks per pass.
            SELECT c.id, c.dataset_id, c.limited,
                   row_number() OVER (ORDER BY (c.rank - 1) / c.weight, c.turn, c.rank) AS n
            FROM candidates c
            ORDER BY (c.rank - 1) / c.weight, c.turn, c.rank LIMIT p_limit
        ),
        ranked AS (
            SELECT o.*, row_number() OVER (PARTITION BY o.limited ORDER BY o.n) AS k FROM ordered o
        ),
        picked AS (
            -- Limited datasets' tasks start now, up to v_start (the slots the
            -- pool holds free for them); the rest of them stay queued.
            -- Unlimited datasets' tasks are leased ahead (all of them started
            -- now when p_start is NULL).
            SELECT r.id, r.dataset_id, r.n,
                   (p_start IS NULL OR (r.limited AND r.k <= v_start)) AS start_now
            FROM ranked r
            WHERE NOT r.limited OR r.k <= v_start
        ),
        started AS (
            UPDATE syncq.tasks t
            SET status = 'running',
                attempts = t.attempts + 1,
                -- Wraps rather than overflows: a token only has to change.
                runs = t.runs % 2147483647 + 1,
                locked_by = p_worker,
                lease_expires_at = (SELECT clk.now FROM clock clk) + make_interval(secs => p_lease_secs),
                started_at = (SELECT clk.now FROM clock clk),
                finished_at = NULL
            -- By primary key: a join here was planned as a hash of the table.
            WHERE t.id = ANY (ARRAY(SELECT p.id FROM picked p WHERE p.start_now))
            RETURNING t.id, t.dataset_id, t.kind, t.payload, t.priority, t.attempts,
                      t.max_attempts, t.runs, t.checkpoint, t.created_at, t.started_at, t.snoozes
        ),
        leased AS (
            -- Leased ahead: still queued and uncounted, its last attempt's
            -- times kept; only this worker may start it while its lease lasts.
            UPDATE syncq.tasks t
            SET runs = t.runs % 2147483647 + 1,
                locked_by = p_worker,
                lease_expires_at = (SELECT clk.now FROM clock clk)
                                   + make_interval(secs => p_lease_secs)
            WHERE t.id = ANY (ARRAY(SELECT p.id FROM picked p WHERE NOT p.start_now))
            -- The claim's clock, not the row's started_at (its last attempt's):
            -- the handler's start follows it by the wait in the local queue.
            RETURNING t.id, t.dataset_id, t.kind, t.payload, t.priority, t.attempts,
                      t.max_attempts, t.runs, t.checkpoint, t.created_at,
                      (SELECT clk.now FROM clock clk) AS started_at, t.snoozes
        ),
        claimed AS (
            SELECT s.*, true AS started FROM started s
            UNION ALL
            SELECT l.*, false FROM leased l
        ),
        logged AS (
            INSERT INTO syncq.rate_log (dataset_id, started_at)
            SELECT p.dataset_id, (SELECT clk.now FROM clock clk)
            FROM picked p JOIN turns ON turns.dataset_id = p.dataset_id
            WHERE turns.rate_limit IS NOT NULL AND p.start_now
        ),
        limit_logged AS (
            -- Each start under a shared limit, in its log.
            INSERT INTO syncq.limit_log (limit_id, at)
            SELECT u.l, (SELECT clk.now FROM clock clk)
            FROM picked p JOIN turns ON turns.dataset_id = p.dataset_id
            CROSS JOIN LATERAL unnest(turns.shared_limits) AS u(l)
            WHERE p.start_now
        ),
        turned AS (
            -- A dataset locked by someone else is being claimed, paused or
            -- filled right now: its turn is owed instead (below).
            UPDATE syncq.datasets d
            SET last_claimed_at = greatest(coalesce(d.last_claimed_at, b.base), b.base)
                                  + make_interval(secs => n.picked * 0.001 / d.weight
                                      -- and the moves earlier claims owed it
                                      + coalesce((SELECT sum(o.secs) FROM syncq.turn_debts o
                                                  WHERE o.dataset_id = d.dataset_id), 0)),
                served_at = (SELECT clk.now FROM clock clk)
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
                 -- The datasets served whose rows this claim could lock. The
                 -- lock is applied here, to the picks, so that the join below
                 -- is one primary-key probe per dataset: with `d.dataset_id =
                 -- ANY (locked)` beside it the planner probed the whole
                 -- locked set once per dataset (125 datasets served: 15,000
                 -- rows read, 9 of a 15 ms claim).
                 (SELECT p.dataset_id, count(*) AS picked FROM picked p
                  WHERE p.dataset_id = ANY (ARRAY(
                      SELECT s.dataset_id FROM syncq.datasets s
                      WHERE s.dataset_id = ANY (ARRAY(SELECT DISTINCT p1.dataset_id FROM picked p1))
                      FOR NO KEY UPDATE SKIP LOCKED))
                  GROUP BY p.dataset_id) n
            WHERE d.dataset_id = n.dataset_id
            RETURNING d.dataset_id
        ),
        paid AS (
            -- The debts just added (the same snapshot's rows): only the claim
            -- holding a dataset's row moves it, so no other deletes them.
            DELETE FROM syncq.turn_debts o
            WHERE o.dataset_id IN (SELECT t.dataset_id FROM turned t)
        ),
        owed AS (
            -- The turns not moved, for the next claim that moves the dataset
            -- to add (turned, above): no dataset is served for free.
            INSERT INTO syncq.turn_debts (dataset_id, secs)
            SELECT n.dataset_id, n.picked * 0.001 / turns.weight
            FROM (SELECT p.dataset_id, count(*) AS picked FROM picked p GROUP BY p.dataset_id) n
            JOIN turns ON turns.dataset_id = n.dataset_id
            WHERE NOT EXISTS (SELECT 1 FROM turned t WHERE t.dataset_id = n.dataset_id)
        )
        SELECT c.id, c.dataset_id, c.kind, c.payload, c.priority, c.attempts,
               c.max_attempts, c.runs, c.checkpoint, c.created_at, c.started_at, c.started, c.snoozes
        FROM claimed c JOIN picked p ON p.id = c.id
        -- In the order picked: the pool starts them in this order (its local
        -- queue), so within a dataset by priority, run_at, id, and across
        -- datasets in turn.
        ORDER BY p.n;
        GET DIAGNOSTICS v_got = ROW_COUNT;

        PERFORM syncq.mark_idle(v_turns, clock_timestamp());
        EXIT WHEN v_got > 0;
    END LOOP;
END;
$$;
