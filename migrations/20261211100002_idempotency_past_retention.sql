-- Issue 11: idempotency keys outlive their events' retention.
--
-- A key whose event retention deleted keeps answering retries (200, the original id and seq,
-- "status": "pruned") until it is store.idempotency_ttl_secs old: the statement that prunes an
-- event records the event's seq and the time on its key (Store::prune_events). Keys of events still
-- stored are kept with them, whatever their age. The group commit's claim writes neither column.
ALTER TABLE idempotency_keys ADD COLUMN seq bigint, ADD COLUMN pruned_at timestamptz;

-- Keys whose event was pruned before this version: their seq is unknown (answered as 0).
UPDATE idempotency_keys k SET pruned_at = now()
WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.id = k.event_id);

-- Retention expires pruned keys by age; only those are in this index, so a claim never writes it.
CREATE INDEX idempotency_keys_pruned ON idempotency_keys (created_at) WHERE pruned_at IS NOT NULL;
