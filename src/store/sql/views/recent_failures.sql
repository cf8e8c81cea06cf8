-- Every failed attempt of the last day, newest first.
CREATE OR REPLACE VIEW syncq.recent_failures AS
SELECT e.task_id, t.dataset_id, t.kind, t.status, e.attempt, e.worker_id, e.error, e.at
FROM syncq.task_errors e
JOIN syncq.tasks t ON t.id = e.task_id
WHERE e.at > now() - interval '1 day'
ORDER BY e.at DESC;
