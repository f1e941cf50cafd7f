-- Issue 24: the outbox keeps every message in flight, not only the unconfirmed ones, so the sweeper
-- finds what no message carries any more per partition, from a small indexed table, instead of
-- scanning the events table oldest first (where 10,000 stale events of busy partitions hid the
-- stale events of every other partition for ever).
--
-- A row is a broker message that may still carry an undelivered event: inserted unconfirmed with
-- its events (group commit, replay, sweep), marked `confirmed_at` by the broker's confirm (it used
-- to be deleted then), and deleted once a worker has settled the message (every event delivered,
-- failed for good, or retried: a retry gets a row of its own, id = the event's id, in the statement
-- that records the attempt). `partition` says whose sweeper looks at it.
ALTER TABLE outbox ADD COLUMN partition smallint, ADD COLUMN confirmed_at timestamptz;

-- The relay's oldest-first claim and the depth count read only unconfirmed rows.
CREATE INDEX outbox_unconfirmed ON outbox (created_at) WHERE confirmed_at IS NULL;
-- The sweeper reads one partition's confirmed rows, oldest first.
CREATE INDEX outbox_in_flight ON outbox (partition, created_at) WHERE confirmed_at IS NOT NULL;

-- Events in flight when this version starts have no row once confirmed: they go through the outbox
-- once more (their partition is filled in by the relay's claim; a retry waiting in a delay queue
-- loses its wait). Copies of what was delivered meanwhile are dropped by seq at the socket.
UPDATE events SET status = 'accepted', next_attempt_at = NULL
WHERE status IN ('accepted', 'published')
  AND id NOT IN (SELECT unnest(event_ids) FROM outbox);
INSERT INTO outbox (id, event_ids, created_at)
SELECT gen_random_uuid(), array_agg(id ORDER BY seq), min(enqueued_at)
FROM (SELECT id, user_id, seq, enqueued_at,
             (row_number() OVER (PARTITION BY user_id ORDER BY seq) - 1) / 500 AS chunk
      FROM events e
      WHERE status = 'accepted' AND NOT EXISTS (SELECT 1 FROM outbox o WHERE e.id = ANY(o.event_ids))) AS pending
GROUP BY user_id, chunk;
