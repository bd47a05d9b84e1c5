#!/usr/bin/env bash
# The gateway benchmark (see ../BENCH.md). Needs Redis on 127.0.0.1:6379.
#
#   webhook-gateway/bench/run.sh              # against the fake control plane
#   CP_URL=http://127.0.0.1:50051 webhook-gateway/bench/run.sh
#                                             # against a control plane you started
#
# Env: DURATION (10s), CONNS (64), RATE (500), ROUNDS (2), RUST_LOG for the
# gateway (info).
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
RATE=${RATE:-500}
ROUNDS=${ROUNDS:-2}
export GRS_WEBHOOK_SECRET=${GRS_WEBHOOK_SECRET:-bench-secret}
BODY=${BODY:-../shared/fixtures/github/payloads/octokit-webhooks/workflow_job/waiting.payload.json}
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

"$EX" bare --listen 127.0.0.1:18081 >"$OUT/bare.log" 2>&1 & pids+=($!)
if [[ -z "${CP_URL:-}" ]]; then
  "$EX" fake-cp --listen 127.0.0.1:50151 >"$OUT/fake-cp.log" 2>&1 & pids+=($!)
  CP_URL=http://127.0.0.1:50151
  CP_KIND="fake control plane (tests/support, + pipelined SET NX + XADD to Redis)"
else
  CP_KIND="control plane at $CP_URL"
fi
GRS_GATEWAY_LISTEN=127.0.0.1:18080 GRS_GATEWAY_CONTROL_PLANE_URL="$CP_URL" RUST_LOG=${RUST_LOG:-info} \
  "$BIN/grs-webhook-gateway" >"$OUT/gateway.log" 2>&1 & pids+=($!)
for port in 18080 18081; do
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done

echo "# $(date -u +%FT%TZ) $(nproc) cores; gateway -> $CP_KIND; body $(wc -c <"$BODY") bytes; duration $DURATION"
id=20000000000
run() { # name url extra-args...
  local name=$1 url=$2; shift 2
  "$EX" load --name "$name" --url "$url" --body "$BODY" --duration "$DURATION" --first-job-id $id "$@"
  id=$((id + 10000000))
}
for r in $(seq "$ROUNDS"); do
  run bare    http://127.0.0.1:18081/webhook --connections "$CONNS"
  run gateway http://127.0.0.1:18080/webhook --connections "$CONNS"
done
for r in $(seq "$ROUNDS"); do
  run bare    http://127.0.0.1:18081/webhook --connections 16 --rate "$RATE"
  run gateway http://127.0.0.1:18080/webhook --connections 16 --rate "$RATE"
done
echo "# redis stream length: $(redis-cli xlen grsbench:events)"
