-- Listening to the upstream (issue 27, SPEC §3 and §6).
--
-- Snoozes: a handler may say "run me again after d" without failing an
-- attempt. `snoozes` counts them, so a handler that snoozes in a loop is
-- bounded (past syncq.max_snoozes() every further snooze counts as a
-- failed attempt, and max_attempts ends it); `syncq retry` resets it.
-- The claim hands each task's snoozes to its worker (so it logs a snooze
-- past the bound as the failed attempt it is): a new result type, so the
-- old function goes; functions/claim.sql creates the new one.
DROP FUNCTION IF EXISTS syncq.claim(text, text[], text[], text[], int, float8, int);

ALTER TABLE syncq.tasks
    ADD COLUMN snoozes int NOT NULL DEFAULT 0
        CONSTRAINT tasks_snoozes_not_negative CHECK (snoozes >= 0);

-- Adaptive limits: a rate limit (a dataset's own, or a shared limit's
-- shortest window) that learns the upstream's real rate from 429s
-- without Retry-After. The state is two values per limit, shared by the
-- fleet: `adapted_from`, the effective rate when the latest 429 came, and
-- `adapted_at`, when. The effective rate is a function of them and the
-- time (syncq.effective_rate): it drops to 3/4 at the 429 and grows back
-- along a cubic curve, so nothing is written while it recovers. NULL:
-- the configured rate.
ALTER TABLE syncq.datasets
    ADD COLUMN adaptive boolean NOT NULL DEFAULT false,
    ADD COLUMN adapted_from float8
        CONSTRAINT datasets_adapted_from_positive CHECK (adapted_from > 0),
    ADD COLUMN adapted_at timestamptz
        CONSTRAINT datasets_adapted_at_before_year_10000 CHECK (adapted_at < '10000-01-01'),
    ADD CONSTRAINT datasets_adaptive_needs_a_rate_limit CHECK (NOT adaptive OR rate_limit IS NOT NULL);

ALTER TABLE syncq.limits
    ADD COLUMN adaptive boolean NOT NULL DEFAULT false,
    ADD COLUMN adapted_from float8
        CONSTRAINT limits_adapted_from_positive CHECK (adapted_from > 0),
    ADD COLUMN adapted_at timestamptz
        CONSTRAINT limits_adapted_at_before_year_10000 CHECK (adapted_at < '10000-01-01');
