-- Each shared limit's windows and their use now, and which datasets use
-- it (migrations/0008): what `syncq limits list`, `syncq status` and the
-- dashboard show. One row per (limit, window); a limit without rates has
-- one row with NULL rate. `running`: the running tasks its cap counts. `used` counts the window as the claim does
-- (limits_room): a little long, by its guard. `adaptive`, `effective_rate`:
-- see below.
CREATE OR REPLACE VIEW syncq.limit_stats AS
SELECT l.limit_id, r.rate_limit, r.rate_window,
       CASE WHEN r.rate_window IS NULL THEN 0 ELSE
           (SELECT count(*) FROM syncq.limit_log g
            WHERE g.limit_id = l.limit_id
              AND g.at > now() - r.rate_window - least(r.rate_window / 20, interval '25 milliseconds'))
       END AS used,
       l.throttled_until,
       ARRAY(SELECT u.d FROM unnest(l.datasets) AS u(d) ORDER BY 1) AS datasets,
       l.max_concurrency,
       syncq.limit_running(l.datasets) AS running,
       -- An adaptive limit (migrations/0009): its effective rate now, per
       -- the window of its shortest rate (see effective_rate.sql).
       l.adaptive,
       CASE WHEN l.adaptive THEN
           (SELECT round(syncq.effective_rate(r1.rate_limit, r1.rate_window, l.adapted_from,
                                              l.adapted_at, now())::numeric, 2)::float8
            FROM syncq.limit_rates r1 WHERE r1.limit_id = l.limit_id
            ORDER BY r1.rate_window LIMIT 1)
       END AS effective_rate
FROM syncq.limits l
LEFT JOIN syncq.limit_rates r ON r.limit_id = l.limit_id;
