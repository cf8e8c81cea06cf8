-- Per dataset: counts per status, the age of its oldest ready task, and its
-- settings under their column names (SPEC §2). A dataset that has tasks but
-- no row yet (its row is made at its first claim) shows default settings.
CREATE OR REPLACE VIEW syncq.dataset_stats AS
SELECT k.dataset_id,
       count(t.id) FILTER (WHERE t.status = 'queued')    AS queued,
       count(t.id) FILTER (WHERE t.status = 'running')   AS running,
       count(t.id) FILTER (WHERE t.status = 'succeeded') AS succeeded,
       count(t.id) FILTER (WHERE t.status = 'failed')    AS failed,
       count(t.id) FILTER (WHERE t.status = 'cancelled') AS cancelled,
       now() - min(t.run_at) FILTER (WHERE t.status = 'queued' AND t.run_at <= now())
                                                          AS oldest_ready_age,
       d.rate_limit, coalesce(d.rate_window, interval '1 second') AS rate_window,
       d.max_concurrency, coalesce(d.paused, false) AS paused, d.throttled_until,
       coalesce(d.weight, 1) AS weight,
       -- An adaptive rate limit (migrations/0009) and its effective rate
       -- now, in starts per rate_window (see effective_rate.sql); without
       -- one, the configured rate.
       coalesce(d.adaptive, false) AS adaptive,
       round(syncq.effective_rate(d.rate_limit, d.rate_window, d.adapted_from, d.adapted_at,
                                  now())::numeric, 2)::float8 AS effective_rate
FROM (SELECT s.dataset_id FROM syncq.datasets s
      UNION SELECT DISTINCT q.dataset_id FROM syncq.tasks q) k
LEFT JOIN syncq.datasets d ON d.dataset_id = k.dataset_id
LEFT JOIN syncq.tasks t ON t.dataset_id = k.dataset_id
GROUP BY k.dataset_id, d.dataset_id;
