-- The outbox: one row per event, written by services in the same transaction as
-- their business rows (see the `outbox` crate's `write` helper). The relay reads
-- inserts from the WAL through the `outbox_pub` publication; rows can be deleted
-- at any time after commit (even in the same transaction) without losing the event.
CREATE TABLE IF NOT EXISTS outbox (
    -- UUIDv7 from the write helper; plain SQL inserts get a random UUID.
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_type text        NOT NULL CONSTRAINT outbox_aggregate_type_not_empty CHECK (aggregate_type <> ''),
    aggregate_id   text        NOT NULL CONSTRAINT outbox_aggregate_id_not_empty CHECK (aggregate_id <> ''),
    event_type     text        NOT NULL CONSTRAINT outbox_event_type_not_empty CHECK (event_type <> ''),
    payload        jsonb       NOT NULL,
    -- Extra Kafka headers: a JSON object whose values are all strings.
    headers        jsonb       NOT NULL DEFAULT '{}'::jsonb
                   CONSTRAINT outbox_headers_object_of_strings CHECK (
                       jsonb_typeof(headers) = 'object'
                       AND NOT jsonb_path_exists(headers, '$.* ? (@.type() != "string")')
                   ),
    -- Optional per-row topic; NULL means the relay's topic template decides.
    topic          text        CONSTRAINT outbox_topic_not_empty CHECK (topic <> ''),
    -- Optional W3C traceparent, forwarded as the `traceparent` header.
    trace_context  text,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Inserts only: deleting delivered rows must not produce events.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'outbox_pub') THEN
        CREATE PUBLICATION outbox_pub FOR TABLE outbox WITH (publish = 'insert');
    END IF;
END
$$;
