-- A task leased ahead into a worker's local queue is no longer started by
-- the claim: it stays `queued` in the worker's name (locked_by,
-- lease_expires_at) until its handler begins, and its start is written by
-- the one outcome writer, with its end when it ends soon. New argument
-- lists are new functions: the old ones are dropped here, the function
-- files create the new ones.
DROP FUNCTION IF EXISTS syncq.claim(text, text[], text[], text[], int, float8);
DROP FUNCTION IF EXISTS syncq.complete_many(text, bigint[], int[], text[], jsonb[], text[], float8[]);
DROP FUNCTION IF EXISTS syncq.write_outcomes(text, bigint[], bigint[], int[], text[], jsonb[], text[], float8[]);

-- The claim path reads only tasks no worker has leased ahead: a worker's
-- local queue is not in the index the claims of every other worker scan
-- (leased rows in it cost each claim a heap visit per row to skip).
DROP INDEX syncq.tasks_claim_idx;
CREATE INDEX tasks_claim_idx ON syncq.tasks (dataset_id, priority, run_at, id)
    WHERE status = 'queued' AND locked_by IS NULL;

-- Reading the queues (status, the dashboard, metrics, dataset_stats):
-- every queued task, leased ahead or not, by dataset and run_at — what
-- the claim index answered for them before it left leased rows out.
CREATE INDEX tasks_queued_idx ON syncq.tasks (dataset_id, run_at)
    WHERE status = 'queued';

-- The rescuer: held tasks (running, or leased ahead) by lease expiry.
DROP INDEX syncq.tasks_lease_idx;
CREATE INDEX tasks_lease_idx ON syncq.tasks (lease_expires_at)
    WHERE locked_by IS NOT NULL;
