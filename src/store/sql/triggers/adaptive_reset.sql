-- What an adaptive limit learned (adapted_from, adapted_at; migrations/
-- 0009) is about the rate it was configured with: a new rate, window or
-- adaptive setting starts again from the configured rate, however it is
-- set (the CLI, the dashboard, a plain UPDATE).
CREATE OR REPLACE FUNCTION syncq.adaptive_reset() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    NEW.adapted_from := NULL;
    NEW.adapted_at := NULL;
    RETURN NEW;
END;
$$;
CREATE OR REPLACE TRIGGER datasets_adaptive_reset
    BEFORE UPDATE OF rate_limit, rate_window, adaptive ON syncq.datasets
    FOR EACH ROW
    WHEN (OLD.rate_limit IS DISTINCT FROM NEW.rate_limit
          OR OLD.rate_window IS DISTINCT FROM NEW.rate_window
          OR OLD.adaptive IS DISTINCT FROM NEW.adaptive)
    EXECUTE FUNCTION syncq.adaptive_reset();
CREATE OR REPLACE TRIGGER limits_adaptive_reset
    BEFORE UPDATE OF adaptive ON syncq.limits
    FOR EACH ROW
    WHEN (OLD.adaptive IS DISTINCT FROM NEW.adaptive)
    EXECUTE FUNCTION syncq.adaptive_reset();
-- A shared limit's rates changed (plain SQL on limit_rates): what it
-- learned is forgotten too.
CREATE OR REPLACE FUNCTION syncq.limit_rates_adaptive_reset() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE syncq.limits SET adapted_from = NULL, adapted_at = NULL
    WHERE limit_id = CASE WHEN TG_OP = 'DELETE' THEN OLD.limit_id ELSE NEW.limit_id END
      AND adapted_at IS NOT NULL;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER limit_rates_adaptive_reset
    AFTER INSERT OR UPDATE OR DELETE ON syncq.limit_rates
    FOR EACH ROW
    EXECUTE FUNCTION syncq.limit_rates_adaptive_reset();
