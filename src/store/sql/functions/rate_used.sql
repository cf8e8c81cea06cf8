-- The rate limit's count, its one text: a dataset's starts logged in the
-- window that ends at `p_at`, (p_at - p_window, p_at] — what its
-- rate_limit bounds (SPEC §2). Read by the claim (step 1 through
-- claimable_datasets, step 2 under the dataset's lock, at the claim's
-- clock), `syncq status`, the dashboard and TaskQueue::stats, through
-- RateLimiter (src/rate_limit.rs) on the Rust side. rate_room_at answers
-- the other question about the same rows: from when there is room.
--
-- The window is counted a little long — by a twentieth, 25 ms at most —
-- because a start is logged at its claim's clock while the upstream sees
-- the handler begin a few milliseconds later, by a delay that varies from
-- claim to claim: the guard keeps the handlers' starts, not only the
-- rows', within the limit in every window.
--
-- Inlined as running_count is (one SELECT, STABLE, no SET clause, called
-- in FROM): the count runs only where the caller reads it, so a dataset
-- without a rate limit costs no probe. One range scan of rate_log_idx.
CREATE OR REPLACE FUNCTION syncq.rate_used(p_dataset text, p_window interval, p_at timestamptz)
RETURNS SETOF bigint
LANGUAGE sql STABLE
AS $$
    SELECT (SELECT count(*) FROM syncq.rate_log l
            WHERE l.dataset_id = p_dataset
              AND l.started_at > p_at - p_window - least(p_window / 20, interval '25 milliseconds'))
$$;
