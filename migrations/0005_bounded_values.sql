-- Every value a producer or operator can write is one the code can
-- represent and print (issue 25): a timestamp past chrono's year 262143
-- (a run_at in year 290000 passed isfinite()) panicked status, tasks,
-- show and an idle worker. Bounded to before year 10000, the range of
-- every tool that reads these rows. Checked for the rows already there.
ALTER TABLE syncq.tasks
    ADD CONSTRAINT tasks_run_at_before_year_10000 CHECK (run_at < '10000-01-01'),
    ADD CONSTRAINT tasks_lease_expires_at_before_year_10000 CHECK (lease_expires_at < '10000-01-01'),
    ADD CONSTRAINT tasks_created_at_before_year_10000 CHECK (created_at < '10000-01-01'),
    ADD CONSTRAINT tasks_started_at_before_year_10000 CHECK (started_at < '10000-01-01'),
    ADD CONSTRAINT tasks_finished_at_before_year_10000 CHECK (finished_at < '10000-01-01'),
    ADD CONSTRAINT tasks_scheduled_for_before_year_10000 CHECK (scheduled_for < '10000-01-01');
ALTER TABLE syncq.datasets
    ADD CONSTRAINT datasets_throttled_until_before_year_10000 CHECK (throttled_until < '10000-01-01'),
    ADD CONSTRAINT datasets_last_claimed_at_before_year_10000 CHECK (last_claimed_at < '10000-01-01'),
    ADD CONSTRAINT datasets_ready_at_before_year_10000 CHECK (ready_at < '10000-01-01'),
    ADD CONSTRAINT datasets_served_at_before_year_10000 CHECK (served_at < '10000-01-01');
ALTER TABLE syncq.schedules
    ADD CONSTRAINT schedules_next_run_at_before_year_10000 CHECK (next_run_at < '10000-01-01'),
    ADD CONSTRAINT schedules_last_run_at_before_year_10000 CHECK (last_run_at < '10000-01-01');

-- Names are at most 1,000 bytes: a longer dataset id or kind went past
-- the btree's row size (2,704 bytes) in one index or another, refused
-- with an index's name instead of the column's, or printed as a wall of
-- text by every listing.
ALTER TABLE syncq.tasks
    ADD CONSTRAINT tasks_dataset_id_at_most_1000_bytes CHECK (octet_length(dataset_id) <= 1000),
    ADD CONSTRAINT tasks_kind_at_most_1000_bytes CHECK (octet_length(kind) <= 1000),
    ADD CONSTRAINT tasks_unique_key_at_most_1000_bytes CHECK (octet_length(unique_key) <= 1000);
ALTER TABLE syncq.datasets
    ADD CONSTRAINT datasets_dataset_id_at_most_1000_bytes CHECK (octet_length(dataset_id) <= 1000);
ALTER TABLE syncq.schedules
    ADD CONSTRAINT schedules_schedule_id_at_most_1000_bytes CHECK (octet_length(schedule_id) <= 1000),
    ADD CONSTRAINT schedules_dataset_id_at_most_1000_bytes CHECK (octet_length(dataset_id) <= 1000),
    ADD CONSTRAINT schedules_kind_at_most_1000_bytes CHECK (octet_length(kind) <= 1000);

-- What the scheduler refuses, the table refuses (the CLI's bounds): an
-- interval of at least a second (one of a microsecond, set by SQL,
-- enqueued 2,451 tasks in 10 s) and at most 100 years, and without months
-- or years, whose length varies (it meant 30 days): use cron for those.
ALTER TABLE syncq.schedules
    ADD CONSTRAINT schedules_every_at_least_1_second CHECK (every >= interval '1 second'),
    ADD CONSTRAINT schedules_every_at_most_100_years CHECK (every <= interval '36500 days'),
    ADD CONSTRAINT schedules_every_without_months
        CHECK (extract(month FROM every) = 0 AND extract(year FROM every) = 0);
