-- Turns a claim served but could not move (issue 24's CI: weights 1:2:4
-- split 217:358:845 under load). A claim moves each served dataset's
-- place in the round (last_claimed_at) only where it can lock the row at
-- once: waiting would serialise claims on a busy dataset, and could
-- deadlock with a limit being set (the row, then the bucket's advisory
-- lock, against the claim's bucket, then the row). A turn it cannot move
-- is written here instead, and the next claim that moves the dataset adds
-- it and deletes it (the claim's turned and paid steps): no dataset is
-- served for free.
CREATE TABLE syncq.turn_debts (
    id         bigint GENERATED ALWAYS AS IDENTITY,
    dataset_id text   NOT NULL,
    -- How far the dataset's place moves: tasks served × 1 ms / weight.
    secs       float8 NOT NULL
) WITH (
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000
);
-- A dataset's debts, read and deleted by the claim that moves it.
CREATE INDEX turn_debts_dataset_idx ON syncq.turn_debts (dataset_id);
