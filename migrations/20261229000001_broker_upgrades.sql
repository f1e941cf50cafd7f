-- Issue 22: one-off upgrade steps a node takes on RabbitMQ, done once per deployment rather than
-- at every connection.
--
-- The only one so far removes the queues of the layout before partitions (`<prefix>.events` and
-- its delay queues). Finding out whether a queue exists takes a passive declare, which RabbitMQ
-- answers for a missing queue by closing the channel, and lapin logs each such close as an ERROR:
-- a healthy fresh install printed six of them at every worker start. A deployment that has stored
-- no event when it reaches this migration never ran the pre-partition pipeline with anything in
-- flight (and what such queues held is in the outbox since the partitions migration anyway), so
-- it starts with the step done; an older deployment probes once, and marks it done.
CREATE TABLE broker_upgrades (
    name     text PRIMARY KEY,
    done_at  timestamptz NOT NULL DEFAULT now()
);

INSERT INTO broker_upgrades (name)
SELECT 'pre_partition_queues_removed'
WHERE NOT EXISTS (SELECT 1 FROM events);
