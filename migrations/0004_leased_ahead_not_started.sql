-- A task leased ahead into a worker's local queue is no longer started by
-- the claim: syncq.claim takes how many to start now (p_start) and how
-- long to lease the rest ahead (p_ahead_secs), and syncq.start_leased
-- starts those when a slot frees. A new argument list is a new function,
-- so the old claim is dropped here; the function files create the new one.
DROP FUNCTION IF EXISTS syncq.claim(text, text[], text[], text[], int, float8);
