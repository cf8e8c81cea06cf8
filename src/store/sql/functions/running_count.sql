-- The cap's count, its one text: how many of a dataset's tasks are
-- running now, across every process (SPEC §2 max_concurrency). Read by
-- the claim (step 1 through claimable_datasets, step 2 under the dataset's
-- lock), next_claim_in, `syncq status` and the dashboard
-- (src/store/reports.rs, src/store/datasets.rs).
--
-- Written to be inlined, as claimable_datasets: one SELECT, LANGUAGE sql,
-- STABLE, no SET clause, a set of one row. Called in FROM (CROSS JOIN
-- LATERAL syncq.running_count(d.dataset_id) AS r(running)), the planner
-- expands it into the caller, and the count is a subplan that runs only
-- where the caller reads it: `d.max_concurrency IS NULL OR
-- d.max_concurrency > r.running` counts nothing for an uncapped dataset.
-- One range of tasks_held_idx (running tasks always have a holder).
CREATE OR REPLACE FUNCTION syncq.running_count(p_dataset text)
RETURNS SETOF bigint
LANGUAGE sql STABLE
AS $$
    SELECT (SELECT count(*) FROM syncq.tasks r
            WHERE r.dataset_id = p_dataset AND r.status = 'running'
              AND r.locked_by IS NOT NULL)
$$;
