-- Adaptive limits (SPEC §6, migrations/0009): the rate a limit that
-- learns from 429s allows now, in starts per `p_window`. `p_rate` is the
-- configured rate; `p_from` the effective rate when the latest 429
-- without Retry-After came, at `p_at` (both NULL: none yet, or lifted —
-- the configured rate).
--
-- At the 429 the rate drops to 3/4 of `p_from`; then, after every whole
-- clean window, it grows back along a cubic curve, as TCP CUBIC's
-- congestion window does (RFC 8312): fast while far below `p_from`, flat
-- around it, and faster again past it, until the configured rate. So
-- the fleet spends its time just under the rate that drew the 429, probes
-- above it rarely, and climbs back within tens of windows when the
-- upstream is fast again. A plain additive increase has either too many
-- 429s (steps large enough to recover in a minute cross the edge within
-- two or three windows) or too slow a recovery. The curve's steepness is
-- 0.0004 × the configured rate per window³: from 3/4 back to `p_from` in
-- about cbrt(625 × p_from / p_rate) windows. Never below 1% of the
-- configured rate.
--
-- A pure function of its arguments: the rate grows back with nothing
-- written; the row changes only at a 429, at most once per window (see
-- write_outcomes). IMMUTABLE and LANGUAGE sql, so it is inlined where
-- the claim reads it.
CREATE OR REPLACE FUNCTION syncq.effective_rate(p_rate int, p_window interval, p_from float8,
                                                p_at timestamptz, p_now timestamptz)
RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p_from IS NULL OR p_at IS NULL OR p_rate IS NULL THEN p_rate::float8
           ELSE greatest(p_rate * 0.01, least(p_rate::float8,
                    p_from + 0.0004 * p_rate * power(
                        floor(greatest(extract(epoch FROM p_now - p_at), 0)::float8
                              / extract(epoch FROM p_window)::float8)
                        - cbrt(0.25 * p_from / (0.0004 * p_rate)), 3)))
           END
$$;

-- The spacing an adaptive limit keeps between starts: its window over its
-- effective rate. An adaptive limit paces its starts evenly, one per
-- spacing, rather than letting a window's worth go at once: the upstreams
-- that answer 429 without Retry-After are mostly leaky buckets (nginx's
-- limit_req, token buckets with a small burst) that refuse a burst even
-- within their rate. It is counted as a rate limit of 1 in a window of
-- this length, by rate_used and rate_room_at (one more start fits when
-- none is logged in the last spacing).
CREATE OR REPLACE FUNCTION syncq.paced_window(p_rate int, p_window interval, p_from float8,
                                              p_at timestamptz, p_now timestamptz)
RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT p_window / syncq.effective_rate(p_rate, p_window, p_from, p_at, p_now)
$$;
