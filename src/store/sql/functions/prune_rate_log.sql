-- Drops rate-log rows that can no longer count (older than their window,
-- or of datasets without a limit). Bounded per call.
CREATE OR REPLACE FUNCTION syncq.prune_rate_log(p_batch int) RETURNS bigint
LANGUAGE sql AS $$
    WITH old AS (
        SELECT l.ctid FROM syncq.rate_log l
        LEFT JOIN syncq.datasets d ON d.dataset_id = l.dataset_id
        WHERE d.rate_limit IS NULL OR l.started_at <= now() - d.rate_window
        LIMIT p_batch
    ), gone AS (
        DELETE FROM syncq.rate_log l USING old WHERE l.ctid = old.ctid RETURNING 1
    )
    SELECT count(*) FROM gone
$$;
