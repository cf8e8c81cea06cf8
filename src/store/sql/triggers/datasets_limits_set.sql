-- Limits are exact from the moment they are set. Claims do not lock
-- unlimited datasets' rows (that would serialise them), so a claim that
-- read a dataset as unlimited could still commit starts past a limit set
-- meanwhile. So every claim holds, until it commits, a shared advisory
-- lock on the limit bucket (one of 16, by hash) of each unlimited dataset
-- it serves, and setting the first limit on a dataset takes its bucket
-- exclusively (a trigger): the setting waits for the claims that may have
-- read the dataset unlimited, and claims that start meanwhile leave that
-- bucket's unlimited datasets for their next claim. Every start committed
-- after the setting counts against it.

-- Setting the first limit on a dataset waits for the claims that read it
-- unlimited (see the claim).
CREATE OR REPLACE FUNCTION syncq.datasets_limits_set() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(syncq.limit_lock_key(), syncq.limit_bucket(NEW.dataset_id));
    RETURN NEW;
END;
$$;
-- A first shared limit (shared_limits, migrations/0008) counts as a first
-- limit too.
CREATE OR REPLACE TRIGGER datasets_limits_set
    BEFORE UPDATE OF max_concurrency, rate_limit, shared_limits ON syncq.datasets
    FOR EACH ROW
    WHEN (OLD.max_concurrency IS NULL AND OLD.rate_limit IS NULL AND cardinality(OLD.shared_limits) = 0
          AND (NEW.max_concurrency IS NOT NULL OR NEW.rate_limit IS NOT NULL
               OR cardinality(NEW.shared_limits) > 0))
    EXECUTE FUNCTION syncq.datasets_limits_set();
