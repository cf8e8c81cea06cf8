-- Shared limits are kept consistent by these triggers (migrations/0008).
--
-- A dataset's shared_limits name limits that exist: sorted and without
-- repeats (claims and permits lock them in that order), each one held
-- FOR KEY SHARE until the change commits, as a foreign key would (an
-- unknown name is refused naming the column).
CREATE OR REPLACE FUNCTION syncq.datasets_shared_limits_check() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_missing text;
BEGIN
    NEW.shared_limits := ARRAY(SELECT DISTINCT u.l FROM unnest(NEW.shared_limits) AS u(l)
                               WHERE u.l IS NOT NULL ORDER BY 1);
    IF cardinality(NEW.shared_limits) = 0 THEN
        RETURN NEW;
    END IF;
    PERFORM 1 FROM syncq.limits l WHERE l.limit_id = ANY (NEW.shared_limits)
    ORDER BY l.limit_id FOR KEY SHARE;
    SELECT u.l INTO v_missing FROM unnest(NEW.shared_limits) AS u(l)
    WHERE NOT EXISTS (SELECT 1 FROM syncq.limits l WHERE l.limit_id = u.l)
    LIMIT 1;
    IF v_missing IS NOT NULL THEN
        RAISE EXCEPTION 'shared_limits: no limit named % (create it in syncq.limits first)', quote_literal(v_missing)
            USING ERRCODE = '23503', COLUMN = 'shared_limits', TABLE = 'datasets', SCHEMA = 'syncq';
    END IF;
    RETURN NEW;
END;
$$;

-- Each limit's list of the datasets using it, kept as they change (its
-- cap counts their running tasks). Locks the limits' rows, so it waits for
-- the claims counting under them.
CREATE OR REPLACE FUNCTION syncq.datasets_shared_limits_listed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_id text := CASE WHEN TG_OP = 'DELETE' THEN OLD.dataset_id ELSE NEW.dataset_id END;
    v_old text[] := CASE WHEN TG_OP = 'INSERT' THEN '{}'::text[] ELSE OLD.shared_limits END;
    v_new text[] := CASE WHEN TG_OP = 'DELETE' THEN '{}'::text[] ELSE NEW.shared_limits END;
BEGIN
    UPDATE syncq.limits l SET datasets = array_remove(l.datasets, v_id)
    WHERE l.limit_id = ANY (v_old) AND NOT (l.limit_id = ANY (v_new));
    UPDATE syncq.limits l SET datasets = array_append(array_remove(l.datasets, v_id), v_id)
    WHERE l.limit_id = ANY (v_new) AND NOT (l.limit_id = ANY (v_old));
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER datasets_shared_limits_listed_insert
    AFTER INSERT ON syncq.datasets
    FOR EACH ROW WHEN (cardinality(NEW.shared_limits) > 0)
    EXECUTE FUNCTION syncq.datasets_shared_limits_listed();
CREATE OR REPLACE TRIGGER datasets_shared_limits_listed_update
    AFTER UPDATE OF shared_limits ON syncq.datasets
    FOR EACH ROW WHEN (OLD.shared_limits IS DISTINCT FROM NEW.shared_limits)
    EXECUTE FUNCTION syncq.datasets_shared_limits_listed();
CREATE OR REPLACE TRIGGER datasets_shared_limits_listed_delete
    AFTER DELETE ON syncq.datasets
    FOR EACH ROW WHEN (cardinality(OLD.shared_limits) > 0)
    EXECUTE FUNCTION syncq.datasets_shared_limits_listed();
CREATE OR REPLACE TRIGGER datasets_shared_limits_check
    BEFORE INSERT OR UPDATE OF shared_limits ON syncq.datasets
    FOR EACH ROW EXECUTE FUNCTION syncq.datasets_shared_limits_check();

-- A limit in use is not removed from under its datasets.
CREATE OR REPLACE FUNCTION syncq.limits_in_use() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_dataset text;
BEGIN
    SELECT d.dataset_id INTO v_dataset FROM syncq.datasets d
    WHERE OLD.limit_id = ANY (d.shared_limits) LIMIT 1;
    IF v_dataset IS NOT NULL THEN
        RAISE EXCEPTION 'limit % is used by dataset % (shared_limits): remove it there first',
            quote_literal(OLD.limit_id), quote_literal(v_dataset)
            USING ERRCODE = '23503', TABLE = 'limits', SCHEMA = 'syncq';
    END IF;
    RETURN OLD;
END;
$$;
CREATE OR REPLACE TRIGGER limits_in_use BEFORE DELETE ON syncq.limits
    FOR EACH ROW EXECUTE FUNCTION syncq.limits_in_use();

-- A change of a limit's rates is exact from its commit, as a dataset's:
-- it takes the limit's row FOR UPDATE, so it waits for the claims and
-- permits counting under the limit (they hold it FOR NO KEY UPDATE), and
-- those after it count with the new rates.
CREATE OR REPLACE FUNCTION syncq.limit_rates_changed() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM 1 FROM syncq.limits l
    WHERE l.limit_id = CASE WHEN TG_OP = 'DELETE' THEN OLD.limit_id ELSE NEW.limit_id END
    FOR UPDATE;
    RETURN NULL;
END;
$$;
CREATE OR REPLACE TRIGGER limit_rates_changed AFTER INSERT OR UPDATE OR DELETE ON syncq.limit_rates
    FOR EACH ROW EXECUTE FUNCTION syncq.limit_rates_changed();
