-- Retention prunes delivered events by age; enqueued_at follows insertion order, so a BRIN index
-- finds old rows at almost no cost to inserts.
CREATE INDEX events_enqueued_at_brin ON events USING brin (enqueued_at);
