-- When a dataset's rate budget has room for one more start, seen at
-- `p_at`: `p_at` itself while fewer than `p_limit` starts are logged in
-- the window (see rate_used), else the moment the oldest of the last
-- `p_limit` starts leaves it (the window counted as rate_used counts it,
-- with its guard). Read by next_claim_in, to tell an idle
-- worker how long to wait.
--
-- Inlined as rate_used is; one backward range scan of rate_log_idx,
-- stopping after `p_limit` rows.
CREATE OR REPLACE FUNCTION syncq.rate_room_at(p_dataset text, p_limit int, p_window interval,
                                              p_at timestamptz)
RETURNS SETOF timestamptz
LANGUAGE sql STABLE
AS $$
    SELECT coalesce((SELECT l.started_at + p_window + least(p_window / 20, interval '25 milliseconds')
                     FROM syncq.rate_log l
                     WHERE l.dataset_id = p_dataset
                       AND l.started_at > p_at - p_window - least(p_window / 20, interval '25 milliseconds')
                     ORDER BY l.started_at DESC
                     OFFSET p_limit - 1 LIMIT 1), p_at)
$$;
