-- A permit (SPEC §3): budget a running handler takes before an upstream
-- request after its first (its start was the first). Counted as a start
-- is: `p_n` rows of rate_log at this statement's clock, under the
-- dataset's row lock — the lock the claim takes to count a limited
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
    SELECT d.rate_limit, d.rate_window, d.throttled_until INTO v_d
    FROM syncq.datasets d WHERE d.dataset_id = v_dataset
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        -- No settings row yet: no limit.
        RETURN 0;
    END IF;
    -- Read after the lock: every start or permit counted before it has
    -- committed.
    v_now := clock_timestamp();
    IF v_d.throttled_until IS NOT NULL AND v_d.throttled_until > v_now THEN
        RETURN extract(epoch FROM v_d.throttled_until - v_now);
    END IF;
    IF v_d.rate_limit IS NULL THEN
        RETURN 0;
    END IF;
    IF p_n > v_d.rate_limit THEN
        RAISE EXCEPTION 'permits: asked for % at once, beyond the rate_limit of dataset % (%)',
            p_n, v_dataset, v_d.rate_limit
            USING ERRCODE = '22023';
    END IF;
    IF (SELECT u.used FROM syncq.rate_used(v_dataset, v_d.rate_window, v_now) AS u(used))
       + p_n > v_d.rate_limit THEN
        SELECT r.at INTO v_room
        FROM syncq.rate_room_at(v_dataset, v_d.rate_limit - p_n + 1, v_d.rate_window, v_now) AS r(at);
        RETURN greatest(extract(epoch FROM v_room - v_now), 0.001);
    END IF;
    INSERT INTO syncq.rate_log (dataset_id, started_at)
    SELECT v_dataset, v_now FROM generate_series(1, p_n);
    RETURN 0;
END;
$$;
