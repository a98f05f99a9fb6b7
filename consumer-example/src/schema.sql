-- The burger stand. `ingredients` belongs to the kitchen service, which
-- changes it and writes outbox events in the same transactions. The other
-- tables belong to the stock consumer: its projection, its low-stock alerts
-- and the messages it could not use. (One database keeps the demo small; in
-- production the consumer would have its own.)
CREATE TABLE IF NOT EXISTS ingredients (
    name             text        PRIMARY KEY,
    category         text        NOT NULL,
    supplier         text        NOT NULL,
    unit_price_cents integer     NOT NULL CHECK (unit_price_cents > 0),
    allergens        text[]      NOT NULL DEFAULT '{}',
    stock            integer     NOT NULL CHECK (stock >= 0),
    min_stock        integer     NOT NULL CHECK (min_stock >= 0),
    expires_on       date        NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS stock_view (
    name             text        PRIMARY KEY,
    stock            integer     NOT NULL,
    min_stock        integer     NOT NULL,
    unit_price_cents integer     NOT NULL,
    last_event_id    uuid        NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS low_stock (
    id        bigserial   PRIMARY KEY,
    name      text        NOT NULL,
    stock     integer     NOT NULL,
    min_stock integer     NOT NULL,
    event_id  uuid        NOT NULL UNIQUE,
    raised_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS dead_letter (
    consumer    text        NOT NULL,
    topic       text        NOT NULL,
    partition   integer     NOT NULL,
    "offset"    bigint      NOT NULL,
    event_id    text,
    event_type  text,
    reason      text        NOT NULL,
    payload     text,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition, "offset")
);
