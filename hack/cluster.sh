#!/usr/bin/env bash
# A real single-node Kubernetes cluster on this machine, for `make cluster-up` and `make cluster-test`.
#
#   hack/cluster.sh deps           install what a node needs (Debian packages, the Rust musl target); idempotent
#   hack/cluster.sh build          build kubelet, kube-controller-manager, kube-scheduler, kube-proxy and CoreDNS
#                                  into the cache (once per version), next to control-plane.sh's binaries
#   hack/cluster.sh bin-dir        print the folder holding the node binaries (builds on a miss)
#   hack/cluster.sh images         build the pause, client and simulated-provider images (target/images/*.tar)
#   hack/cluster.sh image          build the gateway's image (target/images/portcullis.tar)
#   hack/cluster.sh up [DIR]       start a fresh cluster with state in DIR (default .cluster); writes DIR/kubeconfig
#   hack/cluster.sh down [DIR]     stop it and remove its network namespace
#   hack/cluster.sh load TAR...    import OCI image archives into the running node's containerd
#   hack/cluster.sh up DIR PID     the same, and the cluster stops by itself once process PID has exited
#   hack/cluster.sh pid ID         host PID of a running container (ID as in a pod's containerStatuses)
#
# Everything runs inside one network namespace (portcullis-cluster) that this script creates: etcd, the
# API server, the controllers, containerd, the kubelet, kube-proxy (iptables) and CoreDNS. Pods hang off a
# CNI bridge in that namespace; it has no route anywhere else. The only door from the host is a relay from
# 127.0.0.1:<port> to the API server (a unix socket crosses the namespace boundary), so kubectl on the host
# works and no traffic ever leaves loopback or the namespace.
set -euo pipefail

K8S_VERSION=1.33.13
COREDNS_VERSION=1.12.0
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE_ROOT=${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}
GO_VERSION=$(go env GOVERSION 2>/dev/null || echo unknown)
NODE_BIN=$CACHE_ROOT/node-k8s-v$K8S_VERSION-coredns-v$COREDNS_VERSION-$GO_VERSION/bin
IMAGES=$ROOT/target/images
MUSL=x86_64-unknown-linux-musl

NETNS=portcullis-cluster
RUN=/run/portcullis-cluster          # sockets: short paths, whatever DIR is
NODE_IP=10.213.0.10                  # the node's address (on the namespace's loopback)
POD_CIDR=10.244.0.0/24
SERVICE_CIDR=10.96.0.0/24
KUBERNETES_SVC_IP=10.96.0.1
NODE_NAME=portcullis-node
GATEWAY_IMAGE=docker.io/library/portcullis:0.1.0
PAUSE_IMAGE=portcullis.local/pause:3.10
CLIENT_IMAGE=portcullis.local/client:1
SIM_IMAGE=portcullis.local/sim-provider:1

