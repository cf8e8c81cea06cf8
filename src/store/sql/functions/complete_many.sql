-- The one writer of attempts' outcomes (SPEC §3), and of the starts of
-- tasks leased ahead: a batch of them, of any kind, in one statement —
-- see write_outcomes for what each end does and the arguments. The pool's
-- completer hands every outcome and start here, so a failed, retried,
-- throttled or released attempt costs a busy pool no more round trips
-- than a success (as River's completer), and a short task leased ahead
-- has its start written with its end. Returns the ids written.
--
-- A plain fenced UPDATE, without locking the rows first (SKIP LOCKED cost
-- as much as a third of the write). It waits at most lock_timeout (100 ms)
-- for a row locked elsewhere (an operator's cancel in an open
-- transaction); then it writes the rows it can lock and leaves the others
-- to the caller, which writes them again.
CREATE OR REPLACE FUNCTION syncq.complete_many(p_worker text, p_ids bigint[], p_runs int[],
                                               p_ends text[], p_results jsonb[], p_errors text[],
                                               p_secs float8[], p_ago float8[])
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
        v_done := ARRAY(SELECT syncq.write_outcomes(p_worker, NULL, p_ids, p_runs, p_ends,
                                                    p_results, p_errors, p_secs, p_ago));
    EXCEPTION WHEN lock_not_available THEN
        v_done := ARRAY(SELECT syncq.write_outcomes(
            p_worker,
            ARRAY(SELECT h.id FROM syncq.tasks h
                  WHERE h.id = ANY (p_ids) AND h.locked_by = p_worker
                    AND h.status IN ('running', 'queued')
                  ORDER BY h.id
                  FOR NO KEY UPDATE SKIP LOCKED),
            p_ids, p_runs, p_ends, p_results, p_errors, p_secs, p_ago));
    END;
    RETURN QUERY SELECT unnest(v_done);
END;
$$;
