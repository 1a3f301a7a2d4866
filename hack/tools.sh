#!/usr/bin/env bash
# Prints the path of a pinned tool, installing it into ~/.cache/portcullis/tools on first use.
#   hack/tools.sh oha                        load generator (make bench)
#   hack/tools.sh helm                       Helm v4 (tests/helm.rs, make cluster-test)
#   hack/tools.sh promtool                   Prometheus' promtool (dashboard queries, alert rules)
#   hack/tools.sh prometheus-operator-crds   folder of the monitoring.coreos.com CRDs (ServiceMonitor,
#                                            PrometheusRule) for `kubectl apply --dry-run=server`
#   hack/tools.sh lwepp                      the Inference Extension's endpoint picker (tests/pools.rs)
# The Go tools are built from the Go module proxy like hack/control-plane.sh builds kube-apiserver,
# keyed by tool and Go version, so a fresh clone on the same machine reuses them.
set -euo pipefail
CACHE_ROOT=${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}
CACHE=$CACHE_ROOT/tools
HELM_VERSION=4.3.2
# Prometheus 3.x is published to the module proxy as v0.3xx.y (3.16.0 -> v0.316.0).
PROMETHEUS_VERSION=3.16.0
PROMETHEUS_MODULE_VERSION=0.316.0
PROMETHEUS_OPERATOR_VERSION=0.85.0
# The version of deploy/third_party/gateway-api-inference-extension.
INFERENCE_EXTENSION_VERSION=1.6.2

say() { printf '[tools] %s\n' "$*" >&2; }

go_env() {
  command -v go >/dev/null || { say "go is required to build $1"; exit 1; }
  export GOMODCACHE=${GOMODCACHE:-$CACHE_ROOT/go/mod}
  export GOCACHE=${GOCACHE:-$CACHE_ROOT/go/build}
  # `go install pkg@version` builds outside any module; -mod settings do not apply.
  unset GOFLAGS
  GO_VERSION=$(go env GOVERSION)
}

# go_tool NAME PACKAGE@VERSION LDFLAGS: builds one binary into the cache once; prints its path.
go_tool() {
  local name=$1 pkg=$2 ldflags=$3 dir bin start
  dir=$CACHE/$name-${pkg##*@}-$GO_VERSION
  bin=$dir/$name
  if [ ! -x "$bin" ]; then
    start=$(date +%s)
    say "building $name (${pkg##*@}) from the Go module proxy into $dir; a few minutes on 2 cores the first time"
    rm -rf "$dir.partial" && mkdir -p "$dir.partial"
    CGO_ENABLED=0 GOBIN="$dir.partial" go install -trimpath -ldflags "-s -w $ldflags" "$pkg" >&2
    rm -rf "$dir" && mv "$dir.partial" "$dir"
    say "$name built in $(( $(date +%s) - start ))s"
  fi
  echo "$bin"
}

case "${1:-}" in
  oha)
    v=1.16.0
    bin=$CACHE/oha-$v/bin/oha
    if [ ! -x "$bin" ]; then
      echo "[tools] installing oha $v (load generator) into $CACHE; a few minutes the first time" >&2
      cargo install oha --version "$v" --locked --root "$CACHE/oha-$v" >&2
    fi
    echo "$bin"
    ;;
  helm)
    go_env helm
    v=internal/version
    go_tool helm "helm.sh/helm/v4/cmd/helm@v$HELM_VERSION" \
      "-X helm.sh/helm/v4/$v.version=v$HELM_VERSION -X helm.sh/helm/v4/$v.gitTreeState=clean"
    ;;
  promtool)
    go_env promtool
    go_tool promtool "github.com/prometheus/prometheus/cmd/promtool@v$PROMETHEUS_MODULE_VERSION" \
      "-X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION"
    ;;
  prometheus-operator-crds)
    go_env "the Prometheus Operator CRDs"
    mod=github.com/prometheus-operator/prometheus-operator@v$PROMETHEUS_OPERATOR_VERSION
    dir=$CACHE/prometheus-operator-crds-v$PROMETHEUS_OPERATOR_VERSION
    if [ ! -f "$dir/monitoring.coreos.com_servicemonitors.yaml" ]; then
      say "downloading $mod (its example/prometheus-operator-crd/) from the Go module proxy"
      src=$(cd "$CACHE_ROOT" 2>/dev/null || cd /; go mod download -json "$mod" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
      rm -rf "$dir.partial" && mkdir -p "$dir.partial"
      for crd in servicemonitors prometheusrules; do
        cp "$src/example/prometheus-operator-crd/monitoring.coreos.com_$crd.yaml" "$dir.partial/"
      done
      chmod -R u+w "$dir.partial"
      rm -rf "$dir" && mv "$dir.partial" "$dir"
    fi
    echo "$dir"
    ;;
  lwepp)
    # The module's own endpoint picker (cmd/lwepp: Envoy ext_proc, round robin over the pool's
    # Ready pods); about 10 minutes cold on 2 cores, most of it downloading and compiling
    # controller-runtime and client-go.
    go_env lwepp
    go_tool lwepp "sigs.k8s.io/gateway-api-inference-extension/cmd/lwepp@v$INFERENCE_EXTENSION_VERSION" ""
    ;;
  *) echo "usage: hack/tools.sh oha|helm|promtool|prometheus-operator-crds|lwepp" >&2; exit 2 ;;
esac
