-- Deletes up to p_batch finished tasks (of p_statuses) that finished more
-- than p_older_than_secs ago, with their error history; returns how many.
-- Runs as its owner: whoever may execute it can prune, and nothing else;
-- the worker role needs no DELETE on syncq.tasks.
CREATE OR REPLACE FUNCTION syncq.prune_finished(p_older_than_secs float8, p_statuses text[], p_batch int)
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH gone AS (
        DELETE FROM syncq.tasks
        WHERE id IN (
            SELECT id FROM syncq.tasks
            WHERE status IN ('succeeded', 'failed', 'cancelled') AND status::text = ANY (p_statuses)
              AND finished_at < now() - make_interval(secs => greatest(p_older_than_secs, 0))
            LIMIT p_batch
            FOR UPDATE SKIP LOCKED)
        RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
REVOKE ALL ON FUNCTION syncq.prune_finished(float8, text[], int) FROM PUBLIC;
