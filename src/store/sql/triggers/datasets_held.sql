-- A dataset paused, throttled or given its first cap or rate limit is
-- announced to every worker (NOTIFY syncq_dataset_held, payload = the
-- dataset id; empty when the id is too long for a payload): a worker gives
-- back, unstarted, the tasks of it that it leased ahead, rather than start
-- them after the change committed (SPEC §6: no handler starts after its
-- dataset's pause). A notification is only a hint — anyone who can
-- connect may send one — and a false one only returns tasks to the fleet.
-- Runs as its owner, as the readiness triggers do.
CREATE OR REPLACE FUNCTION syncq.datasets_held() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- A payload holds under 8000 bytes; an empty one means "any dataset".
    PERFORM pg_notify('syncq_dataset_held',
                      CASE WHEN octet_length(NEW.dataset_id) < 4000 THEN NEW.dataset_id ELSE '' END);
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER datasets_held
    AFTER UPDATE OF paused, throttled_until, max_concurrency, rate_limit, shared_limits ON syncq.datasets
    FOR EACH ROW
    WHEN ((NEW.paused AND NOT OLD.paused)
          OR (NEW.throttled_until IS NOT NULL
              AND NEW.throttled_until IS DISTINCT FROM OLD.throttled_until)
          OR (OLD.max_concurrency IS NULL AND OLD.rate_limit IS NULL AND cardinality(OLD.shared_limits) = 0
              AND (NEW.max_concurrency IS NOT NULL OR NEW.rate_limit IS NOT NULL
                   OR cardinality(NEW.shared_limits) > 0)))
    EXECUTE FUNCTION syncq.datasets_held();
