-- The sweeper (pipeline::sweep) republishes events no message carries any more: how often each
-- was swept, and when last, for operators (GET /api/v1/admin/events/{id}).
ALTER TABLE events ADD COLUMN sweeps integer NOT NULL DEFAULT 0;
ALTER TABLE events ADD COLUMN swept_at timestamptz;
