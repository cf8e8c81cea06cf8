-- Writes successes, each fenced on (id, runs) and the holder; returns the
-- ids written. A plain fenced UPDATE, without locking the rows first (SKIP
-- LOCKED cost as much as a third of the write). Waits at most lock_timeout
-- (100 ms) for a row locked elsewhere (an operator's cancel in an open
-- transaction); then writes the rows it can lock and leaves the others to
-- the caller, which writes them again. Like the claim, it keeps its plans
-- for the connection's life (plan_cache_mode = force_generic_plan):
-- re-planning every call was most of a small call's cost.
CREATE OR REPLACE FUNCTION syncq.succeed_many(p_worker text, p_ids bigint[], p_runs int[], p_results jsonb[])
RETURNS SETOF bigint
LANGUAGE plpgsql
SET lock_timeout = '100ms'
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_done bigint[];
BEGIN
    BEGIN
        -- By primary key, each row's runs and result by its position in
        -- the arrays: no join for stale statistics to plan badly.
        WITH done AS (
            UPDATE syncq.tasks t
            SET status = 'succeeded', result = p_results[array_position(p_ids, t.id)],
                finished_at = now(), locked_by = NULL, lease_expires_at = NULL
            WHERE t.id = ANY (p_ids)
              AND t.runs = p_runs[array_position(p_ids, t.id)]
              AND t.locked_by = p_worker AND t.status = 'running'
            RETURNING t.id)
        SELECT array_agg(done.id) INTO v_done FROM done;
    EXCEPTION WHEN lock_not_available THEN
        WITH held AS (
            SELECT h.id FROM syncq.tasks h
            WHERE h.id = ANY (p_ids) AND h.locked_by = p_worker AND h.status = 'running'
            ORDER BY h.id
            FOR NO KEY UPDATE SKIP LOCKED),
        done AS (
            UPDATE syncq.tasks t
            SET status = 'succeeded', result = p_results[array_position(p_ids, t.id)],
                finished_at = now(), locked_by = NULL, lease_expires_at = NULL
            WHERE t.id = ANY (ARRAY(SELECT held.id FROM held))
              AND t.runs = p_runs[array_position(p_ids, t.id)]
              AND t.locked_by = p_worker AND t.status = 'running'
            RETURNING t.id)
        SELECT array_agg(done.id) INTO v_done FROM done;
    END;
    RETURN QUERY SELECT unnest(coalesce(v_done, '{}'));
END;
$$;
