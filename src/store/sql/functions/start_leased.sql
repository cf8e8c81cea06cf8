-- Starts tasks `p_worker` leased ahead (syncq.claim's `p_start`), now that
-- it has a slot for each: the handler start the rows record (SPEC §2). Of
-- each (`p_ids[i]`, its lease's `p_runs[i]`) still queued in this
-- worker's name —
--   startable (its dataset not paused, not throttled, still without a cap
--   or rate limit, its run_at not moved later): `running`, the attempt
--   counted, `started_at` now, leased for `p_lease_secs`;
--   not startable: given back (syncq.give_back), never started.
-- A task cancelled meanwhile is `cancelled` already (the cancel trigger)
-- and, as one lost to another worker, is not in the answer: its holder
-- must not start it. Returns (id, started, attempts, started_at).
--
-- The rows are found by primary key (`status::text`: see give_back.sql).
-- The dataset's limit bucket is held shared, as the claim holds it for
-- unlimited datasets: a cap or rate limit being set waits for this start,
-- or this start sees it and gives the task back (a bucket being set is
-- given back too).
CREATE OR REPLACE FUNCTION syncq.start_leased(p_worker text, p_ids bigint[], p_runs int[],
                                              p_lease_secs float8)
RETURNS TABLE (id bigint, started boolean, attempts int, started_at timestamptz)
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    v_ids bigint[];
    v_runs int[];
    v_busy int[];
    v_go bigint[];
    v_back bigint[];
BEGIN
    -- Sorted by id, each row's runs found by binary search (width_bucket),
    -- as in write_outcomes.
    SELECT array_agg(e.id ORDER BY e.id), array_agg(e.runs ORDER BY e.id)
    INTO v_ids, v_runs
    FROM unnest(p_ids, p_runs) AS e(id, runs);
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    v_busy := ARRAY(
        SELECT b.bucket
        FROM (SELECT DISTINCT syncq.limit_bucket(t.dataset_id) AS bucket
              FROM syncq.tasks t WHERE t.id = ANY (v_ids) ORDER BY 1) b
        WHERE NOT pg_try_advisory_xact_lock_shared(syncq.limit_lock_key(), b.bucket));
    -- Read after the buckets are held: a limit set before is seen.
    SELECT coalesce(array_agg(v.id) FILTER (WHERE v.go), '{}'),
           coalesce(array_agg(v.id) FILTER (WHERE NOT v.go), '{}')
    INTO v_go, v_back
    FROM (SELECT t.id,
                 (NOT d.paused
                  AND (d.throttled_until IS NULL OR d.throttled_until <= now())
                  AND d.max_concurrency IS NULL AND d.rate_limit IS NULL
                  AND NOT (syncq.limit_bucket(t.dataset_id) = ANY (v_busy))
                  AND t.run_at <= now()) AS go
          FROM syncq.tasks t
          JOIN syncq.datasets d ON d.dataset_id = t.dataset_id
          WHERE t.id = ANY (v_ids)
            AND t.runs = v_runs[width_bucket(t.id, v_ids)]
            AND t.locked_by = p_worker AND t.status::text = 'queued') v;
    IF cardinality(v_back) > 0 THEN
        PERFORM syncq.give_back(p_worker, v_back,
                                ARRAY(SELECT v_runs[width_bucket(b.id, v_ids)]
                                      FROM unnest(v_back) AS b(id)));
    END IF;
    RETURN QUERY
    WITH clock AS MATERIALIZED (SELECT clock_timestamp() AS now),
    started AS (
        UPDATE syncq.tasks t
        SET status = 'running',
            attempts = t.attempts + 1,
            started_at = (SELECT clk.now FROM clock clk),
            finished_at = NULL,
            lease_expires_at = (SELECT clk.now FROM clock clk) + make_interval(secs => p_lease_secs)
        -- Fenced again: a cancel may have committed since the read above.
        WHERE t.id = ANY (v_go)
          AND t.runs = v_runs[width_bucket(t.id, v_ids)]
          AND t.locked_by = p_worker AND t.status::text = 'queued' AND NOT t.cancel_requested
        RETURNING t.id, t.attempts, t.started_at
    )
    SELECT s.id, true, s.attempts, s.started_at FROM started s
    UNION ALL
    SELECT b.id, false, NULL::int, NULL::timestamptz FROM unnest(v_back) AS b(id);
END;
$$;
