-- How long until this worker may be able to claim something, in seconds:
-- 0 when a dataset is claimable now (a claim that came back empty lost a
-- race for its lock), the wait for the earliest throttle, rate budget
-- (its own or a shared limit's) or delayed task otherwise. NULL when there is nothing to wait for but new
-- work: nothing this worker handles is queued in a dataset that is not
-- paused, at its concurrency cap or set aside (`p_skip`), and no readiness
-- waits to be absorbed. (An answer of 0 there would make an idle worker
-- claim every 5–25 ms instead of waiting for a NOTIFY or its poll.)
CREATE OR REPLACE FUNCTION syncq.next_claim_in(p_kinds text[], p_datasets text[], p_skip text[])
RETURNS float8
LANGUAGE sql STABLE
-- As the claim: never JIT-compiled (with stale statistics on a churned
-- datasets table its estimate passed jit_above_cost: 12–35 ms a call).
SET jit = off
AS $$
    -- Readiness not yet absorbed (its dataset row was busy, or no claim
    -- has run since) counts as work from its ready_at.
    SELECT CASE WHEN least(w.wait, s.wait) IS NULL THEN NULL
                ELSE greatest(0, extract(epoch FROM least(w.wait, s.wait)))::float8 END
    FROM (SELECT (SELECT r.ready_at FROM syncq.ready_signals r ORDER BY r.ready_at LIMIT 1)
                 - now() AS wait) s,
    (
        SELECT min(greatest(
                   d.ready_at,
                   coalesce(d.throttled_until, now()),
                   CASE WHEN d.rate_limit IS NULL THEN now() ELSE room.at END,
                   -- An adaptive one's pace: its last start plus a spacing.
                   CASE WHEN d.adaptive THEN pace.at ELSE now() END,
                   -- Its shared limits' throttles and windows.
                   CASE WHEN cardinality(d.shared_limits) = 0 THEN now()
                        ELSE syncq.limits_room_at(d.shared_limits, 1, now()) END)) - now() AS wait
        FROM syncq.datasets d
        CROSS JOIN LATERAL syncq.running_count(d.dataset_id) AS r(running)
        CROSS JOIN LATERAL syncq.rate_room_at(d.dataset_id, d.rate_limit, d.rate_window, now()) AS room(at)
        CROSS JOIN LATERAL syncq.rate_room_at(d.dataset_id, 1, syncq.paced_window(d.rate_limit, d.rate_window, d.adapted_from, d.adapted_at, now()),
                                              now()) AS pace(at)
        WHERE d.ready_at IS NOT NULL
          AND NOT d.paused
          AND (p_datasets IS NULL OR d.dataset_id = ANY (p_datasets))
          AND (p_skip IS NULL OR NOT (d.dataset_id = ANY (p_skip)))
          AND (d.max_concurrency IS NULL OR d.max_concurrency > r.running)
          AND NOT syncq.limits_capped(d.shared_limits)
          AND (SELECT true FROM syncq.tasks t
               WHERE t.dataset_id = d.dataset_id AND t.status = 'queued'
                 AND t.locked_by IS NULL
                 AND t.kind = ANY (p_kinds) AND NOT t.cancel_requested
               ORDER BY t.priority, t.run_at, t.id
               LIMIT 1)
    ) w
$$;
