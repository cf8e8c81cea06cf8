-- Drops rate-log rows that can no longer count (older than their window
-- as rate_used counts it, guard included, or of datasets without a
-- limit), and the same of limit_log (past its limit's longest window).
-- An adaptive limit paces at one start per window ÷ effective rate, and
-- its effective rate may fall to 1% of the configured one: its rows are
-- kept for the longest spacing that allows (window × 100 ÷ rate), when
-- that is longer than its window. Bounded per call, per log.
CREATE OR REPLACE FUNCTION syncq.prune_rate_log(p_batch int) RETURNS bigint
LANGUAGE sql AS $$
    WITH old AS (
        SELECT l.ctid FROM syncq.rate_log l
        LEFT JOIN syncq.datasets d ON d.dataset_id = l.dataset_id
        WHERE d.rate_limit IS NULL
           OR l.started_at <= now()
                              - CASE WHEN d.adaptive
                                     THEN d.rate_window * greatest(1, 100.0 / d.rate_limit)
                                     ELSE d.rate_window END
                              - least(d.rate_window / 20, interval '25 milliseconds')
        LIMIT p_batch
    ), gone AS (
        DELETE FROM syncq.rate_log l USING old WHERE l.ctid = old.ctid RETURNING 1
    ), limit_old AS (
        SELECT g.ctid FROM syncq.limit_log g
        LEFT JOIN LATERAL (SELECT greatest(max(r.rate_window),
                                           -- An adaptive one's longest spacing.
                                           max(r.rate_window * 100.0 / r.rate_limit)
                                               FILTER (WHERE l.adaptive)) AS w
                           FROM syncq.limit_rates r JOIN syncq.limits l ON l.limit_id = r.limit_id
                           WHERE r.limit_id = g.limit_id) m ON true
        WHERE m.w IS NULL OR g.at <= now() - m.w - least(m.w / 20, interval '25 milliseconds')
        LIMIT p_batch
    ), limit_gone AS (
        DELETE FROM syncq.limit_log g USING limit_old WHERE g.ctid = limit_old.ctid RETURNING 1
    )
    SELECT (SELECT count(*) FROM gone) + (SELECT count(*) FROM limit_gone)
$$;
