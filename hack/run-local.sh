#!/usr/bin/env bash
# `make run`: a local control plane, the simulated providers and the gateway, with examples/*.yaml applied.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${PORTCULLIS_RUN_DIR:-$PWD/.run}
PORT=${PORTCULLIS_PORT:-8080}
mkdir -p "$STATE"
BIN=$(hack/control-plane.sh bin-dir)
KUBECTL="$BIN/kubectl"

cleanup() {
  kill "${SIM_PID:-}" "${GW_PID:-}" 2>/dev/null || true
  hack/control-plane.sh stop "$STATE/control-plane" || true
}
trap cleanup EXIT INT TERM

hack/control-plane.sh stop "$STATE/control-plane" 2>/dev/null || true
hack/control-plane.sh start "$STATE/control-plane"
export KUBECONFIG=$STATE/control-plane/kubeconfig
"$KUBECTL" apply -f crds/
"$KUBECTL" wait --for=condition=Established crd/routes.portcullis.dev --timeout=60s

target/debug/portcullis-sim --listen 127.0.0.1:9090 --chunk-delay-ms 50 > "$STATE/sim.log" 2>&1 &
SIM_PID=$!
target/debug/portcullis run --listen "127.0.0.1:$PORT" > "$STATE/gateway.log" 2>&1 &
GW_PID=$!
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break; sleep 0.1; done

"$KUBECTL" apply -f examples/
"$KUBECTL" wait --for=condition=Ready route.portcullis.dev/chat --timeout=30s
"$KUBECTL" get routes.portcullis.dev -A

cat <<MSG

Portcullis is serving on http://127.0.0.1:$PORT (logs in $STATE/). Try:

  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model": "chat", "messages": [{"role": "user", "content": "Hello!"}]}'

  export KUBECONFIG=$KUBECONFIG; $KUBECTL get routes.portcullis.dev -A

Ctrl-C stops everything.
MSG
wait "$GW_PID"
