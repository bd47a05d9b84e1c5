#!/usr/bin/env bash
# The gateway benchmark (see ../BENCH.md). Needs Redis on 127.0.0.1:6379.
#
#   webhook-gateway/bench/run.sh              # against the fake control plane
#   CP_URL=http://127.0.0.1:50051 webhook-gateway/bench/run.sh
#                                             # against a control plane you started
#
# Env: DURATION (10s), CONNS (64), RATE (500), ROUNDS (2), RUST_LOG for the
# gateway (info), CP_PID (a real control plane's pid, to charge its CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
RATE=${RATE:-500}
ROUNDS=${ROUNDS:-2}
export GRS_WEBHOOK_SECRET=${GRS_WEBHOOK_SECRET:-bench-secret}
BODY=${BODY:-fixtures/github/payloads/octokit-webhooks/workflow_job/waiting.payload.json}
OUT=${OUT:-target/bench}
mkdir -p "$OUT"

redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null
cargo build --release -q -p grs-webhook-gateway --bin grs-webhook-gateway --example bench
BIN=target/release
EX=target/release/examples/bench

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  redis-cli --scan --pattern 'grsbench:*' | xargs -r -n 1000 redis-cli del >/dev/null || true
}
trap cleanup EXIT

"$EX" bare --listen 127.0.0.1:18081 >"$OUT/bare.log" 2>&1 & pids+=($!); BARE_PID=$!
CP_PID=${CP_PID:-}
if [[ -z "${CP_URL:-}" ]]; then
  "$EX" fake-cp --listen 127.0.0.1:50151 >"$OUT/fake-cp.log" 2>&1 & pids+=($!); CP_PID=$!
  CP_URL=http://127.0.0.1:50151
  CP_KIND="fake control plane (tests/support, + pipelined SET NX + XADD to Redis)"
else
  CP_KIND="control plane at $CP_URL"
fi
GRS_GATEWAY_LISTEN=127.0.0.1:18080 GRS_GATEWAY_CONTROL_PLANE_URL="$CP_URL" RUST_LOG=${RUST_LOG:-info} \
  "$BIN/grs-webhook-gateway" >"$OUT/gateway.log" 2>&1 & pids+=($!); GW_PID=$!
for port in 18080 18081; do
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done

echo "# $(date -u +%FT%TZ) $(nproc) cores; gateway -> $CP_KIND; body $(wc -c <"$BODY") bytes; duration $DURATION"
id=20000000000
REDIS_PID=$(pgrep -x redis-server | head -1 || true)
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
for r in $(seq "$ROUNDS"); do
  run bare    http://127.0.0.1:18081/webhook "$BARE_PID $REDIS_PID" --connections "$CONNS"
  run gateway http://127.0.0.1:18080/webhook "$GW_PID $CP_PID $REDIS_PID" --connections "$CONNS"
done
for r in $(seq "$ROUNDS"); do
  run bare    http://127.0.0.1:18081/webhook "$BARE_PID $REDIS_PID" --connections 16 --rate "$RATE"
  run gateway http://127.0.0.1:18080/webhook "$GW_PID $CP_PID $REDIS_PID" --connections 16 --rate "$RATE"
done
echo "# redis stream length: $(redis-cli xlen grsbench:events)"
