#!/usr/bin/env bash
# A/B of `pipeline.commit_streams`: one release node per variant, the bench's load generator against
# it, variants alternating within each round (these machines are noisy: compare within a round).
#   benches/commit_streams.sh                       single-event ingest, 32 clients, 5 s
#   LOAD=batch benches/commit_streams.sh            batch ingest, 16 producers x 100 events
#   LOAD=latency RATE=3000 benches/commit_streams.sh  open-loop latency to 1,000 joined sockets
#   STREAMS="1 2 4" ROUNDS=3 ...                    the variants and rounds (the defaults)
#   SLOW_COMMIT_US=2000 ...                         every commit of the node's database waits this
#                                                   long before its WAL flush (PostgreSQL's
#                                                   commit_delay with commit_siblings = 0): a slow
#                                                   disk or synchronous replication, emulated
# Prints one JSON line per run, as the load generator answers it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services
target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --bin herald
bench=$(cargo bench --bench herald-bench --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*herald_bench[^"]*\)".*/\1/p' | tail -1)
herald="$target/release/herald"
case "${LOAD:-single}" in
  single) cmd='{"cmd":"ingest_single","secs":5,"clients":32}' ;;
  batch) cmd='{"cmd":"ingest_batch","secs":5,"producers":16}' ;;
  latency) cmd="{\"cmd\":\"connect\",\"n\":1000}\n{\"cmd\":\"latency\",\"rate\":${RATE:-3000},\"warmup\":2,\"secs\":6}" ;;
  *) echo "LOAD is single, batch or latency" >&2; exit 2 ;;
esac
ulimit -n 20000 2>/dev/null || true
port=47999
run_one() {
  local streams=$1 id="ab_$(date +%s%N)"
  (
    export HERALD_DATABASE_URL="${HERALD_BENCH_PG:-postgres://postgres@127.0.0.1:5432}/$id" \
      HERALD_AMQP_URL="${HERALD_BENCH_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}" \
      HERALD_QUEUE__PREFIX="$id" HERALD_SECRET=herald-bench-secret-herald-bench-secret \
      HERALD_HTTP_ADDR="127.0.0.1:$port" HERALD_LOG=warn HERALD_METRICS__PROMETHEUS_ADDR=127.0.0.1:0 \
      HERALD_PIPELINE__COMMIT_STREAMS="$streams" HERALD_STORE__WRITE_CONNECTIONS=$((streams + 2))
    "$herald" migrate >/dev/null
    if [ -n "${SLOW_COMMIT_US:-}" ]; then
      psql "$HERALD_DATABASE_URL" -qc "ALTER DATABASE $id SET commit_delay = ${SLOW_COMMIT_US}" \
        -c "ALTER DATABASE $id SET commit_siblings = 0"
    fi
    key=$("$herald" producers add bench | tail -1)
    "$herald" serve >"$target/commit-streams-node.log" 2>&1 &
    node=$!
    trap 'kill -TERM $node 2>/dev/null; wait $node 2>/dev/null; "$herald" destroy --yes >/dev/null 2>&1' EXIT
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
    printf '%b\n' "$cmd" | "$bench" loadgen --base "http://127.0.0.1:$port" --key "$key" | tail -1
  )
}
for round in $(seq "${ROUNDS:-3}"); do
  for streams in ${STREAMS:-1 2 4}; do
    echo "round $round, commit_streams $streams: $(run_one "$streams")"
  done
done
