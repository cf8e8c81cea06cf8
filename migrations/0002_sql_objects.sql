-- The functions, triggers and views of src/store/sql/ that `syncq migrate`
-- has applied, and the checksum of the text it applied: a file whose text
-- has not changed since is not applied again (src/store/objects.rs).
-- Repeatable migrations, as Flyway and graphile-migrate call them.
CREATE TABLE syncq.sql_objects (
    name       text        PRIMARY KEY,
    -- SHA-256 of the file's text, in hex.
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
