-- A permit (SPEC §3): budget a running handler takes before an upstream
-- request after its first (its start was the first). Counted as a start
-- is: `p_n` rows of rate_log (and of limit_log for each shared limit the
-- dataset uses) at this statement's clock, under the dataset's and its
-- limits' row locks — the locks the claim takes to count a limited
-- dataset's starts — so starts and permits of every process share one
-- exact budget, with no counter row and no NOTIFY.
--
-- Fenced: only for task `p_task` still held by `p_worker` in run
-- `p_runs`; NULL otherwise (a handler that lost its lease gets nothing).
-- Returns 0 when granted, else how many seconds until there may be room
-- (the dataset throttled, or its window full: when enough of the
-- window's entries leave it, as rate_room_at counts), for the caller to
-- sleep before asking again. A request for more than the limit itself
-- can never be granted: an error naming it.
CREATE OR REPLACE FUNCTION syncq.take_permit(p_worker text, p_task bigint, p_runs int, p_n int)
RETURNS float8
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    v_dataset text;
    v_d record;
    v_now timestamptz;
    v_room timestamptz;
    v_small record;
    v_window interval;
BEGIN
    IF p_n IS NULL OR p_n < 1 THEN
        RAISE EXCEPTION 'permits: asked for % permits; at least 1', p_n
            USING ERRCODE = '22023';
    END IF;
    SELECT t.dataset_id INTO v_dataset FROM syncq.tasks t
    WHERE t.id = p_task AND t.runs = p_runs AND t.locked_by = p_worker
      AND t.status IN ('running', 'queued');
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT d.rate_limit, d.rate_window, d.throttled_until, d.shared_limits, d.adaptive,
           d.adapted_from, d.adapted_at INTO v_d
    FROM syncq.datasets d WHERE d.dataset_id = v_dataset
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        -- No settings row yet: no limit.
        RETURN 0;
    END IF;
    -- Its shared limits, locked in name order as the claim locks them.
    IF cardinality(v_d.shared_limits) > 0 THEN
        PERFORM 1 FROM syncq.limits l WHERE l.limit_id = ANY (v_d.shared_limits)
        ORDER BY l.limit_id FOR NO KEY UPDATE;
        SELECT r.limit_id, r.rate_limit INTO v_small FROM syncq.limit_rates r
        WHERE r.limit_id = ANY (v_d.shared_limits) AND r.rate_limit < p_n LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'permits: asked for % at once, beyond the rate_limit of limit % (%)',
                p_n, v_small.limit_id, v_small.rate_limit
                USING ERRCODE = '22023';
        END IF;
    END IF;
    -- Read after the locks: every start or permit counted before them has
    -- committed.
    v_now := clock_timestamp();
    IF p_n > v_d.rate_limit THEN
        RAISE EXCEPTION 'permits: asked for % at once, beyond the rate_limit of dataset % (%)',
            p_n, v_dataset, v_d.rate_limit
            USING ERRCODE = '22023';
    END IF;
    -- An adaptive rate limit also paces: p_n permits fit once none was
    -- logged in the last p_n spacings (see effective_rate.sql).
    IF v_d.adaptive THEN
        v_window := p_n * syncq.paced_window(v_d.rate_limit, v_d.rate_window, v_d.adapted_from,
                                             v_d.adapted_at, v_now);
    END IF;
    -- From when there is room for p_n in everything it counts under.
    v_room := greatest(
        coalesce(v_d.throttled_until, v_now),
        CASE WHEN v_d.rate_limit IS NULL THEN v_now
             WHEN (SELECT u.used FROM syncq.rate_used(v_dataset, v_d.rate_window, v_now) AS u(used))
                  + p_n <= v_d.rate_limit THEN v_now
             ELSE (SELECT r.at FROM syncq.rate_room_at(v_dataset, v_d.rate_limit - p_n + 1,
                                                       v_d.rate_window, v_now) AS r(at)) END,
        CASE WHEN v_window IS NULL THEN v_now
             ELSE (SELECT r.at FROM syncq.rate_room_at(v_dataset, 1, v_window, v_now) AS r(at)) END,
        syncq.limits_room_at(v_d.shared_limits, p_n, v_now));
    IF v_room > v_now THEN
        RETURN greatest(extract(epoch FROM v_room - v_now), 0.001);
    END IF;
    IF v_d.rate_limit IS NOT NULL THEN
        INSERT INTO syncq.rate_log (dataset_id, started_at)
        SELECT v_dataset, v_now FROM generate_series(1, p_n);
    END IF;
    INSERT INTO syncq.limit_log (limit_id, at)
    SELECT u.l, v_now FROM unnest(v_d.shared_limits) AS u(l), generate_series(1, p_n);
    RETURN 0;
END;
$$;
