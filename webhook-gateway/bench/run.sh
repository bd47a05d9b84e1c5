#!/usr/bin/env bash
# The gateway benchmark (see ../BENCH.md). Needs redis-server on the PATH.
#
#   webhook-gateway/bench/run.sh              # against the fake control plane
#   CP=real webhook-gateway/bench/run.sh      # against the real control plane
#                                             # (release build, Redis store)
#   CP_URL=http://127.0.0.1:50051 CP_PID=<pid> webhook-gateway/bench/run.sh
#                                             # against one you started
#
# Everything talks to a private redis-server (no persistence) the script
# starts on REDIS_PORT, so the Redis CPU charged to each delivery is this
# benchmark's alone (the machine's shared Redis may serve other work).
#
# Env: DURATION (10s), CONNS (64), RATE (500), ROUNDS (2), RUST_LOG for the
# gateway (info), REDIS_PORT (16379), CP (fake|real), CP_URL/CP_PID,
# CLOSED=0 to run the latency rounds only, NO_BUILD=1 to run the release
# binaries already in target/release.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
RATE=${RATE:-500}
ROUNDS=${ROUNDS:-2}
REDIS_PORT=${REDIS_PORT:-16379}
CP=${CP:-fake}
export GRS_WEBHOOK_SECRET=${GRS_WEBHOOK_SECRET:-bench-secret}
BODY=${BODY:-fixtures/github/payloads/octokit-webhooks/workflow_job/waiting.payload.json}
OUT=$(realpath -m "${OUT:-target/bench}")
mkdir -p "$OUT"
REDIS_URL=redis://127.0.0.1:$REDIS_PORT

if [[ -z "${NO_BUILD:-}" ]]; then
  cargo build --release -q -p grs-webhook-gateway --bin grs-webhook-gateway --example bench
  [[ "$CP" == real ]] && cargo build --release -q -p grs-control-plane --bin grs-control-plane
fi
BIN=target/release
EX=target/release/examples/bench

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$OUT" --logfile "$OUT/redis.log" & pids+=($!); REDIS_PID=$!
for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$REDIS_PORT" ping >/dev/null

"$EX" bare --listen 127.0.0.1:18081 --redis "$REDIS_URL" >"$OUT/bare.log" 2>&1 & pids+=($!); BARE_PID=$!
CP_PID=${CP_PID:-}
if [[ -n "${CP_URL:-}" ]]; then
  CP_KIND="control plane at $CP_URL (its Redis is its own: point it at $REDIS_URL)"
elif [[ "$CP" == real ]]; then
  # The real control plane, Redis store, one pool serving the payload's
  # labels, paused so every accepted job stays queued.
  cat >"$OUT/cp-bench.toml" <<TOML
[control_plane]
listen = "127.0.0.1:50161"
store = "redis"
installation_id = "grs-bench"
[redis]
url = "$REDIS_URL"
key_prefix = "grsbench-cp"
[pools.bench]
labels = ["self-hosted", "k8s"]
max_instances = 4
paused = true
[pools.bench.provisioner]
type = "fake"
TOML
  RUST_LOG=warn "$BIN/grs-control-plane" --config "$OUT/cp-bench.toml" >"$OUT/control-plane.log" 2>&1 & pids+=($!); CP_PID=$!
  CP_URL=http://127.0.0.1:50161
  CP_KIND="the real control plane (release, Redis store, paused pool)"
else
  "$EX" fake-cp --listen 127.0.0.1:50151 --redis "$REDIS_URL" >"$OUT/fake-cp.log" 2>&1 & pids+=($!); CP_PID=$!
  CP_URL=http://127.0.0.1:50151
  CP_KIND="fake control plane (tests/support, + pipelined SET NX + XADD to Redis)"
fi
GRS_GATEWAY_LISTEN=127.0.0.1:18080 GRS_GATEWAY_CONTROL_PLANE_URL="$CP_URL" RUST_LOG=${RUST_LOG:-info} \
  "$BIN/grs-webhook-gateway" >"$OUT/gateway.log" 2>&1 & pids+=($!); GW_PID=$!
for port in 18080 18081 ${CP_URL##*:}; do
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done

echo "# $(date -u +%FT%TZ) $(nproc) cores; gateway -> $CP_KIND; body $(wc -c <"$BODY") bytes; duration $DURATION"
id=20000000000
ticks() { [[ -n "$1" && -r /proc/$1/stat ]] && awk '{print $14+$15}' "/proc/$1/stat" || echo 0; }
HZ=$(getconf CLK_TCK)
run() { # name url pids-to-charge extra-args...
  # Prints the load generator's line, then the server-side CPU time per
  # delivery (all processes on the path, Redis included): on a shared
  # machine this is steadier than the rate.
  local name=$1 url=$2 charge=$3; shift 3
  local before=0 after=0 p out ok
  declare -A per_before=()
  for p in $charge; do per_before[$p]=$(ticks "$p"); before=$((before + per_before[$p])); done
  out=$("$EX" load --name "$name" --url "$url" --body "$BODY" --duration "$DURATION" --warmup 0s --first-job-id $id "$@")
  for p in $charge; do after=$((after + $(ticks "$p"))); done
  ok=$(sed -n 's/.*ok=\([0-9]*\).*/\1/p' <<<"$out")
  [[ "$*" == *--rate* ]] && { echo "$out"; id=$((id + 10000000)); return; }
  local parts="" pb pa
  for p in $charge; do
    pb=${per_before[$p]:-0}; pa=$(ticks "$p")
    parts+=" $(tr '\0' ' ' </proc/$p/comm 2>/dev/null | cut -c1-12)=$(awk -v t=$((pa - pb)) -v hz="$HZ" -v n="$ok" 'BEGIN { printf "%.1f", n ? t / hz / n * 1e6 : 0 }')"
  done
  echo -e "$out\tserver_cpu=$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$ok" 'BEGIN { printf "%.1fus/delivery", n ? t / hz / n * 1e6 : 0 }') (us:$parts)"
  id=$((id + 10000000))
}
for r in $(seq "$([[ "${CLOSED:-1}" == 0 ]] && echo 0 || echo "$ROUNDS")"); do
  run bare    http://127.0.0.1:18081/webhook "$BARE_PID $REDIS_PID" --connections "$CONNS"
  run gateway http://127.0.0.1:18080/webhook "$GW_PID $CP_PID $REDIS_PID" --connections "$CONNS"
done
# The closed loop leaves a million or so keys behind; Redis growing its
# keyspace further stalls both receivers alike (rehashing, page faults), which
# is not what the latency rounds are about: they start from an empty Redis.
redis-cli -p "$REDIS_PORT" flushall >/dev/null
for r in $(seq "$ROUNDS"); do
  run bare    http://127.0.0.1:18081/webhook "$BARE_PID $REDIS_PID" --connections 16 --rate "$RATE"
  run gateway http://127.0.0.1:18080/webhook "$GW_PID $CP_PID $REDIS_PID" --connections 16 --rate "$RATE"
done
echo "# bare receiver's stream: $(redis-cli -p "$REDIS_PORT" xlen grsbench:events) entries; Redis memory: $(redis-cli -p "$REDIS_PORT" info memory | sed -n 's/^used_memory_human:\(.*\)\r$/\1/p')"
echo "# gateway batches (events per SubmitJobEvents call):"
curl -s http://127.0.0.1:18080/metrics | grep -E '^grs_gateway_submit_batch_size_(sum|count)' || true
