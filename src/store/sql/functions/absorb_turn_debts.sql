-- Adds the turns claims served but could not move (syncq.turn_debts, see
-- migrations/0006) to their datasets' places in the round, for the
-- claim's step 0, as absorb_signals does with readiness: takes the debts
-- no other claimer is absorbing (SKIP LOCKED), locks the dataset rows it
-- can (a row another claimer holds keeps its debts for a later claim),
-- moves their last_claimed_at on and deletes those debts. A dataset never
-- placed in a round yet (last_claimed_at NULL) has its debt dropped: the
-- claim that places it starts it at the round. Security definer: workers
-- need no rights on the debts beyond adding them. Returns the debts
-- absorbed.
CREATE OR REPLACE FUNCTION syncq.absorb_turn_debts() RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    v_ids bigint[];
    v_sets text[];
    v_mine text[];
    v_done int;
BEGIN
    SELECT array_agg(s.id), array_agg(DISTINCT s.dataset_id) INTO v_ids, v_sets
    FROM (SELECT r.id, r.dataset_id FROM syncq.turn_debts r
          ORDER BY r.id
          LIMIT 1000 FOR UPDATE SKIP LOCKED) s;
    IF v_ids IS NULL THEN
        RETURN 0;
    END IF;
    v_mine := ARRAY(SELECT d.dataset_id FROM syncq.datasets d
                    WHERE d.dataset_id = ANY (v_sets)
                    ORDER BY d.dataset_id
                    FOR NO KEY UPDATE SKIP LOCKED);
    IF cardinality(v_mine) = 0 THEN
        RETURN 0;
    END IF;
    UPDATE syncq.datasets d
    SET last_claimed_at = d.last_claimed_at + make_interval(secs => s.secs)
    FROM (SELECT r.dataset_id, sum(r.secs) AS secs FROM syncq.turn_debts r
          WHERE r.id = ANY (v_ids) AND r.dataset_id = ANY (v_mine)
          GROUP BY r.dataset_id) s
    WHERE d.dataset_id = s.dataset_id AND d.last_claimed_at IS NOT NULL;
    DELETE FROM syncq.turn_debts r WHERE r.id = ANY (v_ids) AND r.dataset_id = ANY (v_mine);
    GET DIAGNOSTICS v_done = ROW_COUNT;
    RETURN v_done;
END;
$$;
REVOKE ALL ON FUNCTION syncq.absorb_turn_debts() FROM PUBLIC;
