-- Herald's schema. The events table is the source of truth (an outbox): a row exists before any
-- 2xx is answered, and its status column records how far delivery got.

CREATE TABLE producers (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    -- SHA-256 of the API key: keys are 256-bit random, so a fast hash is enough and lookups stay cheap.
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One counter row per user. The group commit bumps it in the same transaction as the events it
-- numbers; its row lock orders the commits of one user, so if seq n is visible, every seq below is.
CREATE TABLE user_seqs (
    user_id   text PRIMARY KEY,
    last_seq  bigint NOT NULL
);

CREATE TABLE events (
    id               uuid PRIMARY KEY,
    producer_id      bigint NOT NULL REFERENCES producers (id),
    user_id          text NOT NULL,
    seq              bigint NOT NULL,
    event            text NOT NULL,
    data             jsonb NOT NULL,
    idempotency_key  text,
    status           text NOT NULL DEFAULT 'accepted'
                     CHECK (status IN ('accepted', 'published', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    -- Sockets the last broadcast reached; 0 means nobody was online (not an error).
    push_count       integer,
    last_error       text,
    enqueued_at      timestamptz NOT NULL,
    published_at     timestamptz,
    delivered_at     timestamptz,
    failed_at        timestamptz,
    acked_at         timestamptz,
    -- When the outbox relay last claimed the row, so relays on several nodes do not all republish it.
    relayed_at       timestamptz,
    UNIQUE (user_id, seq)
);

-- The outbox relay's scan: only rows still waiting for a publish confirm.
CREATE INDEX events_unpublished ON events (enqueued_at) WHERE status = 'accepted';
-- Operators list failed deliveries.
CREATE INDEX events_failed ON events (failed_at) WHERE status = 'failed';

-- Idempotency keys live apart from events so a key can be claimed (and a concurrent duplicate detected)
-- before the user's sequence counter is touched: a duplicate must never burn a seq number.
CREATE TABLE idempotency_keys (
    producer_id  bigint NOT NULL REFERENCES producers (id),
    key          text NOT NULL,
    event_id     uuid NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (producer_id, key)
);
