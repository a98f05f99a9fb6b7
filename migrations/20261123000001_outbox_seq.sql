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
-- Rows already in the table are numbered in (created_at, id) order, the order
-- the relay used before, not in the order they sit on disk; new rows continue
-- after them. This runs in one transaction under an exclusive lock on the
-- table: on a large outbox, apply it at a quiet time.
-- The identity sequence must keep its default CACHE 1: with a larger cache
-- each session takes its own range and `seq` no longer follows the inserts.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'outbox'::regclass AND attname = 'seq' AND NOT attisdropped
    ) THEN
        ALTER TABLE outbox ADD COLUMN seq bigint;
        UPDATE outbox AS o SET seq = n.seq
        FROM (SELECT id, row_number() OVER (ORDER BY created_at, id) AS seq FROM outbox) AS n
        WHERE o.id = n.id;
        ALTER TABLE outbox ALTER COLUMN seq SET NOT NULL;
        ALTER TABLE outbox ALTER COLUMN seq ADD GENERATED ALWAYS AS IDENTITY;
        PERFORM setval(pg_get_serial_sequence('outbox', 'seq'), coalesce(max(seq), 0) + 1, false)
        FROM outbox;
    END IF;
END
$$;

-- How far an interrupted backfill got: per published table (`schema.table`),
-- the highest `seq` that Kafka acknowledged, with every row before it. A
-- retried backfill continues after it instead of republishing the table.
-- A retry reads under a fresh snapshot, so the first attempt also records
-- what the slot's exported snapshot saw: its txid_current_snapshot() (the
-- transactions still in progress) and, per table, the highest `seq` it saw.
-- The retry publishes only rows up to that `seq` not inserted by those
-- transactions, and leaves the rows committed after the slot's consistent
-- point to the stream, which sends them in commit order.
ALTER TABLE outbox_relay_slot
    ADD COLUMN IF NOT EXISTS backfill_progress jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN IF NOT EXISTS backfill_snapshot text,
    ADD COLUMN IF NOT EXISTS backfill_max_seq jsonb;

-- Corrections to the comments of the earlier migrations (which cannot change
-- once applied):
-- * outbox: a row may be deleted in the transaction that inserted it, or any
--   time after the relay delivered it. Rows already in the table when the
--   relay starts for the first time are published by the backfill: keep them
--   until the relay logs `backfill complete`.
-- * outbox_relay_slot: the relay never drops a slot. A backfill that did not
--   complete is retried under a fresh snapshot from `backfill_progress`, while
--   the slot stays at its consistent point.
