-- Puts failed or cancelled tasks back to queued, keeping their attempts and
-- error history, and raising max_attempts when needed so at least one more
-- attempt is allowed (as River and Oban do); at the attempts bound (10,000)
-- one attempt is given back instead of raising max_attempts past it.
-- Returns the ids retried; ids of tasks that are not failed or cancelled
-- are left alone.
--   SELECT syncq.retry(ARRAY[42]);
CREATE OR REPLACE FUNCTION syncq.retry(p_ids bigint[]) RETURNS SETOF bigint
LANGUAGE sql AS $$
    UPDATE syncq.tasks
    SET status = 'queued', run_at = now(), finished_at = NULL, cancel_requested = false, snoozes = 0,
        -- At the bound (10,000) one attempt is given back instead.
        attempts = least(attempts, 9999),
        max_attempts = least(greatest(max_attempts, attempts + 1), 10000)
    WHERE id = ANY (p_ids) AND status IN ('failed', 'cancelled')
    RETURNING id
$$;
