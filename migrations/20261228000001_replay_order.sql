-- Replays page through failed events in (user_id, seq) order (issue 24): one user's event ids are
-- minted at validation and need not follow its seqs, so paging by id published a user's events
-- out of order. This index serves that order for the default replay (failed events only) without
-- reading every event of the table: it holds the events failed for good (`failed_at` is set then
-- and kept), as `events_failed_id` does for the admin listing.
--
-- It changes no hot path: an insert's `failed_at` is NULL, so the group commit never writes it,
-- and it keys on user_id and seq, which never change, with a predicate on failed_at, which
-- `events_failed_id` already depends on, so the outcome writer's updates stay HOT as before.
CREATE INDEX events_failed_user_seq ON events (user_id, seq) WHERE failed_at IS NOT NULL;
