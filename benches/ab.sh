#!/usr/bin/env bash
# A/B of node variants: one release node per variant and run, the bench's load generator against
# it, variants alternating within each round (these machines are noisy: compare within a round).
#
#   benches/ab.sh VARIANT...
#
# A variant is NAME[@BINARY][,SETTING...]: a herald binary (default: this tree's release build)
# and settings, each KEY=VALUE, an environment variable of the node (HERALD_...) or, prefixed
# `pg.`, a PostgreSQL setting of its database (ALTER DATABASE ... SET). Examples:
#
#   benches/ab.sh old@/path/to/older/herald new                       this tree against a build
#   benches/ab.sh one two,HERALD_PIPELINE__COMMIT_STREAMS=2           a Herald setting
#   benches/ab.sh sync async,pg.synchronous_commit=off                a PostgreSQL setting
#
# The load (one per run), from the environment:
#   LOAD=single (default)          single-event ingest, 32 clients, 5 s
#   LOAD=batch                     batch ingest, 16 producers x 100 events, 5 s
#   LOAD=latency RATE=3000         open-loop latency to 1,000 joined sockets
#   LOAD=paced RATE=200 PRODUCERS=1  single events at a fixed rate, each producer sequential,
#                                  send -> push and send -> 2xx to 1,000 joined sockets, 8 s
#   LOAD=join                      SOCKETS (here 10,000 by default) sockets connecting and joining
#                                  their users, 64 at a time: the time it takes
#   LOAD=e2e SKEW=1.1              closed loop to the joined sockets (16 producers, batches of
#                                  100, at most 4,000 events in flight), pushed/s over 8 s; SKEW
#                                  (optional) draws users from a Zipf distribution
#   SOCKETS=1000                   the joined sockets of latency, paced and e2e (the default)
#   ROUNDS=3                       rounds (the default)
#   SLOW_COMMIT_US=2000            every commit of each node's database waits this long before its
#                                  WAL flush (commit_delay with commit_siblings = 0): a slow disk
#                                  or synchronous replication, emulated
# Prints one JSON line per run, as the load generator answers it.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -eq 0 ]; then
  sed -n '2,31p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
scripts/services
target="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --bin herald
bench=$(cargo bench --bench herald-bench --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*herald_bench[^"]*\)".*/\1/p' | tail -1)
case "${LOAD:-single}" in
  single) cmd='{"cmd":"ingest_single","secs":5,"clients":32}' ;;
  batch) cmd='{"cmd":"ingest_batch","secs":5,"producers":16}' ;;
  latency) cmd="{\"cmd\":\"connect\",\"n\":${SOCKETS:-1000}}\n{\"cmd\":\"latency\",\"rate\":${RATE:-3000},\"warmup\":2,\"secs\":6}" ;;
  paced) cmd="{\"cmd\":\"connect\",\"n\":${SOCKETS:-1000}}\n{\"cmd\":\"paced\",\"rate\":${RATE:-200},\"producers\":${PRODUCERS:-1},\"warmup\":1,\"secs\":8}" ;;
  join) cmd="{\"cmd\":\"connect\",\"n\":${SOCKETS:-10000}}" ;;
  e2e) cmd="{\"cmd\":\"connect\",\"n\":${SOCKETS:-1000}}\n{\"cmd\":\"e2e\",\"warmup\":3,\"secs\":8,\"producers\":16,\"window\":4000${SKEW:+,\"skew\":$SKEW}}" ;;
  *) echo "LOAD is single, batch, latency, paced, join or e2e" >&2; exit 2 ;;
esac
ulimit -n 20000 2>/dev/null || true
port=47999
run_one() {
  local variant=$1 id="ab_$(date +%s%N)"
  local head=${variant%%,*} settings=""
  [ "$head" != "$variant" ] && settings=${variant#*,}
  local herald="$target/release/herald"
  [ "${head#*@}" != "$head" ] && herald=${head#*@}
  (
    export HERALD_DATABASE_URL="${HERALD_BENCH_PG:-postgres://postgres@127.0.0.1:5432}/$id" \
      HERALD_AMQP_URL="${HERALD_BENCH_AMQP:-amqp://guest:guest@127.0.0.1:5672/%2f}" \
      HERALD_QUEUE__PREFIX="$id" HERALD_SECRET=herald-bench-secret-herald-bench-secret \
      HERALD_HTTP_ADDR="127.0.0.1:$port" HERALD_LOG=warn HERALD_METRICS__PROMETHEUS_ADDR=127.0.0.1:0
    local pg=()
    IFS=',' read -ra pairs <<<"$settings"
    for pair in "${pairs[@]}"; do
      case "$pair" in
        pg.*=*) pair=${pair#pg.}; pg+=("ALTER DATABASE $id SET ${pair%%=*} = '${pair#*=}'") ;;
        *=*) export "${pair?}" ;;
        *) echo "a setting is KEY=VALUE, got $pair" >&2; exit 2 ;;
      esac
    done
    if [ -n "${SLOW_COMMIT_US:-}" ]; then
      pg+=("ALTER DATABASE $id SET commit_delay = ${SLOW_COMMIT_US}" "ALTER DATABASE $id SET commit_siblings = 0")
    fi
    "$herald" migrate >/dev/null
    for sql in "${pg[@]}"; do psql "$HERALD_DATABASE_URL" -qc "$sql"; done
    key=$("$herald" producers add bench | tail -1)
    "$herald" serve >"$target/ab-node.log" 2>&1 &
    node=$!
    trap 'kill -TERM $node 2>/dev/null; wait $node 2>/dev/null; "$herald" destroy --yes >/dev/null 2>&1' EXIT
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.2; done
    # The last answer, or for the closed loop its measured window (the `end` mark) and the `done`.
    printf '%b\n' "$cmd" | "$bench" loadgen --base "http://127.0.0.1:$port" --key "$key" |
      if [ "${LOAD:-single}" = e2e ]; then grep -E '"mark":"(end|done)"' | paste -sd' '; else tail -1; fi
  )
}
for round in $(seq "${ROUNDS:-3}"); do
  for variant in "$@"; do
    echo "round $round, ${variant%%[@,]*}: $(run_one "$variant")"
  done
done
