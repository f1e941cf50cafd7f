-- Issue 11: what retention removed, per user, so that a join's `missed` tells the truth.
--
-- The highest seq retention has deleted for each user, written by the statement that deletes (see
-- Store::prune_events). A join asking for everything after seq r missed events exactly when this
-- is above r. The oldest seq still stored could not say it: retention keeps failed and undelivered
-- events, so an old failed event hid every later delivered one that was pruned. Apart from
-- user_seqs, so the group commit's counter upsert is unchanged.
CREATE TABLE retention_watermarks (
    user_id         text PRIMARY KEY,
    pruned_through  bigint NOT NULL
);

-- Events pruned before this table existed: every seq below the oldest one still stored is gone
-- (seqs are gap-free when committed), and every seq of a user with none stored. Holes above the
-- oldest stored seq cannot be known any more; from now on every prune is recorded.
INSERT INTO retention_watermarks (user_id, pruned_through)
SELECT user_id, pruned_through
FROM (SELECT s.user_id,
             COALESCE((SELECT min(e.seq) FROM events e WHERE e.user_id = s.user_id) - 1,
                      s.last_seq) AS pruned_through
      FROM user_seqs s) AS known
WHERE pruned_through > 0;
