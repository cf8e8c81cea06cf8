-- Limits shared by datasets (SPEC §2 Shared limits, issue 26): an upstream
-- limits a credential, often over several windows (5,000 an hour and 10 a
-- second), and every dataset synced with it spends the same budget.
--
-- A limit is a row of syncq.limits with its rates in syncq.limit_rates
-- (one row per window); a dataset uses the limits named in its
-- `shared_limits`. A start or a permit of a dataset needs room in its own
-- rate limit and in every window of every limit it uses; each logs one
-- row per limit in syncq.limit_log, as rate_log does for the dataset's
-- own (see src/store/sql/functions/limits_room.sql and the claim).
CREATE TABLE syncq.limits (
    limit_id        text        PRIMARY KEY
                    CONSTRAINT limits_limit_id_not_empty CHECK (limit_id <> '')
                    CONSTRAINT limits_limit_id_at_most_1000_bytes CHECK (octet_length(limit_id) <= 1000),
    -- At most this many running tasks across every dataset using it.
    max_concurrency int
                    CONSTRAINT limits_max_concurrency_between_1_and_100000
                    CHECK (max_concurrency BETWEEN 1 AND 100000),
    -- The datasets that use it (kept by the datasets_shared_limits_check
    -- trigger): whose running tasks its cap counts.
    datasets        text[]      NOT NULL DEFAULT '{}',
    -- Set by a handler's RateLimited on any dataset using the limit: no
    -- start or permit under it before then.
    throttled_until timestamptz
                    CONSTRAINT limits_throttled_until_before_year_10000 CHECK (throttled_until < '10000-01-01'),
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE syncq.limit_rates (
    limit_id    text     NOT NULL REFERENCES syncq.limits ON DELETE CASCADE,
    rate_limit  int      NOT NULL
                CONSTRAINT limit_rates_rate_limit_between_1_and_1000000 CHECK (rate_limit BETWEEN 1 AND 1000000),
    rate_window interval NOT NULL
                CONSTRAINT limit_rates_rate_window_positive CHECK (rate_window > interval '0')
                CONSTRAINT limit_rates_rate_window_at_most_1_day CHECK (rate_window <= interval '1 day'),
    PRIMARY KEY (limit_id, rate_window)
);

ALTER TABLE syncq.datasets
    ADD COLUMN shared_limits text[] NOT NULL DEFAULT '{}'
        CONSTRAINT datasets_shared_limits_at_most_16 CHECK (cardinality(shared_limits) <= 16);

-- Starts and permits under each limit, by time (pruned past its longest
-- window, with prune_rate_log).
CREATE TABLE syncq.limit_log (
    limit_id text        NOT NULL,
    at       timestamptz NOT NULL
) WITH (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000
);
CREATE INDEX limit_log_idx ON syncq.limit_log (limit_id, at);