say() { printf '[cluster] %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }
in_ns() { nsenter --net="/run/netns/$NETNS" -- "$@"; }

# --- install ----------------------------------------------------------------------------------------

DEBS="containerd runc containernetworking-plugins iptables conntrack socat musl-tools ca-certificates iproute2 curl openssl util-linux"

deps() {
  local missing=""
  for c in containerd runc ctr iptables conntrack socat busybox musl-gcc nsenter ip curl openssl; do
    command -v "$c" >/dev/null 2>&1 || missing="$missing $c"
  done
  [ -x /usr/lib/cni/bridge ] || missing="$missing cni-plugins"
  [ -f /etc/ssl/certs/ca-certificates.crt ] || missing="$missing ca-certificates"
  if [ -n "$missing" ]; then
    [ "$(id -u)" = 0 ] || die "missing:$missing; run as root (apt-get install $DEBS)"
    say "installing Debian packages for:$missing"
    apt-get update -qq
    # busybox-static unless a busybox is there already (the two packages conflict).
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $DEBS \
      $(command -v busybox >/dev/null || echo busybox-static) >/dev/null
  fi
  rustup target list --installed 2>/dev/null | grep -qx "$MUSL" || rustup target add "$MUSL"
}

# --- build ------------------------------------------------------------------------------------------

have_node_bins() {
  local b
  for b in kubelet kube-controller-manager kube-scheduler kube-proxy coredns; do [ -x "$NODE_BIN/$b" ] || return 1; done
}

build() {
  "$HERE/control-plane.sh" build
  if have_node_bins; then
    say "node binaries for Kubernetes v$K8S_VERSION / CoreDNS v$COREDNS_VERSION already cached in $NODE_BIN"
    return 0
  fi
  command -v go >/dev/null || die "go is required to build the node"
  local start tmp minor ldf b
  start=$(date +%s)
  tmp="$NODE_BIN.partial"
  rm -rf "$tmp" && mkdir -p "$tmp"
  export GOMODCACHE=${GOMODCACHE:-$CACHE_ROOT/go/mod}
  export GOCACHE=${GOCACHE:-$CACHE_ROOT/go/build}
  export GOFLAGS=-mod=mod
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  ldf="-s -w -X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
  ldf="$ldf -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  say "step 1/3: downloading Go modules for the node (Kubernetes v$K8S_VERSION, CoreDNS v$COREDNS_VERSION)"
  (cd "$HERE/k8s-bins/node" && go mod download)
  (cd "$HERE/k8s-bins/coredns" && go mod download)
  say "step 2/3: building CoreDNS ($(( $(date +%s) - start ))s so far)"
  (cd "$HERE/k8s-bins/coredns" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/coredns" .)
  say "step 3/3: building kubelet, kube-proxy, kube-scheduler, kube-controller-manager; the long step ($(( $(date +%s) - start ))s so far)"
  for b in kubelet kube-proxy kube-scheduler kube-controller-manager; do
    (cd "$HERE/k8s-bins/node" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldf" -o "$tmp/$b" "k8s.io/kubernetes/cmd/$b")
    say "$b built ($(( $(date +%s) - start ))s so far)"
  done
  rm -rf "$NODE_BIN" && mv "$tmp" "$NODE_BIN"
  say "node build took $(( $(date +%s) - start ))s; binaries in $NODE_BIN"
}

# --- images -----------------------------------------------------------------------------------------

# Static (musl) release binaries: the images have no libc. Both packages in one invocation, so their
# shared dependencies are built once with the same features and later builds are incremental.
static_build() {
  rustup target list --installed 2>/dev/null | grep -qx "$MUSL" || die "the $MUSL Rust target is missing: run hack/cluster.sh deps"
  (cd "$ROOT" && CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --locked --target "$MUSL" \
    -p portcullis -p portcullis-sim --bins)
}

image() {
  static_build
  python3 "$HERE/oci-image.py" --ref "$GATEWAY_IMAGE" --config "$HERE/image/portcullis.json" \
    --out "$IMAGES/portcullis.tar" \
    --file "$ROOT/target/$MUSL/release/portcullis:/portcullis:0755" \
    --file /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt \
    --file "$HERE/image/passwd:/etc/passwd" --file "$HERE/image/group:/etc/group" \
    --dir /tmp:1777 --dir /home/nonroot:0700:65532
}

images() {
  mkdir -p "$IMAGES"
  musl-gcc -static -Os -s -o "$IMAGES/pause" "$HERE/image/pause.c"
  python3 "$HERE/oci-image.py" --ref "$PAUSE_IMAGE" --config "$HERE/image/pause.json" --out "$IMAGES/pause.tar" \
    --file "$IMAGES/pause:/pause:0755"
  # The client: busybox's shell and tools, and curl (with its shared libraries) for HTTP and streams.
  local links=()
  for t in sh cat sleep date echo seq expr test grep sed wc head tail tr env id touch ls mkdir rm true false printf; do
    links+=(--symlink "busybox:/bin/$t")
  done
  python3 "$HERE/oci-image.py" --ref "$CLIENT_IMAGE" --config "$HERE/image/client.json" --out "$IMAGES/client.tar" \
    --with-libs "$(command -v busybox):/bin/busybox" --with-libs "$(command -v curl):/usr/bin/curl" \
    --file /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt \
    --file "$HERE/image/passwd:/etc/passwd" --file "$HERE/image/group:/etc/group" \
    --dir /tmp:1777 "${links[@]}"
  static_build
  python3 "$HERE/oci-image.py" --ref "$SIM_IMAGE" --config "$HERE/image/sim.json" --out "$IMAGES/sim-provider.tar" \
    --file "$ROOT/target/$MUSL/release/portcullis-sim:/portcullis-sim:0755"
}

# --- cluster ----------------------------------------------------------------------------------------

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

pki() {
  local p=$1/pki
  mkdir -p "$p"
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$p/ca.key" -out "$p/ca.crt" -days 30 \
    -subj /CN=portcullis-cluster-ca 2>/dev/null
  sign() { # name subject extfile-text
    openssl req -newkey rsa:2048 -nodes -keyout "$p/$1.key" -out "$p/$1.csr" -subj "$2" 2>/dev/null
    printf '%b' "$3" > "$p/$1.ext"
    openssl x509 -req -in "$p/$1.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial \
      -out "$p/$1.crt" -days 30 -extfile "$p/$1.ext" 2>/dev/null
  }
  local base='basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n'
  sign apiserver /CN=kube-apiserver "${base}extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,IP:$NODE_IP,IP:$KUBERNETES_SVC_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
  sign kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "${base}extendedKeyUsage=clientAuth\n"
  sign kubelet "/CN=$NODE_NAME" "${base}extendedKeyUsage=serverAuth\nsubjectAltName=IP:$NODE_IP,DNS:$NODE_NAME\n"
  openssl genrsa -out "$p/sa.key" 2048 2>/dev/null
  echo "admin-token-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'),admin,uid-admin,system:masters" > "$p/tokens.csv"
}

kubeconfig() { # dir server out
  local token
  token=$(cut -d, -f1 "$1/pki/tokens.csv")
  cat > "$3" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: portcullis-cluster
  cluster:
    server: $2
    certificate-authority: $1/pki/ca.crt
users:
- name: admin
  user:
    token: $token
contexts:
- name: admin
  context:
    cluster: portcullis-cluster
    user: admin
    namespace: default
current-context: admin
EOF
}

wait_until() { # seconds what log command...
  local secs=$1 what=$2 log=$3 i
  shift 3
  for i in $(seq 1 $(( secs * 5 ))); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  say "$what did not become ready in ${secs}s; log tail ($log):"
  tail -40 "$log" >&2 || true
  return 1
}

spawn() { # name cmd... : runs in the namespace, logs to DIR/log/name.log, pid in DIR/pids/name
  local name=$1
  shift
  nohup nsenter --net="/run/netns/$NETNS" -- "$@" >>"$D/log/$name.log" 2>&1 &
  echo $! > "$D/pids/$name"
}

write_configs() {
  local d=$1
  mkdir -p "$d/config" "$d/cni/net.d" "$d/cni/ipam"
  cat > "$d/config/containerd.toml" <<EOF
version = 2
root = "$d/containerd"
state = "$RUN/containerd"
[grpc]
  address = "$RUN/containerd.sock"
[ttrpc]
  address = "$RUN/containerd.sock.ttrpc"
[debug]
  level = "warn"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  # Every image is built here and imported; nothing is ever pulled.
  sandbox_image = "$PAUSE_IMAGE"
  enable_selinux = false
  # Where root lacks CAP_SYS_RESOURCE (sandboxed machines), nobody may lower an OOM score below
  # containerd's own: clamp the kubelet's negative scores instead of failing every sandbox.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$RUN/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$d/cni/net.d"
EOF
  cat > "$d/cni/net.d/10-portcullis.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "portcullis",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "pc-br0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$d/cni/ipam"
      }
    }
  ]
}
EOF
  # Pods with dnsPolicy Default resolve with the cluster DNS too: there is no other resolver.
  printf 'nameserver %s\n' "$NODE_IP" > "$d/config/resolv.conf"
  cat > "$d/config/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $d/pki/kubelet.crt
