-- Issue 23: every event retention deletes paid one foreign-key check per table that references
-- `events` (a query per deleted row, whether that table holds anything or not), and the two Web
-- Push tables' keys made a pruned event cost 12.2 us inside PostgreSQL where it had cost 8.1
-- (`scripts/bench prunecost`, BENCHMARKS.md, *Pruning costs*). The outbox's rows are pushes waiting
-- seconds or minutes; one whose event is gone is now dropped unsent by the sender when it comes due
-- (`store::webpush`'s claim) rather than by a cascade. The attempt log keeps its key: it is read
-- per event, and a cascade is what keeps it from outliving its events.
ALTER TABLE webpush_outbox DROP CONSTRAINT webpush_outbox_event_id_fkey;
