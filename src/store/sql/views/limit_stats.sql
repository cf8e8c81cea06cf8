-- Each shared limit's windows and their use now, and which datasets use
-- it (migrations/0008): what `syncq limits list`, `syncq status` and the
-- dashboard show. One row per (limit, window); a limit without rates has
-- one row with NULL rate. `running`: the running tasks its cap counts. `used` counts the window as the claim does
-- (limits_room): a little long, by its guard.
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
       syncq.limit_running(l.datasets) AS running
FROM syncq.limits l
LEFT JOIN syncq.limit_rates r ON r.limit_id = l.limit_id;
