-- Every outcome of an attempt is now written by syncq.complete_many
-- (src/store/sql/functions/complete_many.sql); succeed_many, which wrote
-- successes only, is gone. Dropping a function for good is a versioned
-- migration's, with its row of syncq.sql_objects.
DROP FUNCTION IF EXISTS syncq.succeed_many(text, bigint[], int[], jsonb[]);
DELETE FROM syncq.sql_objects WHERE name = 'functions/succeed_many';
