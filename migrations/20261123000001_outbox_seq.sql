-- Insertion order, and a backfill that can resume.
--
-- `seq` is filled from an identity sequence when a row is inserted, by the
-- write helper and by plain SQL alike (nobody sets it: GENERATED ALWAYS).
-- Rows of one transaction get increasing values in the order they were
-- inserted, which is the order pgoutput streams them in. The relay's
-- first-start backfill reads the rows already in the table in `seq` order,
-- so one aggregate's events keep the order they were written in (created_at
-- is the same for every row of a transaction, and plain SQL inserts get
-- random UUIDs, so neither can order them). Between transactions that ran at
-- the same time, `seq` is the order of the inserts, not of the commits; the
-- usual row lock on the aggregate makes the two the same.
--
-- Adding the column to an existing table rewrites it under an exclusive lock:
-- on a large outbox, apply this migration at a quiet time.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS seq bigint GENERATED ALWAYS AS IDENTITY;

-- How far an interrupted backfill got: per published table (`schema.table`),
-- the highest `seq` that Kafka acknowledged, with every row before it. A
-- retried backfill continues after it instead of republishing the table.
ALTER TABLE outbox_relay_slot
    ADD COLUMN IF NOT EXISTS backfill_progress jsonb NOT NULL DEFAULT '{}'::jsonb;

-- Corrections to the comments of the earlier migrations (which cannot change
-- once applied):
-- * outbox: a row may be deleted in the transaction that inserted it, or any
--   time after the relay delivered it. Rows already in the table when the
--   relay starts for the first time are published by the backfill: keep them
--   until the relay logs `backfill complete`.
-- * outbox_relay_slot: the relay never drops a slot. A backfill that did not
--   complete is retried under a fresh snapshot from `backfill_progress`, while
--   the slot stays at its consistent point (duplicates, never loss).
