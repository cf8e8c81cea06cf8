-- The one text of "this dataset is claimable now", read by the claim's
-- step 1 and by the pool when it looks for the dataset that makes claims
-- fail (src/store/tasks/claim.rs, claim_candidates).
--
-- A dataset is claimable when it is marked ready (ready_at passed), not
-- paused, not throttled, in the worker's dataset filter (p_datasets, NULL
-- for all) and not set aside by it (p_skip), apparently under its cap and
-- its rate budget and the room of its shared limits (step 2 counts again
-- under the locks), and it has a ready
-- task of a kind the worker handles that no worker has leased ahead.
--
-- Written to be inlined: one SELECT, LANGUAGE sql, STABLE, not STRICT, no
-- SET clause. The planner expands it in the caller's query, so each caller
-- is planned as if the text were written out there (a function scan would
-- read every claimable dataset before the caller's ORDER BY ... LIMIT).
-- The caller orders (turn order: last_claimed_at NULLS FIRST, served_at
-- NULLS FIRST, dataset_id, datasets_turn_idx) and limits.
CREATE OR REPLACE FUNCTION syncq.claimable_datasets(p_kinds text[], p_datasets text[], p_skip text[])
RETURNS SETOF syncq.datasets
LANGUAGE sql STABLE
AS $$
    SELECT d.* FROM syncq.datasets d
    -- The cap's and the rate limit's counts (running_count, rate_used),
    -- each computed only for a dataset with that setting.
    CROSS JOIN LATERAL syncq.running_count(d.dataset_id) AS r(running)
    CROSS JOIN LATERAL syncq.rate_used(d.dataset_id, d.rate_window, now()) AS u(used)
    -- An adaptive rate limit also paces (effective_rate.sql): no start
    -- logged in its last spacing.
    CROSS JOIN LATERAL syncq.rate_used(d.dataset_id, syncq.paced_window(d.rate_limit, d.rate_window, d.adapted_from, d.adapted_at, now()),
                                       now()) AS p(paced)
    WHERE d.ready_at IS NOT NULL AND d.ready_at <= now()
      AND NOT d.paused
      AND (d.throttled_until IS NULL OR d.throttled_until <= now())
      AND (p_datasets IS NULL OR d.dataset_id = ANY (p_datasets))
      AND (p_skip IS NULL OR NOT (d.dataset_id = ANY (p_skip)))
      AND (d.max_concurrency IS NULL OR d.max_concurrency > r.running)
      AND (d.rate_limit IS NULL OR d.rate_limit > u.used)
      AND CASE WHEN d.adaptive THEN p.paced = 0 ELSE true END
      -- Room in every shared limit it uses (not throttled, every window).
      AND (cardinality(d.shared_limits) = 0
           OR coalesce(syncq.limits_room(d.shared_limits, now()), 1) > 0)
      -- A correlated scalar subquery, not EXISTS (which the planner turns
      -- into a hash semi-join over every queued task), ordered as
      -- tasks_claim_idx so it is one index probe.
      AND (SELECT true FROM syncq.tasks t
           WHERE t.dataset_id = d.dataset_id AND t.status = 'queued'
             AND t.run_at <= now() AND t.kind = ANY (p_kinds) AND NOT t.cancel_requested
             -- Not leased ahead by a worker.
             AND t.locked_by IS NULL
           ORDER BY t.priority, t.run_at, t.id
           LIMIT 1)
$$;
