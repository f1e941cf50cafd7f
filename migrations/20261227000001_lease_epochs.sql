-- Issue 24: a fencing token per partition lease.
--
-- `epoch` goes up by one every time a partition's lease changes hands (taken by another node, or
-- taken again after its release). The work a worker node does for a partition carries the epoch it
-- held, and the outcome writer stores an event's outcome only while that epoch is still the
-- partition's and the node still its owner (checked under a share lock on the lease row, so a
-- takeover waits for the write or refuses it). A node that stalled for longer than its lease and
-- woke up still delivering can therefore not overwrite what the partition's new owner records.
ALTER TABLE partition_leases ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
