-- Issue 24: the inbox's read mark and unread count in bounded work per call.
--
-- The highest seq of each user that a client marked read through the inbox
-- (`POST /api/v1/inbox/read`): every event of the user at or below it is read, whether or not its
-- own `acked_at` is set. Marking up to a seq raises this one row instead of updating every event
-- of the user below it, and the unread count looks only above it. A channel `ack` still sets
-- `acked_at` on the events it names (above the mark; below, they are read already). `read_at` is
-- when the mark last moved: what `acked_at` reads for an event under the mark without its own.
--
-- Apart from the events table and from user_seqs, so neither the group commit's insert and
-- counter upsert nor the outcome writer's HOT updates change.
CREATE TABLE read_watermarks (
    user_id       text PRIMARY KEY,
    read_through  bigint NOT NULL,
    read_at       timestamptz NOT NULL
);
