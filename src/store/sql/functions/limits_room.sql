-- Shared limits (migrations/0008): the room the limits `p_limits` leave
-- at `p_at`, their one text for the claim, next_claim_in, take_permit and
-- the reports. limits_room: how many more starts or permits fit in every
-- window of every one of them and under every cap (0 while one is
-- throttled; NULL for no limit or only limits without rates or cap). limits_room_at: from when `p_n`
-- more fit in all of them (`p_at` if they fit now). Each window is
-- counted as rate_used counts a dataset's: a little long (a twentieth,
-- 25 ms at most), so the handlers' requests, not only the rows, keep
-- within it. One range scan of limit_log_idx per window.
--
-- Written to be inlined (one SELECT, LANGUAGE sql, STABLE): a dataset
-- without shared limits costs no probe (the CASE).
-- The running tasks of datasets `p_datasets` (a limit's, for its cap): one
-- range of tasks_held_idx each.
CREATE OR REPLACE FUNCTION syncq.limit_running(p_datasets text[])
RETURNS bigint
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(sum(r.running), 0)::bigint
    FROM unnest(p_datasets) AS u(dataset_id)
    CROSS JOIN LATERAL syncq.running_count(u.dataset_id) AS r(running)
$$;

-- The windows a limit counts in: its rates, and for an adaptive limit
-- one more, its pacing (`paced`) — 1 start per spacing of its shortest
-- window at its effective rate (see effective_rate.sql); `p_n` at once
-- need `p_n` quiet spacings. Inlined where it is read.
CREATE OR REPLACE FUNCTION syncq.limit_windows(p_limit text, p_adaptive boolean, p_from float8,
                                               p_at timestamptz, p_now timestamptz)
RETURNS TABLE (rate_limit int, rate_window interval, paced boolean)
LANGUAGE sql STABLE
AS $$
    SELECT r.rate_limit, r.rate_window, false FROM syncq.limit_rates r WHERE r.limit_id = p_limit
    UNION ALL
    SELECT 1, b.rate_window / syncq.effective_rate(b.rate_limit, b.rate_window, p_from, p_at, p_now),
           true
    FROM (SELECT r.rate_limit, r.rate_window FROM syncq.limit_rates r
          WHERE r.limit_id = p_limit ORDER BY r.rate_window LIMIT 1) b
    WHERE p_adaptive
$$;

CREATE OR REPLACE FUNCTION syncq.limits_room(p_limits text[], p_at timestamptz)
RETURNS int
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN cardinality(p_limits) > 0 THEN (
        SELECT greatest(0, min(least(
                   CASE
                       WHEN l.throttled_until > p_at THEN 0
                       WHEN r.rate_limit IS NULL THEN NULL
                       ELSE r.rate_limit - (SELECT count(*) FROM syncq.limit_log g
                                            WHERE g.limit_id = l.limit_id
                                              AND g.at > p_at - r.rate_window
                                                        - least(r.rate_window / 20, interval '25 milliseconds'))::int
                   END,
                   -- Its cap: running tasks of every dataset using it.
                   CASE WHEN l.max_concurrency IS NOT NULL THEN
                       l.max_concurrency - syncq.limit_running(l.datasets)::int
                   END)))
        FROM syncq.limits l
        LEFT JOIN LATERAL syncq.limit_windows(l.limit_id, l.adaptive, l.adapted_from, l.adapted_at, p_at)
                          AS r(rate_limit, rate_window, paced) ON true
        WHERE l.limit_id = ANY (p_limits)) END
$$;

-- Whether one of `p_limits` is at its cap (next_claim_in: a dataset
-- waiting for a running task to end waits for its NOTIFY, not a time).
CREATE OR REPLACE FUNCTION syncq.limits_capped(p_limits text[])
RETURNS boolean
LANGUAGE sql STABLE
AS $$
    SELECT cardinality(p_limits) > 0 AND EXISTS (
        SELECT 1 FROM syncq.limits l
        WHERE l.limit_id = ANY (p_limits) AND l.max_concurrency IS NOT NULL
          AND syncq.limit_running(l.datasets) >= l.max_concurrency)
$$;

CREATE OR REPLACE FUNCTION syncq.limits_room_at(p_limits text[], p_n int, p_at timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE
AS $$
    SELECT CASE WHEN cardinality(p_limits) = 0 THEN p_at ELSE coalesce((
        SELECT max(greatest(
                   coalesce(l.throttled_until, p_at),
                   CASE WHEN r.rate_limit IS NULL THEN p_at ELSE coalesce(
                       -- A pacing window holds p_n starts per p_n spacings.
                       (SELECT g.at + r.rate_window * CASE WHEN r.paced THEN p_n ELSE 1 END
                               + least(r.rate_window * CASE WHEN r.paced THEN p_n ELSE 1 END / 20,
                                       interval '25 milliseconds')
                        FROM syncq.limit_log g
                        WHERE g.limit_id = l.limit_id
                          AND g.at > p_at - r.rate_window * CASE WHEN r.paced THEN p_n ELSE 1 END
                                     - least(r.rate_window * CASE WHEN r.paced THEN p_n ELSE 1 END / 20,
                                             interval '25 milliseconds')
                        ORDER BY g.at DESC
                        OFFSET greatest(CASE WHEN r.paced THEN p_n ELSE r.rate_limit END - p_n, 0) LIMIT 1),
                       p_at) END))
        FROM syncq.limits l
        LEFT JOIN LATERAL syncq.limit_windows(l.limit_id, l.adaptive, l.adapted_from, l.adapted_at, p_at)
                          AS r(rate_limit, rate_window, paced) ON true
        WHERE l.limit_id = ANY (p_limits)), p_at) END
$$;
