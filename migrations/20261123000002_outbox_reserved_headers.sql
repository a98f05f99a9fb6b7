-- Rows written with plain SQL cannot spoof what the relay sets itself.
--
-- The relay sends `id`, `event_type`, `aggregate_type`, `aggregate_id` and
-- `traceparent` as Kafka headers, and adds `outbox.error` and
-- `outbox.original_topic` to dead letters. A row whose `headers` column
-- repeated one of them would reach consumers with two `id` headers (and a
-- consumer deduplicating on the wrong one), or pose as a dead letter. The
-- write helper refuses such names (`outbox::is_reserved_header`) and the
-- relay refuses such rows (undeliverable: stop or dead-letter, by
-- --on-undeliverable); these constraints refuse them at INSERT, where the
-- service that wrote them gets the error. Names are compared without regard
-- to ASCII case, and must be visible ASCII (no spaces, control characters or
-- look-alike letters such as the dotless `ı` that some consumers fold to `i`).
-- Headers that are not an object are left to `outbox_headers_object_of_strings`
-- (`.keyvalue()` would raise a jsonpath error on them first).
--
-- The topic override must be a legal Kafka topic name (what
-- `outbox::topic::validate` checks): 1 to 249 of ASCII letters, digits, `.`,
-- `_` and `-`, and not `.` or `..`.
--
-- NOT VALID: rows already in the table are not checked (no scan under the
-- table lock; rows of an older relay's era stay deliverable as they were),
-- every new row is. `ALTER TABLE outbox VALIDATE CONSTRAINT ...` checks the
-- old rows later if wanted.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'outbox'::regclass AND conname = 'outbox_headers_not_reserved'
    ) THEN
        ALTER TABLE outbox ADD CONSTRAINT outbox_headers_not_reserved CHECK (
            CASE WHEN jsonb_typeof(headers) = 'object' THEN NOT jsonb_path_exists(
                headers,
                '$.keyvalue() ? (@.key == "" || @.key like_regex "[^!-~]" || @.key like_regex "^(id|event_type|aggregate_type|aggregate_id|traceparent)$|^outbox[.]" flag "i")'
            ) ELSE true END
        ) NOT VALID;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'outbox'::regclass AND conname = 'outbox_topic_legal'
    ) THEN
        ALTER TABLE outbox ADD CONSTRAINT outbox_topic_legal CHECK (
            topic ~ '^[A-Za-z0-9._-]{1,249}$' AND topic <> '.' AND topic <> '..'
        ) NOT VALID;
    END IF;
END
$$;
