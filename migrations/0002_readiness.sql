-- How a dataset learns that it has work (SPEC §2: producers only append).
--
-- An insert, and a task put back to queued, only append a readiness signal
-- to syncq.ready_signals; they take no lock on any shared row. (A producer
-- that wrote the dataset row would hold its lock until it commits: two
-- producers inserting into the same datasets in opposite orders would
-- deadlock, and a producer that kept its transaction open would hold up
-- the workers that need the row: their failure writes and lease renewals
-- would wait, and leases run out.)
--
-- Claimers own the dataset rows: every claim first absorbs the signals
-- whose dataset row it can lock — creating the row of a new dataset,
-- moving ready_at earlier — and deletes them. A signal is visible exactly
-- when its task is (same transaction), and stays until a claimer absorbs
-- it, so no wake-up is lost: a claim that marks a dataset idle while a
-- producer is still open leaves that producer's signal for the next claim.
--
-- The trigger functions run as their owner (SECURITY DEFINER), so a
-- producer that may only INSERT tasks still signals readiness and wakes
-- the workers, and a worker need not own the datasets table. search_path
-- is pinned: every name in them is schema-qualified.

-- After each INSERT statement on syncq.tasks: one readiness signal per
-- dataset (its earliest run_at), and a wake-up for idle workers.
-- Statement-level with a transition table, so a 1,000-row insert costs one
-- signal per dataset and one NOTIFY.
CREATE FUNCTION syncq.tasks_after_insert() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- One signal per dataset per statement; no lock on any shared row.
    INSERT INTO syncq.ready_signals (dataset_id, ready_at)
    SELECT n.dataset_id, min(n.run_at) FROM new_tasks n
    WHERE n.status = 'queued' AND NOT n.cancel_requested
    GROUP BY n.dataset_id;
    -- A task inserted already cancelled never starts.
    UPDATE syncq.tasks t SET status = 'cancelled', finished_at = now()
    FROM new_tasks n
    WHERE n.cancel_requested AND n.status = 'queued' AND t.id = n.id;
    PERFORM pg_notify('syncq_task_inserted', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_after_insert
    AFTER INSERT ON syncq.tasks
    REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION syncq.tasks_after_insert();

-- A task that becomes queued again (retry, release, rescue, an operator's
-- UPDATE) or is moved earlier signals its dataset as having work.
CREATE FUNCTION syncq.tasks_requeued() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO syncq.ready_signals (dataset_id, ready_at) VALUES (NEW.dataset_id, NEW.run_at);
    RETURN NULL;
END;
$$;

CREATE TRIGGER tasks_requeued
    AFTER UPDATE OF status, run_at ON syncq.tasks
    FOR EACH ROW
    WHEN (NEW.status = 'queued'
          AND (OLD.status IS DISTINCT FROM 'queued' OR NEW.run_at < OLD.run_at))
    EXECUTE FUNCTION syncq.tasks_requeued();

-- Moves readiness signals into dataset rows, for the claim's step 0. Takes
-- the signals no other claimer is absorbing (SKIP LOCKED), creates the rows
-- of new datasets (default settings, SPEC §2), locks the rows it can (FOR
-- NO KEY UPDATE SKIP LOCKED: a row another claimer holds keeps its signals
-- for a later claim), moves their ready_at earlier and deletes those
-- signals. Security definer: producers and workers need no rights on the
-- signals. Returns the signals absorbed.
CREATE FUNCTION syncq.absorb_signals() RETURNS int
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

-- Marks idle those of `p_candidates` left without a task ready at `p_now`:
-- ready_at becomes the earliest queued run_at (NULL if none), so they drop
-- out of the claim's scan. Each is locked FOR UPDATE SKIP LOCKED first (a
-- dataset row another claimer holds is left alone) and looked at again by
-- a later statement, whose snapshot sees every change committed before the
-- lock. A task whose producer has not committed yet is not lost: its
-- readiness signal stays for the next claim to absorb. Used by the claim's
-- step 3 and by refresh_ready(); never JIT-compiled, as the claim.
CREATE FUNCTION syncq.mark_idle(p_candidates text[], p_now timestamptz)
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
               ORDER BY t.priority, t.run_at, t.id
               LIMIT 1) IS NULL
        FOR UPDATE OF d SKIP LOCKED);
    IF cardinality(v_idle) = 0 THEN
        RETURN 0;
    END IF;
    UPDATE syncq.datasets d
    SET ready_at = (SELECT min(t.run_at) FROM syncq.tasks t
                    WHERE t.dataset_id = d.dataset_id AND t.status = 'queued')
    WHERE d.dataset_id = ANY (v_idle)
      AND (SELECT true FROM syncq.tasks t
           WHERE t.dataset_id = d.dataset_id AND t.status = 'queued' AND t.run_at <= p_now
           ORDER BY t.priority, t.run_at, t.id
           LIMIT 1) IS NULL;
    GET DIAGNOSTICS v_done = ROW_COUNT;
    RETURN v_done;
END;
$$;

-- Repairs ready_at of datasets it says are ready when none of their queued
-- tasks is. Two claimers that take a dataset's last ready tasks side by
-- side each still see the other's (uncommitted) claims as queued in step 3,
-- so neither marks it idle, and step 1 never picks it again to do so; if it
-- also has delayed tasks, ready_at stays in the past and next_claim_in
-- keeps answering "now". A worker calls this after a few such answers in a
-- row. Same protocol as the claim's step 3. Returns the datasets repaired.
-- Never JIT-compiled, as the claim.
CREATE FUNCTION syncq.refresh_ready(p_datasets text[])
RETURNS int
LANGUAGE sql
SET jit = off
AS $$
    SELECT syncq.mark_idle(ARRAY(
        SELECT d.dataset_id FROM syncq.datasets d
        WHERE d.ready_at IS NOT NULL AND d.ready_at <= clock_timestamp()
          AND (p_datasets IS NULL OR d.dataset_id = ANY (p_datasets))), clock_timestamp())
$$;
