-- The advisory lock space of limit buckets: (limit_lock_key(), 0..15).
CREATE OR REPLACE FUNCTION syncq.limit_lock_key() RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1937337955 $$;  -- 'sync'
