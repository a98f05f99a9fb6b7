-- The inbox: which events each consumer has already applied. A consumer
-- records the event id in the same transaction as the event's side effects
-- (see the `outbox` crate's `Inbox`), so a redelivered event is recognised
-- and skipped: at-least-once delivery, exactly-once effects.
CREATE TABLE IF NOT EXISTS inbox (
    consumer    text        NOT NULL CONSTRAINT inbox_consumer_not_empty CHECK (consumer <> ''),
    event_id    uuid        NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
