#!/usr/bin/env bash
# A real, throw-away Kubernetes control plane (etcd + kube-apiserver) for `make run` and the tests.
#
#   hack/control-plane.sh build            build kube-apiserver, kubectl, etcd into the cache (once per version)
#   hack/control-plane.sh bin-dir          print the folder holding the binaries (builds on a miss)
#   hack/control-plane.sh start DIR [PID [remove]]
#                                          start etcd + kube-apiserver with state in DIR; writes DIR/kubeconfig;
#                                          with PID, both stop by themselves once that process has exited
#                                          (and DIR is deleted then too with `remove`)
#   hack/control-plane.sh stop DIR         stop both
#   hack/control-plane.sh stop-apiserver DIR / start-apiserver DIR   for outage tests (same port, same certs)
#
# The binaries are built from the Go module proxy through the wrapper modules in hack/k8s-bins/ and kept
# under ~/.cache/portcullis, keyed by version, so CI's fresh clone on the same machine reuses them.
set -euo pipefail

K8S_VERSION=1.33.13
ETCD_VERSION=3.5.35
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}
GO_VERSION=$(go env GOVERSION 2>/dev/null || echo unknown)
BIN=$CACHE_ROOT/k8s-v$K8S_VERSION-etcd-v$ETCD_VERSION-$GO_VERSION/bin

say() { printf '[control-plane] %s\n' "$*" >&2; }

