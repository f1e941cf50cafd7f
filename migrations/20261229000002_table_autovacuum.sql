-- Issue 23: autovacuum settings that fit each table's churn. PostgreSQL's defaults (vacuum once
-- 20 % of a table's rows are dead, analyze once 10 % changed) suit a table that grows. The outbox
-- is small and rewritten per broker message (inserted, confirmed, deleted): under the defaults its
-- dead rows outnumber its live ones many times over before a vacuum comes, and every claim and
-- depth count wades through them. `user_seqs` is updated per event. `events` grows by the day: at
-- 10 % a large table goes days without fresh statistics for its newest rows.
ALTER TABLE outbox SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 10000
);
ALTER TABLE user_seqs SET (
    autovacuum_vacuum_scale_factor = 0.05,
    autovacuum_analyze_scale_factor = 0.05
);
ALTER TABLE events SET (autovacuum_analyze_scale_factor = 0.02);
