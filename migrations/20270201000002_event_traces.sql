-- Issue 20: one event's trace across the nodes it crosses. The W3C traceparent of the request that
-- made the event (the producer's own, or the request span's when Herald records traces), so the
-- worker and the socket continue that trace, and operators see its trace id. NULL when the event
-- has none (traces off and no traceparent sent): nothing is written for it.
ALTER TABLE events ADD COLUMN traceparent text;
