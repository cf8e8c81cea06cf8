-- Fewer index entries per task on the hot path.
--
-- A task is written three times: inserted, claimed (leased ahead or
-- started) and finished. A non-HOT update adds an entry to every index
-- whose predicate the new row version matches, so the layout decides
-- the cost: before this migration a lease ahead added four entries
-- (primary key, tasks_dataset_status_idx, tasks_queued_idx,
-- tasks_lease_idx) and an insert four (primary key, claim, dataset
-- status, queued). In psql, 100 claims of 200 leased-ahead tasks on
-- syncq.tasks wrote 733 bytes of WAL a task, 533 without the two
-- indexes every row version entered (dataset status, queued).
--
-- The new layout splits the tasks by whether a worker holds them:
--   tasks_unheld_idx (dataset_id, status, id) WHERE locked_by IS NULL:
--     what no worker holds — queued and ready or waiting, and finished —
--     for the dashboard's pages (newest first, per status), the counts
--     and retries by dataset;
--   tasks_held_idx (dataset_id, status, id) WHERE locked_by IS NOT NULL:
--     what workers hold — running, or leased ahead (`queued` with a
--     holder) — for the concurrency caps' counts, the running pages and
--     the rescuer (held rows are bounded by the fleet's slots and local
--     queues, so the rescuer reads them all rather than keep an index
--     on lease_expires_at);
-- tasks_queued_idx, tasks_running_idx, tasks_lease_idx and the full
-- tasks_dataset_status_idx go. Now an insert adds three entries
-- (primary key, claim, unheld), a lease ahead or a start two (primary
-- key, held), a finish three (primary key, unheld, finished). A lease
-- renewal changes no indexed column, so it can be a HOT update.
--
-- On a big table, build the two new indexes first without blocking
-- producers, and this migration keeps them:
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_held_idx
--       ON syncq.tasks (dataset_id, status, id) WHERE locked_by IS NOT NULL;
--   CREATE INDEX CONCURRENTLY IF NOT EXISTS tasks_unheld_idx
--       ON syncq.tasks (dataset_id, status, id) WHERE locked_by IS NULL;
-- Workers may run during it; dropping the old indexes takes a brief
-- exclusive lock on syncq.tasks.
CREATE INDEX IF NOT EXISTS tasks_held_idx
    ON syncq.tasks (dataset_id, status, id) WHERE locked_by IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_unheld_idx
    ON syncq.tasks (dataset_id, status, id) WHERE locked_by IS NULL;
DROP INDEX IF EXISTS syncq.tasks_queued_idx;
DROP INDEX IF EXISTS syncq.tasks_running_idx;
DROP INDEX IF EXISTS syncq.tasks_lease_idx;
DROP INDEX IF EXISTS syncq.tasks_dataset_status_idx;
