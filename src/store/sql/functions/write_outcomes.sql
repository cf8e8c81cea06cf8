-- Writes the outcomes of attempts (SPEC §3), and the starts of attempts
-- of tasks leased ahead, each fenced on (id, runs) and the holder, in one
-- statement: the tasks' rows, their error history and the throttles of
-- their datasets. Returns the ids written; a task whose lease was lost is
-- left alone while the rest are written. Called by complete_many, which
-- handles rows locked elsewhere.
--
-- A task the holder leased ahead (its local queue) is `queued` in its
-- name until its start is written: `p_ago[i]` is then how long ago its
-- handler began, in seconds, by the worker's clock, and the row gets its
-- start — the attempt counted, `started_at` this statement's clock less
-- that — with its end, in the same write. NULL: the start is written
-- already (the row is `running`), or the handler never began (a task
-- leased ahead and released unstarted: its attempts stay as they are).
--
-- One row per task, the arrays side by side: `p_ends[i]` says what the
-- attempt of `p_ids[i]` (its claim's `p_runs[i]`) ended in —
--   start     only the start: `running`, the attempt counted (a task
--             leased ahead whose handler runs longer than the pool
--             waits to write its start with its end);
--   succeed   succeeded, `p_results[i]` stored;
--   retry     a counted failure: queued again after `p_secs[i]` (the
--             backoff) while attempts are left, else failed;
--   fail      failed at once (an invalid request);
--   throttle  a 429 with Retry-After: queued again now, the attempt not
--             counted, and the dataset and every shared limit it uses
--             throttled for `p_secs[i]` (a later throttle already set is
--             kept);
--   slowdown  a 429 without one: as throttle for `p_secs[i]` (the pool's
--             default wait) — unless the dataset counts under an adaptive
--             limit (its own, a shared one): then its adaptive limits
--             lower their effective rate (effective_rate.sql), at most
--             once per window, and nothing is throttled;
--   snooze    queued again at now + `p_secs[i]`, the attempt not counted,
--             nothing throttled, the checkpoint and last_error kept, the
--             task's `snoozes` counted; past syncq.max_snoozes() it is a
--             retry instead (`p_errors[i]` says why), so a handler that
--             snoozes in a loop ends as max_attempts says;
--   release   queued again now, the attempt not counted, the checkpoint
--             kept (a checkpoint command, a fatal error, an aborted
--             handler, a task given back);
--   cancel    cancelled, as its handler reported.
-- Every end but succeed and cancel ends cancelled instead when a cancel
-- was requested meanwhile. `p_errors[i]`, when not NULL, becomes
-- last_error (kept when NULL) and a row of syncq.task_errors.
-- Only `p_take` of the ids are written when it is not NULL (complete_many's
-- fallback takes the rows it could lock).
--
-- The rows are found by primary key (`id = ANY`), with no join for stale
-- statistics to plan badly (a join with the arrays was planned as a scan
-- of every running task, once per outcome: 80 ms for 500). Each row's
-- values are looked up by its position in the arrays, sorted by id first,
-- with width_bucket — a binary search — not array_position, a linear one
-- (20 ms for 500 outcomes against 8). Planned once per connection, as the
-- claim (re-planning every call was most of a small call's cost).
-- The bound of snoozes per task (SPEC §3): past it, a snooze counts as a
-- failed attempt.
CREATE OR REPLACE FUNCTION syncq.max_snoozes() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 100 $$;

CREATE OR REPLACE FUNCTION syncq.write_outcomes(p_worker text, p_take bigint[], p_ids bigint[],
                                                p_runs int[], p_ends text[], p_results jsonb[],
                                                p_errors text[], p_secs float8[], p_ago float8[])
RETURNS SETOF bigint
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_ids bigint[];
    v_runs int[];
    v_ends text[];
    v_results jsonb[];
    v_errors text[];
    v_secs float8[];
    v_ago float8[];
    v_succeeded bigint[];
    v_rest bigint[];
    -- Read first: `p_ago` was measured just before this call was sent.
    v_now timestamptz := clock_timestamp();
BEGIN
    -- Sorted by id, for width_bucket; only those taken.
    SELECT array_agg(e.id ORDER BY e.id), array_agg(e.runs ORDER BY e.id),
           array_agg(e.end_ ORDER BY e.id), array_agg(e.result ORDER BY e.id),
           array_agg(e.error ORDER BY e.id), array_agg(e.secs ORDER BY e.id),
           array_agg(e.ago ORDER BY e.id)
    INTO v_ids, v_runs, v_ends, v_results, v_errors, v_secs, v_ago
    FROM unnest(p_ids, p_runs, p_ends, p_results, p_errors, p_secs, p_ago)
         AS e(id, runs, end_, result, error, secs, ago)
    WHERE p_take IS NULL OR e.id = ANY (p_take);
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    -- Successes first, by a statement of their own: the one end of a
    -- drain, and its values need no per-row sub-select (the general
    -- statement below evaluates one per row, which was half of a
    -- completion's database time: 16-26 µs a task against 9-13 in psql,
    -- 200 a batch). The same fence and the same values as the general
    -- statement gave a succeed; the general one now sees every other end.
    v_succeeded := ARRAY(SELECT e.id FROM unnest(v_ids, v_ends) AS e(id, end_)
                         WHERE e.end_ = 'succeed');
    v_rest := ARRAY(SELECT e.id FROM unnest(v_ids, v_ends) AS e(id, end_)
                    WHERE e.end_ <> 'succeed');
    RETURN QUERY
    UPDATE syncq.tasks t
    SET status = 'succeeded',
        result = v_results[width_bucket(t.id, v_ids)],
        attempts = t.attempts
                   + (t.status = 'queued' AND v_ago[width_bucket(t.id, v_ids)] IS NOT NULL)::int,
        started_at = CASE WHEN t.status = 'queued' AND v_ago[width_bucket(t.id, v_ids)] IS NOT NULL
                          THEN least(v_now - make_interval(
                                         secs => greatest(v_ago[width_bucket(t.id, v_ids)], 0)),
                                     now())
                          ELSE t.started_at END,
        finished_at = now(),
        locked_by = NULL,
        lease_expires_at = NULL
    WHERE t.id = ANY (v_succeeded)
      AND t.runs = v_runs[width_bucket(t.id, v_ids)]
      AND t.locked_by = p_worker
      AND (t.status = 'running' OR (t.status = 'queued' AND NOT t.cancel_requested))
    RETURNING t.id;
    IF cardinality(v_rest) = 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH done AS (
        UPDATE syncq.tasks t
        SET (status, run_at, attempts, started_at, finished_at, last_error,
             locked_by, lease_expires_at, snoozes) = (
            SELECT
                (CASE
                    WHEN e.end_ = 'start' THEN 'running'
                    WHEN e.end_ = 'cancel' OR t.cancel_requested THEN 'cancelled'
                    WHEN e.end_ IN ('throttle', 'slowdown', 'release', 'snooze') THEN 'queued'
                    WHEN e.end_ = 'retry' AND e.a < t.max_attempts THEN 'queued'
                    ELSE 'failed' END)::syncq.task_status,
                CASE
                    WHEN e.end_ IN ('start', 'cancel') OR t.cancel_requested THEN t.run_at
                    WHEN e.end_ IN ('throttle', 'slowdown', 'release') THEN now()
                    WHEN e.end_ = 'snooze' THEN now() + make_interval(secs => v_secs[e.i])
                    WHEN e.end_ = 'retry' AND e.a < t.max_attempts
                        THEN now() + make_interval(secs => v_secs[e.i])
                    ELSE t.run_at END,
                -- An end that does not count gives its attempt back (one
                -- whose handler never began has none to give).
                CASE WHEN e.end_ IN ('throttle', 'slowdown', 'release', 'snooze') AND e.began
                     THEN greatest(e.a - 1, 0) ELSE e.a END,
                -- When the handler began: this statement's clock less how
                -- long ago that was by the worker's monotonic clock (never
                -- after the end written with it).
                CASE WHEN e.starts
                     THEN least(v_now - make_interval(secs => greatest(v_ago[e.i], 0)), now())
                     ELSE t.started_at END,
                CASE
                    WHEN e.end_ = 'start' THEN NULL
                    WHEN e.end_ IN ('cancel', 'fail') OR t.cancel_requested THEN now()
                    WHEN e.end_ = 'retry' AND e.a >= t.max_attempts THEN now()
                    END,
                CASE WHEN e.end_ IN ('start', 'snooze') THEN t.last_error
                     ELSE coalesce(v_errors[e.i], t.last_error) END,
                CASE WHEN e.end_ = 'start' THEN t.locked_by END,
                CASE WHEN e.end_ = 'start' THEN t.lease_expires_at END,
                -- Every snooze counts, also one past the bound (a retry).
                t.snoozes + (v_ends[e.i] = 'snooze')::int
            -- The row's position in the arrays, looked up once; whether
            -- its start is written now (leased ahead, its handler begun),
            -- whether its handler began at all, its attempts with it.
            FROM (SELECT x.i, x.end_, x.starts, x.starts OR t.status = 'running' AS began,
                         t.attempts + x.starts::int AS a
                  FROM (SELECT w.i,
                               -- Past the bound, a snooze is a retry.
                               CASE WHEN v_ends[w.i] = 'snooze' AND t.snoozes >= syncq.max_snoozes()
                                    THEN 'retry' ELSE v_ends[w.i] END AS end_,
                               (t.status = 'queued' AND v_ago[w.i] IS NOT NULL) AS starts
                        FROM (SELECT width_bucket(t.id, v_ids) AS i) w) x) e)
        WHERE t.id = ANY (v_rest)
          AND t.runs = v_runs[width_bucket(t.id, v_ids)]
          AND t.locked_by = p_worker
          -- Held: running, or leased ahead (queued in this worker's name;
          -- a cancel clears the name). Only the latter can start.
          AND (t.status = 'running' OR (t.status = 'queued' AND NOT t.cancel_requested))
          AND (t.status = 'queued' OR v_ends[width_bucket(t.id, v_ids)] <> 'start')
        RETURNING t.id, t.dataset_id, t.attempts, width_bucket(t.id, v_ids) AS i,
                  -- The end as written: a snooze past the bound was a retry.
                  CASE WHEN v_ends[width_bucket(t.id, v_ids)] = 'snooze'
                            AND t.snoozes > syncq.max_snoozes()
                       THEN 'retry' ELSE v_ends[width_bucket(t.id, v_ids)] END AS end_
    ),
    logged AS (
        -- The attempt an error belongs to: the one that just ended (an end
        -- that does not count gave it back above).
        INSERT INTO syncq.task_errors (task_id, attempt, worker_id, error)
        SELECT d.id, CASE WHEN d.end_ IN ('throttle', 'slowdown', 'release') THEN d.attempts + 1
                          ELSE d.attempts END,
               p_worker, v_errors[d.i]
        FROM done d
        WHERE d.end_ NOT IN ('start', 'snooze') AND v_errors[d.i] IS NOT NULL
          -- An end that does not count keeps its attempt's number: at most
          -- 20 of its errors are kept per attempt, so a handler that is
          -- throttled or released in a loop (a 429 with a Retry-After of
          -- 1 ms) cannot grow the history without bound; last_error still
          -- says the latest.
          AND (d.end_ NOT IN ('throttle', 'slowdown', 'release')
               OR (SELECT count(*) FROM (SELECT 1 FROM syncq.task_errors e
                                         WHERE e.task_id = d.id AND e.attempt = d.attempts + 1
                                         LIMIT 20) k) < 20)
        ORDER BY d.id
    ),
    refusals AS (
        -- The 429s, per dataset: the longest Retry-After told, the
        -- default wait of those without one, and whether the dataset
        -- counts under an adaptive limit (its own or a shared one) —
        -- then a 429 without Retry-After lowers that limit's rate and
        -- throttles nothing: the operator named the limit that mirrors
        -- the upstream.
        SELECT s.dataset_id, s.adaptive, s.rate_window, s.shared_limits,
               max(v_secs[d.i]) FILTER (WHERE d.end_ = 'throttle') AS told,
               max(v_secs[d.i]) FILTER (WHERE d.end_ = 'slowdown') AS untold,
               -- (A shared limit adapts only a rate it has.)
               s.adaptive OR EXISTS (SELECT 1 FROM syncq.limits l
                                     WHERE l.limit_id = ANY (s.shared_limits) AND l.adaptive
                                       AND EXISTS (SELECT 1 FROM syncq.limit_rates r
                                                   WHERE r.limit_id = l.limit_id)) AS adapts
        FROM done d
        JOIN syncq.datasets s ON s.dataset_id = d.dataset_id
        WHERE d.end_ IN ('throttle', 'slowdown')
        GROUP BY s.dataset_id
    ),
    throttled AS (
        -- One update per dataset (two updating one row would keep only
        -- one): throttled for the longest wait told, or the default when
        -- nothing of it adapts; an adaptive rate limit lowers its
        -- effective rate instead, at most once per window.
        UPDATE syncq.datasets s
        SET throttled_until = CASE
                WHEN greatest(r.told, CASE WHEN NOT r.adapts THEN r.untold END) IS NULL
                    THEN s.throttled_until
                ELSE greatest(s.throttled_until,
                              now() + make_interval(secs => greatest(
                                  r.told, CASE WHEN NOT r.adapts THEN r.untold END)))
                END,
            adapted_from = CASE WHEN s.adaptive AND r.untold IS NOT NULL
                                     AND (s.adapted_at IS NULL OR s.adapted_at <= now() - s.rate_window)
                                THEN syncq.effective_rate(s.rate_limit, s.rate_window, s.adapted_from,
                                                          s.adapted_at, now())
                                ELSE s.adapted_from END,
            adapted_at = CASE WHEN s.adaptive AND r.untold IS NOT NULL
                                   AND (s.adapted_at IS NULL OR s.adapted_at <= now() - s.rate_window)
                              THEN now() ELSE s.adapted_at END
        FROM refusals r
        WHERE s.dataset_id = r.dataset_id
    ),
    throttled_limits AS (
        -- And every shared limit the dataset uses (SPEC §3): the
        -- credential was refused, for all datasets using it. An adaptive
        -- one adapts as a dataset does, on its shortest window.
        UPDATE syncq.limits l
        SET throttled_until = CASE
                WHEN greatest(m.told, m.untold) IS NULL THEN l.throttled_until
                ELSE greatest(l.throttled_until,
                              now() + make_interval(secs => greatest(m.told, m.untold)))
                END,
            -- Whether it adapts is read from the row being updated (`l`,
            -- re-read after its lock when two workers race), so two 429s
            -- in one window lower it once.
            adapted_from = CASE WHEN l.adaptive AND m.slowdown AND b.rate_window IS NOT NULL
                                     AND (l.adapted_at IS NULL OR l.adapted_at <= now() - b.rate_window)
                                THEN syncq.effective_rate(b.rate_limit, b.rate_window, l.adapted_from,
                                                          l.adapted_at, now())
                                ELSE l.adapted_from END,
            adapted_at = CASE WHEN l.adaptive AND m.slowdown AND b.rate_window IS NOT NULL
                                   AND (l.adapted_at IS NULL OR l.adapted_at <= now() - b.rate_window)
                              THEN now() ELSE l.adapted_at END
        FROM (SELECT u.l AS limit_id, max(r.told) AS told,
                     -- The default wait, from datasets nothing of which adapts.
                     max(r.untold) FILTER (WHERE NOT r.adapts) AS untold,
                     bool_or(r.untold IS NOT NULL) AS slowdown
              FROM refusals r
              CROSS JOIN LATERAL unnest(r.shared_limits) AS u(l)
              GROUP BY u.l) m
        -- Its shortest window (none: a limit with only a cap).
        LEFT JOIN LATERAL (
            SELECT r1.rate_limit, r1.rate_window FROM syncq.limit_rates r1
            WHERE r1.limit_id = m.limit_id
            ORDER BY r1.rate_window LIMIT 1) b ON true
        WHERE l.limit_id = m.limit_id
    )
    SELECT d.id FROM done d;
END;
$$;
