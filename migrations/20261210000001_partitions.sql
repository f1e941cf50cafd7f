-- Partitioned, batched delivery (issue 9): the outbox, partition leases, and an events table whose
-- hot-path updates are HOT.

-- The outbox: one row per broker message the broker has not confirmed yet (a group commit's events
-- of one partition, a replayed event). Written in the same transaction as the events it carries and
-- deleted when the broker confirms the message, so "never confirmed" is exactly "still here", and
-- the events table is not written between commit and delivery. The outbox relay republishes rows
-- older than a grace period; `relayed_at` keeps relays on several nodes from repeating each other.
-- All events of a row belong to one partition (relay and layout changes rely on it).
CREATE TABLE outbox (
    id          uuid PRIMARY KEY,
    event_ids   uuid[] NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    relayed_at  timestamptz
);

-- Events the old single-queue pipeline had not delivered yet go through the outbox once more
-- (messages of up to 500 of one user's events), since the single queue is gone. Copies that were
-- delivered meanwhile are dropped by seq at the socket.
INSERT INTO outbox (id, event_ids, created_at)
SELECT gen_random_uuid(), array_agg(id ORDER BY seq), min(enqueued_at)
FROM (SELECT id, user_id, seq, enqueued_at,
             (row_number() OVER (PARTITION BY user_id ORDER BY seq) - 1) / 500 AS chunk
      FROM events WHERE status IN ('accepted', 'published')) AS pending
GROUP BY user_id, chunk;

-- The relay reads the outbox now; the old claim stamp and scan index go.
DROP INDEX events_unpublished;
ALTER TABLE events DROP COLUMN relayed_at;

-- No index may depend on a column the delivery path changes (status, attempts, delivered_at,
-- push_count, last_error, next_attempt_at, published_at), or every delivered event would rewrite
-- all its index entries instead of being a HOT update. The failed-event indexes keyed on `status`
-- become one keyed on failed_at, which a delivery leaves unchanged.
DROP INDEX events_failed;
DROP INDEX events_failed_id;
CREATE INDEX events_failed_id ON events (id) WHERE failed_at IS NOT NULL;
-- Room on each page for every row's delivery update to stay on it (HOT needs the new version on
-- the same page, and a row's one update needs as much room as the row). Measured with 100,000
-- events: 98% of delivery updates HOT at 50, 40% at 80, and the table the same size either way
-- (a non-HOT update puts its new version on another page instead).
ALTER TABLE events SET (fillfactor = 50);
-- The same for the per-user counters every group commit bumps: 40,000 upserts in statements of
-- 200 took 6.8 µs each at 50, 9.2 µs at 100.
ALTER TABLE user_seqs SET (fillfactor = 50);

-- Producers are never deleted (no command or endpoint removes one: keys are rotated instead), so
-- the foreign key from events only cost: its per-row check was 17 of the 32 µs an inserted event
-- took (100,000 events in statements of 400).
ALTER TABLE events DROP CONSTRAINT events_producer_id_fkey;

-- A delivery attempt is one row here, except an event's first attempt when it delivers (nearly
-- every attempt): the event row itself holds it (published_at is its start, delivered_at its end,
-- push_count its sockets) and the attempt log is read from there, which saves a row, an index
-- entry and a foreign-key check per event (27 µs of the 80 µs of database work an event cost).
-- A later attempt of such an event first copies it here, before the event row changes.
COMMENT ON TABLE delivery_attempts IS
    'every delivery attempt but an event''s first when it delivered, which the event row holds';

-- Worker nodes of the deployment, with the partition count they run with; a node is live while it
-- renews `seen_at` within the lease.
CREATE TABLE worker_nodes (
    name        text PRIMARY KEY,
    partitions  integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    seen_at     timestamptz NOT NULL DEFAULT now()
);

-- One row per partition: which worker node may consume it, until when. A node consumes a partition
-- only while it holds its lease, and hands it over only after its in-flight deliveries of that
-- partition are settled (see pipeline::partitions). The rows also record the partition count.
CREATE TABLE partition_leases (
    partition    integer PRIMARY KEY,
    owner        text,
    lease_until  timestamptz NOT NULL DEFAULT '-infinity',
    moved_at     timestamptz
);
