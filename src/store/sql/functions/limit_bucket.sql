-- A dataset's limit bucket, one of 16 (see triggers/datasets_limits_set.sql).
CREATE OR REPLACE FUNCTION syncq.limit_bucket(p_dataset text) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT abs(hashtext(p_dataset) % 16) $$;
