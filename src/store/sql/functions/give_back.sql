-- Gives back tasks `p_worker` leased ahead (its local queue) and will not
-- start: each (`p_ids[i]`, its lease's `p_runs[i]`) still queued in this
-- worker's name is unleased — claimable again at once, its attempts,
-- times and error history untouched (it never started) — and its dataset
-- is signalled as having work, with a wake-up for idle workers, so a
-- task a busy worker could not start soon is taken by one that can.
-- The rows are found by primary key; `status::text` keeps the planner from
-- reading them off the partial index of every queued task instead (with
-- stale statistics that index looks small). Returns the ids given back.
-- Runs as its owner, as the readiness
-- triggers (workers may not write signals themselves); every name in it is
-- schema-qualified.
CREATE OR REPLACE FUNCTION syncq.give_back(p_worker text, p_ids bigint[], p_runs int[])
RETURNS SETOF bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET enable_seqscan = off
SET jit = off
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    v_back bigint[];
    v_ids bigint[];
    v_runs int[];
BEGIN
    -- Sorted by id, each row's runs found by binary search (width_bucket),
    -- as in write_outcomes.
    SELECT array_agg(e.id ORDER BY e.id), array_agg(e.runs ORDER BY e.id)
    INTO v_ids, v_runs
    FROM unnest(p_ids, p_runs) AS e(id, runs);
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    WITH back AS (
        UPDATE syncq.tasks t
        SET locked_by = NULL, lease_expires_at = NULL
        WHERE t.id = ANY (v_ids)
          AND t.runs = v_runs[width_bucket(t.id, v_ids)]
          AND t.locked_by = p_worker AND t.status::text = 'queued'
        -- Each signals its dataset (the tasks_requeued trigger).
        RETURNING t.id
    )
    SELECT ARRAY(SELECT b.id FROM back b) INTO v_back;
    IF cardinality(v_back) > 0 THEN
        PERFORM pg_notify('syncq_task_inserted', '');
    END IF;
    RETURN QUERY SELECT unnest(v_back);
END;
$$;