tlsPrivateKeyFile: $d/pki/kubelet.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $d/pki/ca.crt}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$RUN/containerd.sock
clusterDomain: cluster.local
clusterDNS: [$NODE_IP]
resolvConf: $d/config/resolv.conf
podLogsDir: $d/pod-logs
failSwapOn: false
# Images are built locally and cannot be pulled again: never collect them.
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
podCIDR: $POD_CIDR
maxPods: 110
serializeImagePulls: false
shutdownGracePeriod: 0s
EOF
  cat > "$d/config/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $d/kubeconfig.internal}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: [primary]
# The namespace's conntrack table is the kernel's: leave its global sizes alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
  cat > "$d/config/Corefile" <<EOF
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    bind $NODE_IP
    errors
    health 127.0.0.1:10054
    ready 127.0.0.1:10181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $d/kubeconfig.internal admin
        pods insecure
    }
    cache 5
    loadbalance
}
# Nothing outside the cluster resolves: there is nowhere to forward to.
.:53 {
    bind $NODE_IP
    errors
}
EOF
}

up() {
  local d=$1 cp_bin port
  command -v containerd >/dev/null && [ -x /usr/lib/cni/bridge ] && command -v socat >/dev/null \
    || die "missing node packages: run hack/cluster.sh deps (make cluster-up does)"
  cp_bin=$("$HERE/control-plane.sh" bin-dir)
  have_node_bins || build
  [ ! -d "$d/pids" ] || down "$d" 2>/dev/null || true
  rm -rf "$d" && mkdir -p "$d/log" "$d/pids" "$RUN"
  d=$(cd "$d" && pwd)
  D=$d
  local start
  start=$(date +%s)

  ip netns add "$NETNS" 2>/dev/null || die "another local cluster is up (network namespace $NETNS exists): hack/cluster.sh down [ITS DIR]"
  ip -n "$NETNS" link set lo up
  ip -n "$NETNS" addr add "$NODE_IP/32" dev lo
  in_ns sysctl -qw net.ipv4.ip_forward=1
  # Service traffic between pods on the one bridge must pass iptables (kube-proxy's DNAT).
  in_ns sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true

  pki "$d"
  kubeconfig "$d" https://127.0.0.1:6443 "$d/kubeconfig.internal"
  port=$(free_port)
  echo "$port" > "$d/apiserver-port"
  kubeconfig "$d" "https://127.0.0.1:$port" "$d/kubeconfig"
  write_configs "$d"

  spawn etcd "$cp_bin/etcd" --data-dir "$d/etcd" --name portcullis \
    --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
    --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
    --initial-cluster portcullis=http://127.0.0.1:2380 --listen-metrics-urls http://127.0.0.1:2381 \
    --unsafe-no-fsync --log-level warn
  wait_until 30 etcd "$d/log/etcd.log" in_ns curl -fs http://127.0.0.1:2379/health

  local p=$d/pki
  spawn kube-apiserver "$cp_bin/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --advertise-address="$NODE_IP" --secure-port=6443 --cert-dir="$d/certs" \
    --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
    --token-auth-file="$p/tokens.csv" --client-ca-file="$p/ca.crt" --authorization-mode=Node,RBAC \
    --kubelet-client-certificate="$p/kubelet-client.crt" --kubelet-client-key="$p/kubelet-client.key" \
    --kubelet-certificate-authority="$p/ca.crt" --kubelet-preferred-address-types=InternalIP \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$p/sa.key" --service-account-signing-key-file="$p/sa.key" \
    --service-cluster-ip-range="$SERVICE_CIDR" --allow-privileged=false --profiling=false
  wait_until 90 kube-apiserver "$d/log/kube-apiserver.log" in_ns curl -fsk https://127.0.0.1:6443/readyz

  # The host's only door: 127.0.0.1:$port -> unix socket -> the API server inside the namespace.
  spawn relay-in socat "UNIX-LISTEN:$RUN/apiserver.sock,fork,unlink-early" TCP:127.0.0.1:6443
  nohup socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$RUN/apiserver.sock" \
    >>"$d/log/relay-out.log" 2>&1 &
  echo $! > "$d/pids/relay-out"
  wait_until 30 "API server relay" "$d/log/relay-out.log" curl -fsk "https://127.0.0.1:$port/readyz"

  spawn kube-controller-manager "$NODE_BIN/kube-controller-manager" --kubeconfig="$d/kubeconfig.internal" \
    --authentication-kubeconfig="$d/kubeconfig.internal" --authorization-kubeconfig="$d/kubeconfig.internal" \
    --bind-address=127.0.0.1 --secure-port=10257 --leader-elect=false \
    --service-account-private-key-file="$p/sa.key" --root-ca-file="$p/ca.crt" \
    --use-service-account-credentials=true --service-cluster-ip-range="$SERVICE_CIDR" \
    --cluster-cidr="$POD_CIDR" --allocate-node-cidrs=false --profiling=false
  spawn kube-scheduler "$NODE_BIN/kube-scheduler" --kubeconfig="$d/kubeconfig.internal" \
    --authentication-kubeconfig="$d/kubeconfig.internal" --authorization-kubeconfig="$d/kubeconfig.internal" \
    --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false --profiling=false

  spawn containerd containerd --config "$d/config/containerd.toml"
  wait_until 30 containerd "$d/log/containerd.log" ctr --address "$RUN/containerd.sock" version
  local tar
  for tar in "$IMAGES"/pause.tar "$IMAGES"/client.tar "$IMAGES"/sim-provider.tar "$IMAGES"/portcullis.tar; do
    [ -f "$tar" ] && load_one "$tar"
  done
  ctr --address "$RUN/containerd.sock" -n k8s.io images ls -q | grep -qx "$PAUSE_IMAGE" \
    || die "the pause image is missing: run hack/cluster.sh images first"

  spawn kubelet "$NODE_BIN/kubelet" --config="$d/config/kubelet.yaml" --kubeconfig="$d/kubeconfig.internal" \
    --root-dir="$d/kubelet" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
  spawn kube-proxy "$NODE_BIN/kube-proxy" --config="$d/config/kube-proxy.yaml"
  spawn coredns "$NODE_BIN/coredns" -conf "$d/config/Corefile"

  local k="$cp_bin/kubectl --kubeconfig=$d/kubeconfig"
  wait_until 120 "node $NODE_NAME" "$d/log/kubelet.log" \
    $k wait --for=condition=Ready "node/$NODE_NAME" --timeout=2s
  wait_until 60 "the default ServiceAccount" "$d/log/kube-controller-manager.log" \
    $k get serviceaccount default
  wait_until 30 CoreDNS "$d/log/coredns.log" in_ns curl -fs http://127.0.0.1:10181/ready
  say "cluster ready in $(( $(date +%s) - start ))s; export KUBECONFIG=$d/kubeconfig (kubectl: $cp_bin/kubectl)"
}

