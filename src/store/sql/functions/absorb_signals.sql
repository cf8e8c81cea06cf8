-- Moves readiness signals into dataset rows, for the claim's step 0. Takes
-- the signals no other claimer is absorbing (SKIP LOCKED), creates the rows
-- of new datasets (default settings, SPEC §2), locks the rows it can (FOR
-- NO KEY UPDATE SKIP LOCKED: a row another claimer holds keeps its signals
-- for a later claim), moves their ready_at earlier and deletes those
-- signals. Security definer: producers and workers need no rights on the
-- signals. Returns the signals absorbed.
CREATE OR REPLACE FUNCTION syncq.absorb_signals() RETURNS int
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- Index scans only (see ready_signals_ready_at_idx), and no JIT: a plan
-- priced out of range by a disabled scan was JIT-compiled on every call.
SET enable_seqscan = off
SET jit = off
AS $$
DECLARE
    v_ctids tid[];
    v_sets text[];
    v_mine text[];
    v_done int;
BEGIN
    SELECT array_agg(s.ctid), array_agg(DISTINCT s.dataset_id) INTO v_ctids, v_sets
    FROM (SELECT r.ctid, r.dataset_id FROM syncq.ready_signals r
          ORDER BY r.ready_at
          LIMIT 10000 FOR UPDATE SKIP LOCKED) s;
    IF v_ctids IS NULL THEN
        RETURN 0;
    END IF;
    -- In one order, so two claimers creating the same new rows cannot
    -- deadlock (the second waits for the first's commit).
    INSERT INTO syncq.datasets (dataset_id)
    SELECT u.dataset_id FROM unnest(v_sets) AS u(dataset_id)
    WHERE NOT EXISTS (SELECT 1 FROM syncq.datasets d WHERE d.dataset_id = u.dataset_id)
    ORDER BY u.dataset_id
    ON CONFLICT (dataset_id) DO NOTHING;
    v_mine := ARRAY(SELECT d.dataset_id FROM syncq.datasets d
                    WHERE d.dataset_id = ANY (v_sets)
                    ORDER BY d.dataset_id
                    FOR NO KEY UPDATE SKIP LOCKED);
    IF cardinality(v_mine) = 0 THEN
        RETURN 0;
    END IF;
    UPDATE syncq.datasets d SET ready_at = s.ready_at
    FROM (SELECT r.dataset_id, min(r.ready_at) AS ready_at FROM syncq.ready_signals r
          WHERE r.ctid = ANY (v_ctids) AND r.dataset_id = ANY (v_mine)
          GROUP BY r.dataset_id) s
    WHERE d.dataset_id = s.dataset_id AND (d.ready_at IS NULL OR d.ready_at > s.ready_at);
    DELETE FROM syncq.ready_signals r WHERE r.ctid = ANY (v_ctids) AND r.dataset_id = ANY (v_mine);
    GET DIAGNOSTICS v_done = ROW_COUNT;
    RETURN v_done;
END;
$$;
REVOKE ALL ON FUNCTION syncq.absorb_signals() FROM PUBLIC;
