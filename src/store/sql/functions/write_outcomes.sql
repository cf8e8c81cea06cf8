-- Writes the outcomes of attempts (SPEC §3), each fenced on (id, runs),
-- the holder and status = 'running', in one statement: the tasks' rows,
-- their error history and the throttles of their datasets. Returns the ids
-- written; a task whose lease was lost is left alone while the rest are
-- written. Called by complete_many, which handles rows locked elsewhere.
--
-- One row per task, the arrays side by side: `p_ends[i]` says what the
-- attempt of `p_ids[i]` (its claim's `p_runs[i]`) ended in —
--   succeed   succeeded, `p_results[i]` stored;
--   retry     a counted failure: queued again after `p_secs[i]` (the
--             backoff) while attempts are left, else failed;
--   fail      failed at once (an invalid request);
--   throttle  queued again now, the attempt not counted, and the dataset
--             throttled for `p_secs[i]` (a later throttle already set is
--             kept);
--   release   queued again now, the attempt not counted, the checkpoint
--             kept (a checkpoint command, a fatal error, an aborted
--             handler, a task given back);
--   cancel    cancelled, as its handler reported.
-- Every end but succeed and cancel ends cancelled instead when a cancel
-- was requested meanwhile. `p_errors[i]`, when not NULL, becomes
-- last_error (kept when NULL) and a row of syncq.task_errors.
-- Only `p_take` of the ids are written (complete_many's fallback takes
-- the rows it could lock).
--
-- By primary key, each row's values by its position in the arrays: no
-- join for stale statistics to plan badly. Planned once per connection,
-- as the claim (re-planning every call was most of a small call's cost).
CREATE OR REPLACE FUNCTION syncq.write_outcomes(p_worker text, p_take bigint[], p_ids bigint[],
                                                p_runs int[], p_ends text[], p_results jsonb[],
                                                p_errors text[], p_secs float8[])
RETURNS SETOF bigint
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY
    WITH done AS (
        UPDATE syncq.tasks t
        SET status = (CASE
                WHEN e.end_ = 'succeed' THEN 'succeeded'
                WHEN e.end_ = 'cancel' OR t.cancel_requested THEN 'cancelled'
                WHEN e.end_ IN ('throttle', 'release') THEN 'queued'
                WHEN e.end_ = 'retry' AND t.attempts < t.max_attempts THEN 'queued'
                ELSE 'failed' END)::syncq.task_status,
            result = CASE WHEN e.end_ = 'succeed' THEN p_results[e.i] ELSE t.result END,
            run_at = CASE
                WHEN e.end_ IN ('succeed', 'cancel') OR t.cancel_requested THEN t.run_at
                WHEN e.end_ IN ('throttle', 'release') THEN now()
                WHEN e.end_ = 'retry' AND t.attempts < t.max_attempts
                    THEN now() + make_interval(secs => p_secs[e.i])
                ELSE t.run_at END,
            -- An end that does not count gives its attempt back.
            attempts = CASE WHEN e.end_ IN ('throttle', 'release')
                            THEN greatest(t.attempts - 1, 0) ELSE t.attempts END,
            finished_at = CASE
                WHEN e.end_ IN ('succeed', 'cancel', 'fail') OR t.cancel_requested THEN now()
                WHEN e.end_ = 'retry' AND t.attempts >= t.max_attempts THEN now()
                END,
            last_error = CASE WHEN e.end_ = 'succeed' THEN t.last_error
                              ELSE coalesce(p_errors[e.i], t.last_error) END,
            locked_by = NULL, lease_expires_at = NULL
        FROM (SELECT array_position(p_ids, x.id) AS i, p_ends[array_position(p_ids, x.id)] AS end_, x.id
              FROM unnest(p_take) AS x(id)) e
        WHERE t.id = ANY (p_take) AND t.id = e.id
          AND t.runs = p_runs[e.i]
          AND t.locked_by = p_worker AND t.status = 'running'
        RETURNING t.id, t.dataset_id, t.attempts, e.i, e.end_
    ),
    logged AS (
        -- The attempt an error belongs to: the one that just ended (an end
        -- that does not count gave it back above).
        INSERT INTO syncq.task_errors (task_id, attempt, worker_id, error)
        SELECT d.id, CASE WHEN d.end_ IN ('throttle', 'release') THEN d.attempts + 1 ELSE d.attempts END,
               p_worker, p_errors[d.i]
        FROM done d
        WHERE d.end_ <> 'succeed' AND p_errors[d.i] IS NOT NULL
        ORDER BY d.id
    ),
    throttled AS (
        UPDATE syncq.datasets s
        SET throttled_until = greatest(s.throttled_until, now() + make_interval(secs => m.secs))
        FROM (SELECT d.dataset_id, max(p_secs[d.i]) AS secs FROM done d
              WHERE d.end_ = 'throttle' GROUP BY d.dataset_id) m
        WHERE s.dataset_id = m.dataset_id
    )
    SELECT d.id FROM done d;
END;
$$;