load_one() {
  ctr --address "$RUN/containerd.sock" -n k8s.io images import "$1" >/dev/null \
    || die "could not import $1"
  say "loaded $(basename "$1")"
}

stop_pid() { # pidfile
  [ -f "$1" ] || return 0
  local pid
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$1"
}

down() {
  local d=$1 n
  if [ -d "$d/pids" ]; then
    # The kubelet first, so it does not restart what is being stopped; containerd's shims after it.
    for n in relay-out kubelet kube-proxy coredns kube-scheduler kube-controller-manager; do stop_pid "$d/pids/$n"; done
    if [ -S "$RUN/containerd.sock" ]; then
      local ids
      # Pod network namespaces (CNI's, pinned under /var/run/netns): removed once containerd is gone.
      for n in $(ctr --address "$RUN/containerd.sock" -n k8s.io containers ls -q 2>/dev/null || true); do
        ctr --address "$RUN/containerd.sock" -n k8s.io containers info "$n" 2>/dev/null \
          | grep -o '"path": "/var/run/netns/cni-[0-9a-f-]*"' | cut -d'"' -f4 >> "$d/pod-netns" || true
      done
      ids=$(ctr --address "$RUN/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null || true)
      for n in $ids; do ctr --address "$RUN/containerd.sock" -n k8s.io tasks kill -s SIGKILL "$n" >/dev/null 2>&1 || true; done
      sleep 1
    fi
    for n in containerd relay-in kube-apiserver etcd; do stop_pid "$d/pids/$n"; done
  fi
  # Shims outlive containerd by design; those of this cluster are found by their socket folder.
  for n in $(pgrep -f "containerd-shim-runc-v2 .*-address $RUN/containerd.sock" 2>/dev/null || true); do
    kill -9 "$n" 2>/dev/null || true
  done
  # Pod volumes (tmpfs, projected tokens) and container root filesystems mounted under DIR.
  if [ -d "$d" ]; then
    grep -o " $(cd "$d" && pwd)/[^ ]*" /proc/self/mounts 2>/dev/null | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done || true
  fi
  grep -o " $RUN/[^ ]*" /proc/self/mounts 2>/dev/null | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done || true
  if [ -f "$d/pod-netns" ]; then
    for n in $(sort -u "$d/pod-netns"); do ip netns del "$(basename "$n")" 2>/dev/null || true; done
    rm -f "$d/pod-netns"
  fi
  ip netns del "$NETNS" 2>/dev/null || true
  rm -rf "$RUN"
}

# Sourced (for debugging a step by hand): define the functions only.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0
cmd=${1:-}
DIR=${2:-$ROOT/.cluster}
case "$cmd" in
  deps) deps ;;
  build) build ;;
  bin-dir) have_node_bins || build; echo "$NODE_BIN" ;;
  image) deps >/dev/null; image ;;
  images) deps >/dev/null; images ;;
  up)
    up "$DIR"
    if [ -n "${3:-}" ]; then
      # Detached watchdog: a test process that dies without stopping its cluster does not leak one.
      nohup bash -c "while kill -0 $3 2>/dev/null; do sleep 1; done; '$0' down '$DIR'" >/dev/null 2>&1 &
    fi
    ;;
  down) down "$DIR"; say "cluster stopped" ;;
  load) shift; for t in "$@"; do load_one "$t"; done ;;
  loaded) [ -S "$RUN/containerd.sock" ] ;;
  tag) ctr --address "$RUN/containerd.sock" -n k8s.io images tag --force "$2" "$3" >/dev/null ;;
  pid) # CONTAINER_ID: the host PID of a running container's process
    ctr --address "$RUN/containerd.sock" -n k8s.io tasks ls | awk -v id="${2#containerd://}" '$1 == id {print $2}' ;;
  *) sed -n '2,15p' "$0" >&2; exit 2 ;;
esac
