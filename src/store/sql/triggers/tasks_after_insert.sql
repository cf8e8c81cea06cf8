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
CREATE OR REPLACE FUNCTION syncq.tasks_after_insert() RETURNS trigger
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
CREATE OR REPLACE TRIGGER tasks_after_insert
    AFTER INSERT ON syncq.tasks
    REFERENCING NEW TABLE AS new_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION syncq.tasks_after_insert();
