-- Issue 18: settings every node of a deployment must share, recorded by the first node that
-- starts with them, so a node configured otherwise refuses to start instead of silently missing
-- traffic. The first is `pubsub.buckets`: cross-node broadcasts are routed by a bucket of their
-- topic, and a socket node counting buckets differently from the workers would bind keys nobody
-- publishes to. To change one: stop every node that uses it, delete its row, start them again.
CREATE TABLE deployment_settings (
    name    text PRIMARY KEY,
    value   bigint NOT NULL,
    set_at  timestamptz NOT NULL DEFAULT now()
);
