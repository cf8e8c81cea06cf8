-- Marks idle those of `p_candidates` left without a task ready at `p_now`:
-- ready_at becomes the earliest run_at of a queued task no worker leased
-- ahead (NULL if none), so they drop out of the claim's scan; a task
-- leased ahead that comes back unstarted signals its dataset again
-- (tasks_requeued). Each is locked FOR UPDATE SKIP LOCKED first (a
-- dataset row another claimer holds is left alone) and looked at again by
-- a later statement, whose snapshot sees every change committed before the
-- lock. A task whose producer has not committed yet is not lost: its
-- readiness signal stays for the next claim to absorb. Used by the claim's
-- step 3 and by refresh_ready(); never JIT-compiled, as the claim.
CREATE OR REPLACE FUNCTION syncq.mark_idle(p_candidates text[], p_now timestamptz)
RETURNS int
LANGUAGE plpgsql
SET enable_seqscan = off
SET jit = off
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
                 AND t.locked_by IS NULL
               ORDER BY t.priority, t.run_at, t.id
               LIMIT 1) IS NULL
        FOR UPDATE OF d SKIP LOCKED);
    IF cardinality(v_idle) = 0 THEN
        RETURN 0;
    END IF;
    UPDATE syncq.datasets d
    SET ready_at = syncq.first_run_at(d.dataset_id)
    WHERE d.dataset_id = ANY (v_idle)
      AND (SELECT true FROM syncq.tasks t
           WHERE t.dataset_id = d.dataset_id AND t.status = 'queued' AND t.run_at <= p_now
             AND t.locked_by IS NULL
           ORDER BY t.priority, t.run_at, t.id
           LIMIT 1) IS NULL;
    GET DIAGNOSTICS v_done = ROW_COUNT;
    RETURN v_done;
END;
$$;
