-- Running tasks with their holders and how much lease they have left.
CREATE OR REPLACE VIEW syncq.running_tasks AS
SELECT t.id, t.dataset_id, t.kind, t.attempts, t.max_attempts, t.locked_by,
       w.host, w.pid, t.started_at, now() - t.started_at AS running_for,
       t.lease_expires_at - now() AS lease_left, t.cancel_requested
FROM syncq.tasks t
LEFT JOIN syncq.workers w ON w.worker_id = t.locked_by
-- Running tasks always have a holder: one range of tasks_held_idx.
WHERE t.status = 'running' AND t.locked_by IS NOT NULL;
