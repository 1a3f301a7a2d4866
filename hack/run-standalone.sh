#!/usr/bin/env bash
# `make run-standalone`: the simulated provider and `portcullis serve` on examples/ (Route and Secret
# manifests) plus examples/migrate/mlflow-gateway.yaml (an MLflow gateway config, as is). No
# Kubernetes, no Go build: up in a second once the Rust binaries are built.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${PORTCULLIS_RUN_DIR:-$PWD/.run}
PORT=${PORTCULLIS_PORT:-8080}
SIM_PORT=9090
mkdir -p "$STATE"

cleanup() {
  kill "${SIM_PID:-}" "${GW_PID:-}" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

target/debug/portcullis-sim --listen "127.0.0.1:$SIM_PORT" --chunk-delay-ms 50 > "$STATE/sim.log" 2>&1 &
SIM_PID=$!
# The MLflow config names $OPENAI_API_KEY, as MLflow's examples do; the simulated provider takes any key.
OPENAI_API_KEY=${OPENAI_API_KEY:-sk-local-demo-key} \
  target/debug/portcullis serve --config examples/ --config examples/migrate/mlflow-gateway.yaml \
  --listen "127.0.0.1:$PORT" --metrics-listen 127.0.0.1:9464 > "$STATE/gateway.log" 2>&1 &
GW_PID=$!
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$GW_PID" 2>/dev/null || { cat "$STATE/gateway.log"; exit 1; }
  sleep 0.1
done
curl -fs "http://127.0.0.1:$PORT/readyz" >/dev/null || { cat "$STATE/gateway.log"; exit 1; }

cat <<MSG

Portcullis is serving examples/ on http://127.0.0.1:$PORT without Kubernetes (logs in $STATE/).
Edit or add files under examples/: changes apply within a second. Try:

  curl -s http://127.0.0.1:$PORT/v1/chat/completions -H 'content-type: application/json' \\
    -d '{"model": "chat", "messages": [{"role": "user", "content": "Hello!"}]}'

  curl -s http://127.0.0.1:$PORT/endpoints/mlflow-chat/invocations -H 'content-type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Hello!"}]}'

Ctrl-C stops everything.
MSG
wait "$GW_PID"
