-- The relay's own bookkeeping table, outbox_relay_slot, and nothing else:
-- what `outbox-relay migrate --bookkeeping-only` applies for an outbox the
-- relay does not own (Debezium's outbox table, or the tableless outbox).
-- Idempotent. It ends in the same shape as the migrations give it
-- (20261121000002, 20261123000001, 20261123000003), which the test
-- `compat::a_debezium_outbox_table_is_relayed_as_debeziums_router_does`
-- checks column by column.
CREATE TABLE IF NOT EXISTS outbox_relay_slot (
    slot_name        text        PRIMARY KEY,
    publication_name text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    backfilled_at    timestamptz
);
ALTER TABLE outbox_relay_slot
    ADD COLUMN IF NOT EXISTS backfill_progress jsonb NOT NULL DEFAULT '{}'::jsonb,
    ADD COLUMN IF NOT EXISTS backfill_snapshot text,
    ADD COLUMN IF NOT EXISTS backfill_max_seq jsonb,
    ADD COLUMN IF NOT EXISTS last_event_id     text,
    ADD COLUMN IF NOT EXISTS last_event_topic  text,
    ADD COLUMN IF NOT EXISTS last_delivered_at timestamptz,
    ADD COLUMN IF NOT EXISTS last_event_committed_at timestamptz;
