-- Delivery attempts, retries, operator replay and the admin role (issue 5).

-- Every delivery attempt of an event, written in the same batched statement as the event's status:
-- what was tried, when, and how it ended. `attempt` counts the event's attempts over its whole life
-- (replays included), so it is unique per event.
CREATE TABLE delivery_attempts (
    event_id     uuid NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    attempt      integer NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    -- pushed: reached >= 1 socket; offline: nobody subscribed (kept for catch-up, not an error);
    -- failed: the attempt itself failed (error, timeout, panic).
    outcome      text NOT NULL CHECK (outcome IN ('pushed', 'offline', 'failed')),
    sockets      integer,
    error        text,
    PRIMARY KEY (event_id, attempt)
);

-- When the next attempt of an event waiting in a delay queue is due (NULL when none is scheduled).
ALTER TABLE events ADD COLUMN next_attempt_at timestamptz;
-- Operator replays: how many, and the last one.
ALTER TABLE events ADD COLUMN replays integer NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN replayed_at timestamptz;

-- Operators page through failed events by id (UUID v7, so by creation time). Partial, so the hot
-- path (accepted -> published -> delivered) never writes it; a user's events are found through
-- UNIQUE (user_id, seq).
CREATE INDEX events_failed_id ON events (id) WHERE status = 'failed';

-- The admin role: an admin key may list and replay every producer's events.
ALTER TABLE producers ADD COLUMN admin boolean NOT NULL DEFAULT false;

-- Replay jobs started through the admin API; their progress is here so any node can report it.
CREATE TABLE replay_jobs (
    id           uuid PRIMARY KEY,
    -- The filter as given (JSON), for the record.
    filter       jsonb NOT NULL,
    status       text NOT NULL CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
    matched      bigint NOT NULL DEFAULT 0,
    replayed     bigint NOT NULL DEFAULT 0,
    -- Claimed for replay but not taken by the publisher (broker down): the outbox relay sends them.
    deferred     bigint NOT NULL DEFAULT 0,
    error        text,
    created_by   bigint REFERENCES producers (id),
    started_at   timestamptz NOT NULL DEFAULT now(),
    -- Written with every progress report: a running job whose node died stops moving.
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz
);
