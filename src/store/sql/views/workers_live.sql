-- The workers whose heartbeat is current, with how stale it is.
CREATE OR REPLACE VIEW syncq.workers_live AS
SELECT w.*, now() - w.last_heartbeat_at AS heartbeat_age
FROM syncq.workers w
WHERE w.last_heartbeat_at > now() - 2 * w.heartbeat_every - interval '1 second';
