-- Repairs ready_at of datasets it says are ready when none of their queued
-- tasks is. Two claimers that take a dataset's last ready tasks side by
-- side each still see the other's (uncommitted) claims as queued in step 3,
-- so neither marks it idle, and step 1 never picks it again to do so; if it
-- also has delayed tasks, ready_at stays in the past and next_claim_in
-- keeps answering "now". A worker calls this after a few such answers in a
-- row. Same protocol as the claim's step 3. Returns the datasets repaired.
-- Never JIT-compiled, as the claim.
CREATE OR REPLACE FUNCTION syncq.refresh_ready(p_datasets text[])
RETURNS int
LANGUAGE sql
SET jit = off
AS $$
    SELECT syncq.mark_idle(ARRAY(
        SELECT d.dataset_id FROM syncq.datasets d
        WHERE d.ready_at IS NOT NULL AND d.ready_at <= clock_timestamp()
          AND (p_datasets IS NULL OR d.dataset_id = ANY (p_datasets))), clock_timestamp())
$$;
