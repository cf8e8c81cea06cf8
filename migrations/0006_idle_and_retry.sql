-- syncq schema, version 6: an idle worker waits; retry at the attempts bound.
--
-- * next_claim_in returned 0 ("claimable now") when nothing was queued:
--   greatest(0, NULL) is 0 in PostgreSQL. An idle worker then claimed every
--   5–25 ms instead of waiting for a NOTIFY or its poll interval. It now
--   returns NULL when no dataset qualifies.
-- * syncq.retry() of a task that used all 10,000 attempts could not raise
--   max_attempts past its bound; it now gives back one attempt instead, so
--   one more attempt is always allowed (SPEC §5).

CREATE OR REPLACE FUNCTION syncq.next_claim_in(p_kinds text[], p_datasets text[], p_skip text[])
RETURNS float8
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN w.wait IS NULL THEN NULL
                ELSE greatest(0, extract(epoch FROM w.wait))::float8 END
    FROM (
        SELECT min(greatest(
                   d.ready_at,
                   coalesce(d.throttled_until, now()),
                   CASE WHEN d.rate_limit IS NULL THEN now()
                        ELSE coalesce((SELECT l.started_at + d.rate_window FROM syncq.rate_log l
                                       WHERE l.dataset_id = d.dataset_id
                                         AND l.started_at > now() - d.rate_window
                                       ORDER BY l.started_at DESC
                                       OFFSET d.rate_limit - 1 LIMIT 1), now())
                   END)) - now() AS wait
        FROM syncq.datasets d
        WHERE d.ready_at IS NOT NULL
          AND NOT d.paused
          AND (p_datasets IS NULL OR d.dataset_id = ANY (p_datasets))
          AND (p_skip IS NULL OR NOT (d.dataset_id = ANY (p_skip)))
          AND (d.max_concurrency IS NULL OR d.max_concurrency > (
                SELECT count(*) FROM syncq.tasks r
                WHERE r.dataset_id = d.dataset_id AND r.status = 'running'))
          AND (SELECT true FROM syncq.tasks t
               WHERE t.dataset_id = d.dataset_id AND t.status = 'queued'
                 AND t.kind = ANY (p_kinds) AND NOT t.cancel_requested
               ORDER BY t.priority, t.run_at, t.id
               LIMIT 1)
    ) w
$$;

CREATE OR REPLACE FUNCTION syncq.retry(p_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE syncq.tasks
    SET status = 'queued', run_at = now(), finished_at = NULL, cancel_requested = false,
        -- At the bound (10,000) one attempt is given back instead.
        attempts = least(attempts, 9999),
        max_attempts = least(greatest(max_attempts, attempts + 1), 10000)
    WHERE id = ANY (p_ids) AND status IN ('failed', 'cancelled')
    RETURNING id
$$;
