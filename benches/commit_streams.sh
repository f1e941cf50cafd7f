#!/usr/bin/env bash
# A/B of `pipeline.commit_streams` (benches/ab.sh with a variant per stream count): one release
# node per variant, the bench's load generator against it, variants alternating within each round.
#   benches/commit_streams.sh                       single-event ingest, 32 clients, 5 s
#   LOAD=batch benches/commit_streams.sh            batch ingest, 16 producers x 100 events
#   LOAD=latency RATE=3000 benches/commit_streams.sh  open-loop latency to 1,000 joined sockets
#   STREAMS="1 2 4" ROUNDS=3 ...                    the variants and rounds (the defaults)
#   SLOW_COMMIT_US=2000 ...                         every commit waits this long before its WAL
#                                                   flush (see benches/ab.sh)
# Prints one JSON line per run, as the load generator answers it.
set -euo pipefail
variants=()
for streams in ${STREAMS:-1 2 4}; do
  variants+=("streams$streams,HERALD_PIPELINE__COMMIT_STREAMS=$streams,HERALD_STORE__WRITE_CONNECTIONS=$((streams + 2))")
done
exec "$(dirname "$0")/ab.sh" "${variants[@]}"
