-- The last event Kafka acknowledged for each slot, as the relay records it
-- every --status-interval: read by `outbox-relay status`.
ALTER TABLE outbox_relay_slot
    ADD COLUMN IF NOT EXISTS last_event_id     text,
    ADD COLUMN IF NOT EXISTS last_event_topic  text,
    ADD COLUMN IF NOT EXISTS last_delivered_at timestamptz,
    -- Its transaction's commit time (NULL for events from the backfill):
    -- now minus this is how far behind the relay is.
    ADD COLUMN IF NOT EXISTS last_event_committed_at timestamptz;
