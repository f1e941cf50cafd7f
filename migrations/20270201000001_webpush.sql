-- Issue 20: Web Push for users who are away.
--
-- A browser's push subscription, registered by the user's client with its socket token. The
-- endpoint is the push service's URL for this one browser; p256dh and auth are the browser's keys
-- (RFC 8291) the payload is encrypted to. One row per (user, endpoint): a browser that subscribes
-- again replaces its keys. Herald bounds the rows per user (webpush.max_subscriptions_per_user).
CREATE TABLE webpush_subscriptions (
    id          uuid PRIMARY KEY,
    user_id     text NOT NULL,
    endpoint    text NOT NULL,
    p256dh      bytea NOT NULL CHECK (length(p256dh) = 65),
    auth        bytea NOT NULL CHECK (length(auth) = 16),
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, endpoint)
);

-- The highest seq of each user a socket pushed, among events whose name falls back to Web Push:
-- socket nodes raise it in batches, and a fallback that finds its event at or below it is not
-- sent (a client received it).
CREATE TABLE webpush_receipts (
    user_id  text PRIMARY KEY,
    seq      bigint NOT NULL
);

-- One push to send, per (event, subscription): made when the event's delivery is recorded, due
-- when the event's fallback delay has passed. A sender claims a row by moving `due_at` past its
-- request's bound, so a sender that dies leaves it due again. Deleted once sent, refused for good,
-- or found received.
CREATE TABLE webpush_outbox (
    event_id         uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    subscription_id  uuid NOT NULL REFERENCES webpush_subscriptions (id) ON DELETE CASCADE,
    due_at           timestamptz NOT NULL,
    -- Sends tried so far; the event's retry policy bounds them.
    tries            integer NOT NULL DEFAULT 0,
    -- The push service answered 413 once: the next try sends the summary without `data`.
    summarize        boolean NOT NULL DEFAULT false,
    PRIMARY KEY (event_id, subscription_id)
);
CREATE INDEX webpush_outbox_due ON webpush_outbox (due_at);
CREATE INDEX webpush_outbox_subscription ON webpush_outbox (subscription_id);

-- Every Web Push send, beside the socket attempts of delivery_attempts: what the admin API shows
-- as the event's attempts on the `webpush` channel. The endpoint is kept as its origin only (the
-- path is the browser's capability URL).
CREATE TABLE webpush_attempts (
    event_id     uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    at           timestamptz NOT NULL DEFAULT now(),
    origin       text NOT NULL,
    -- The push service's HTTP status; NULL when no answer came (timeout, refused, TLS).
    status       integer,
    -- sent: accepted by the push service; retrying: a retry is scheduled; failed: given up;
    -- gone: the subscription expired (404/410) and was removed.
    outcome      text NOT NULL CHECK (outcome IN ('sent', 'retrying', 'failed', 'gone')),
    error        text
);
CREATE INDEX webpush_attempts_event ON webpush_attempts (event_id);

ALTER TABLE webpush_outbox SET (autovacuum_vacuum_scale_factor = 0.05);
ALTER TABLE webpush_receipts SET (autovacuum_vacuum_scale_factor = 0.05);