have_bins() {
  [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kubectl" ] && [ -x "$BIN/etcd" ] && [ -x "$BIN/etcdctl" ]
}

build() {
  if have_bins; then
    say "binaries for Kubernetes v$K8S_VERSION / etcd v$ETCD_VERSION already cached in $BIN"
    return 0
  fi
  command -v go >/dev/null || { say "go is required to build the control plane"; exit 1; }
  local start tmp minor ldf
  start=$(date +%s)
  tmp="$BIN.partial"
  rm -rf "$tmp" && mkdir -p "$tmp"
  # Go's own caches stay outside the checkout too.
  export GOMODCACHE=${GOMODCACHE:-$CACHE_ROOT/go/mod}
  export GOCACHE=${GOCACHE:-$CACHE_ROOT/go/build}
  export GOFLAGS=-mod=mod
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  ldf="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
  ldf="$ldf -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"

  say "step 1/4: downloading Go modules for etcd v$ETCD_VERSION"
  (cd "$HERE/k8s-bins/etcd" && go mod download)
  say "step 2/4: building etcd and etcdctl ($(( $(date +%s) - start ))s so far)"
  (cd "$HERE/k8s-bins/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3 \
    && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/etcdctl" go.etcd.io/etcd/etcdctl/v3)
  say "step 3/4: downloading Go modules for Kubernetes v$K8S_VERSION ($(( $(date +%s) - start ))s so far)"
  (cd "$HERE/k8s-bins/apiserver" && go mod download)
  say "step 4/4: building kube-apiserver and kubectl; this is the long step (many minutes on 2 cores) ($(( $(date +%s) - start ))s so far)"
  (cd "$HERE/k8s-bins/apiserver" \
    && CGO_ENABLED=0 go build -trimpath -ldflags "$ldf" -o "$tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver \
    && say "kube-apiserver built ($(( $(date +%s) - start ))s so far); building kubectl" \
    && CGO_ENABLED=0 go build -trimpath -ldflags "$ldf" -o "$tmp/kubectl" k8s.io/kubernetes/cmd/kubectl)
  rm -rf "$BIN" && mv "$tmp" "$BIN"
  say "control-plane build took $(( $(date +%s) - start ))s; binaries in $BIN"
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# Certificates, tokens and ports are made once per DIR so the apiserver can be restarted in place.
prepare() {
  local d=$1
  mkdir -p "$d/pki" "$d/log"
  [ -f "$d/ports" ] || echo "ETCD_PORT=$(free_port) APISERVER_PORT=$(free_port)" > "$d/ports"
  # shellcheck disable=SC1091
  . "$d/ports"
  local p=$d/pki
  if [ ! -f "$p/apiserver.crt" ]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$p/ca.key" -out "$p/ca.crt" -days 30 \
      -subj /CN=portcullis-test-ca 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout "$p/apiserver.key" -out "$p/apiserver.csr" \
      -subj /CN=kube-apiserver 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > "$p/san.ext"
    openssl x509 -req -in "$p/apiserver.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
      -out "$p/apiserver.crt" -days 30 -extfile "$p/san.ext" 2>/dev/null
    openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
    echo "admin-token-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n'),admin,uid-admin,system:masters" > "$p/tokens.csv"
  fi
  local token
  token=$(cut -d, -f1 "$p/tokens.csv" | head -1)
  cat > "$d/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: portcullis-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $p/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: admin
  context:
    cluster: portcullis-local
    user: admin
    namespace: default
current-context: admin
EOF
}

wait_for() { # url, what, seconds
  local i
  for i in $(seq 1 $(( $3 * 10 ))); do
    if curl -fsk --max-time 1 "$1" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  say "$2 did not become ready in $3s; log tail:"
  tail -30 "$4" >&2 || true
  return 1
}

start_etcd() {
  local d=$1
  . "$d/ports"
  "$BIN/etcd" --data-dir "$d/etcd" --name portcullis \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls http://127.0.0.1:0 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster portcullis=http://127.0.0.1:2380 \
    --unsafe-no-fsync --log-level warn >>"$d/log/etcd.log" 2>&1 &
  echo $! > "$d/etcd.pid"
  wait_for "http://127.0.0.1:$ETCD_PORT/health" etcd 30 "$d/log/etcd.log"
}

start_apiserver() {
  local d=$1 p=$1/pki
  . "$d/ports"
  "$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$APISERVER_PORT" --cert-dir="$d/certs" \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
    --token-auth-file="$p/tokens.csv" --client-ca-file="$p/ca.crt" --authorization-mode=RBAC \
    --service-account-issuer="https://127.0.0.1:$APISERVER_PORT" --service-account-key-file="$p/sa.key" \
    --service-account-signing-key-file="$p/sa.key" --api-audiences=portcullis,https://127.0.0.1:$APISERVER_PORT \
    --service-cluster-ip-range=10.0.0.0/24 --disable-admission-plugins=ServiceAccount \
    ${PORTCULLIS_APISERVER_ARGS:-} >>"$d/log/kube-apiserver.log" 2>&1 &
  echo $! > "$d/apiserver.pid"
  wait_for "https://127.0.0.1:$APISERVER_PORT/readyz" kube-apiserver 90 "$d/log/kube-apiserver.log"
}

stop_pid() { # pidfile
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

cmd=${1:-}
case "$cmd" in
  build) build ;;
  bin-dir) have_bins || build; echo "$BIN" ;;
  start)
    d=${2:?usage: start DIR}; mkdir -p "$d"; d=$(cd "$d" && pwd)
    have_bins || build
    prepare "$d"
    start_etcd "$d"
    start_apiserver "$d"
    if [ -n "${3:-}" ]; then
      owner=$3
      # Detached watchdog: tests that leak a control plane (a killed test binary) do not leak processes.
      # A test binary's shared control plane lives in a static that is never dropped: `remove` makes
      # the watchdog delete its state too, or every test run would leave ~100 MB of etcd data behind.
      cleanup=""
      [ "${4:-}" = remove ] && cleanup="; rm -rf '$d'"
      nohup bash -c "while kill -0 $owner 2>/dev/null; do sleep 1; done; '$0' stop '$d'$cleanup" >/dev/null 2>&1 &
    fi
    say "control plane ready; KUBECONFIG=$d/kubeconfig"
    ;;
  stop) d=${2:?usage: stop DIR}; stop_pid "$d/apiserver.pid"; stop_pid "$d/etcd.pid" ;;
  stop-apiserver) stop_pid "${2:?usage: stop-apiserver DIR}/apiserver.pid" ;;
  start-apiserver) d=${2:?usage: start-apiserver DIR}; d=$(cd "$d" && pwd); start_apiserver "$d" ;;
  *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
