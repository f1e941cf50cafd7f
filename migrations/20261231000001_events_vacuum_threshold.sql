-- Issue 23: retention deletes from `events` at the intake rate, and a deleted row's space is used
-- again only once the table is vacuumed. At PostgreSQL's default (a vacuum once 20 % of the rows
-- are dead) a table that keeps 10 M events holds 2 M dead ones at times, on top; at 5 % it holds
-- a quarter of that. Herald's own upkeep (where autovacuum is off) follows the same rule.
ALTER TABLE events SET (autovacuum_vacuum_scale_factor = 0.05);
