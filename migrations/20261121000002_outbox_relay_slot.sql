-- Bookkeeping of the relay: which replication slots it created and whether the
-- initial backfill (rows already in the outbox when the slot was created) has
-- been published. A slot without a completed backfill is dropped and created
-- again at the next start, so a crash during the backfill loses nothing.
CREATE TABLE IF NOT EXISTS outbox_relay_slot (
    slot_name        text        PRIMARY KEY,
    publication_name text        NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    backfilled_at    timestamptz
);
