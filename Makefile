# Portcullis: `make run` brings up a local control plane, a simulated provider and the gateway;
# `make run-standalone` serves the same examples from files, without Kubernetes; `make test` runs
# every test. They install what they need (the control-plane binaries are built once into
# ~/.cache/portcullis and reused).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: tools run run-standalone test unit-test e2e-test control-plane python-env node-env redis crds chart-files lint fmt build bench bench-deps bench-quick bench-callgrind bench-mcp bench-guardrails bench-store bench-cache bench-pool fuzz soak clean-cache \
	cluster-deps cluster-build cluster-images image cluster-up cluster-down cluster-test

build:
	$(CARGO) build --workspace

control-plane:
	hack/control-plane.sh build

# The limits and store tests start their own redis-server processes (plain, TLS, replicas, Sentinels
# via `redis-server --sentinel`, Cluster nodes) on free loopback ports, and `redis-cli --cluster
# create`; Debian's redis-server brings redis-tools (redis-cli, redis-benchmark). Install once (as root).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# The real MLflow 2.5, MLflow 3 and OpenAI SDK clients for tests/clients.rs (venvs under ~/.cache/portcullis).
python-env:
	hack/python-env.sh ensure mlflow25 mlflow3 mcp >/dev/null

node-env:
	hack/node-env.sh ensure >/dev/null

run: control-plane
	$(CARGO) build --workspace
	hack/run-local.sh

# The same gateway without Kubernetes: `portcullis serve` on examples/, no control-plane build.
run-standalone:
	$(CARGO) build --workspace
	hack/run-standalone.sh

# helm, promtool and the Prometheus Operator CRDs for tests/helm.rs, the Inference Extension's
# endpoint picker for tests/pools.rs (built once into ~/.cache/portcullis).
tools:
	hack/tools.sh helm >/dev/null
	hack/tools.sh promtool >/dev/null
	hack/tools.sh prometheus-operator-crds >/dev/null
	hack/tools.sh lwepp >/dev/null

# Same-dialect calls pass through untranslated; the suites that make them with real clients run a
# second time on the translating path (`--no-pass-through`, read from the environment).
test: control-plane python-env node-env redis tools lint
	$(CARGO) test --workspace --no-fail-fast
	PORTCULLIS_NO_PASS_THROUGH=true $(CARGO) test --no-fail-fast --test clients --test richchat --test cost --test providers

unit-test:
	$(CARGO) test --workspace --lib --bins

e2e-test: control-plane python-env node-env redis tools
	$(CARGO) test --workspace --tests

# valgrind (callgrind) counts instructions and allocations per proxied call exactly; install it once (as root).
bench-deps:
	@command -v valgrind >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind; }

# Gateway cost against calling the provider directly and through a bare proxy (the floor);
# writes bench/results/latest.md. Not a test.
bench: control-plane bench-deps redis
	$(CARGO) build --workspace --release
	ulimit -n "$$(ulimit -Hn)"; python3 bench/run.py --oha "$$(hack/tools.sh oha)" \
	  --kubectl "$$(hack/control-plane.sh bin-dir)/kubectl" --control-plane hack/control-plane.sh

# The same harness with small counts, to check it works (writes to bench/results/quick.md).
bench-quick: control-plane bench-deps
	$(CARGO) build --workspace --release
	ulimit -n "$$(ulimit -Hn)"; python3 bench/run.py --quick --reps 3 --out bench/results/quick.md --oha "$$(hack/tools.sh oha)" \
	  --kubectl "$$(hack/control-plane.sh bin-dir)/kubectl" --control-plane hack/control-plane.sh

# Only the per-call counts (callgrind: instructions and allocator calls per proxied chat call) of
# this build and of COMPARE="label=path/to/portcullis ..." (earlier builds), side by side; writes
# bench/results/callgrind.md.
bench-callgrind: control-plane bench-deps
	$(CARGO) build --workspace --release
	python3 bench/run.py --only callgrind --out bench/results/callgrind.md --compare $(COMPARE) \
	  --oha "$$(hack/tools.sh oha)" --kubectl "$$(hack/control-plane.sh bin-dir)/kubectl" \
	  --control-plane hack/control-plane.sh

# Only the MCP row (what a proxied tools/call adds, against a proxied chat call's) and the chat rows it
# is measured beside; writes bench/results/mcp.md.
bench-mcp: control-plane bench-deps
	$(CARGO) build --workspace --release
	python3 bench/run.py --only mcp --out bench/results/mcp.md --oha "$$(hack/tools.sh oha)" \
	  --kubectl "$$(hack/control-plane.sh bin-dir)/kubectl" --control-plane hack/control-plane.sh

# Only the guardrails' rows (built-in detectors' CPU on a 4 KiB prompt, a response policy's
# effect on a stream's first byte); writes bench/results/guardrails.md.
bench-guardrails: control-plane
	$(CARGO) build --workspace --release
	ulimit -n "$$(ulimit -Hn)"; python3 bench/run.py --only guardrails --out bench/results/guardrails.md \
	  --oha "$$(hack/tools.sh oha)" --kubectl "$$(hack/control-plane.sh bin-dir)/kubectl" \
	  --control-plane hack/control-plane.sh

# Only the shared store's rows (round trips per call, store CPU per call, calls/s per Redis core);
# no control plane, no oha. They count the store's work, not the gateway's, so the debug build
# will do (writes to bench/results/store.md).
bench-store: redis
	$(CARGO) build --workspace
	python3 bench/run.py --only store --bin-dir target/debug --out bench/results/store.md \
	  --oha none --kubectl none --control-plane none

# Only the response cache's rows (a hit against the provider and a live call, on the per-replica
# store and on Redis; what a miss adds, and how many store round trips it waits for with the
# store moved 2 ms away); no control plane. Timed, so the release build
# (writes to bench/results/cache.md; `make bench` runs the same rows).
bench-cache: redis
	$(CARGO) build --workspace --release
	ulimit -n "$$(ulimit -Hn)"; python3 bench/run.py --only cache --out bench/results/cache.md \
	  --oha "$$(hack/tools.sh oha)" --kubectl none --control-plane none

# Only the self-hosted pool simulation (load-aware picking vs round robin, time to first token) on
# a debug build (the figures are queueing times of hundreds of ms); writes bench/results/pool.md.
bench-pool: control-plane
	$(CARGO) build --workspace
	python3 bench/run.py --only pool --bin-dir target/debug --out bench/results/pool.md --oha none \
	  --kubectl "$$(hack/control-plane.sh bin-dir)/kubectl" --control-plane hack/control-plane.sh

# Many more proptest cases of every request parser, provider-answer parser and stream decoder
# (src/dataplane/fuzz.rs) than `make test` runs, stopped after FUZZ_SECONDS. Not part of CI.
# Failing cases are saved under proptest-regressions/ and replayed by every later run.
FUZZ_CASES ?= 200000
FUZZ_SECONDS ?= 900
fuzz:
	PORTCULLIS_FUZZ_CASES=$(FUZZ_CASES) timeout $(FUZZ_SECONDS) $(CARGO) test --lib dataplane::fuzz; \
	  rc=$$?; if [ $$rc -eq 124 ]; then echo "fuzz: stopped after $(FUZZ_SECONDS) s without a failure"; else exit $$rc; fi

# Mixed traffic (plain, streaming, abandoned streams, oversized, invalid) against one gateway with
# its RSS sampled; fails on growth after warm-up or on any unexpected answer. Not part of CI.
# SOAK_MINUTES=30 by default; SOAK_BIN_DIR=target/debug skips the release build's wait.
SOAK_MINUTES ?= 30
SOAK_BIN_DIR ?= target/release
soak: control-plane
	$(CARGO) build --workspace $(if $(filter target/release,$(SOAK_BIN_DIR)),--release,)
	python3 bench/soak.py --minutes $(SOAK_MINUTES) --bin-dir $(SOAK_BIN_DIR) \
	  --kubectl "$$(hack/control-plane.sh bin-dir)/kubectl" --control-plane hack/control-plane.sh

crds:
	$(CARGO) run --quiet -- crd > crds/route.yaml
	cp crds/route.yaml deploy/base/crd.yaml
	$(CARGO) run --quiet -- crd --team > crds/team.yaml
	cp crds/team.yaml deploy/base/crd-team.yaml
	$(CARGO) run --quiet -- crd --guardrail > crds/guardrailpolicy.yaml
	cp crds/guardrailpolicy.yaml deploy/base/crd-guardrailpolicy.yaml
	$(CARGO) run --quiet -- crd --mcp > crds/mcpserver.yaml
	cp crds/mcpserver.yaml deploy/base/crd-mcpserver.yaml
	$(MAKE) chart-files

# Copies of one source each, which tests/helm.rs checks byte for byte: the chart's CRDs (Helm installs
# crds/ of the chart), its dashboard and alert rules, and the kustomize PrometheusRule made from the
# plain rules file.
chart-files:
	cp crds/route.yaml crds/team.yaml crds/guardrailpolicy.yaml crds/mcpserver.yaml deploy/helm/portcullis/crds/
	cp deploy/grafana/portcullis.json deploy/prometheus/portcullis-rules.yaml deploy/helm/portcullis/files/
	{ printf '%s\n' '# Generated by `make chart-files` from deploy/prometheus/portcullis-rules.yaml.' \
	    'apiVersion: monitoring.coreos.com/v1' 'kind: PrometheusRule' 'metadata:' '  name: portcullis' 'spec:'; \
	  grep -v '^#' deploy/prometheus/portcullis-rules.yaml | sed 's/^/  /'; } > deploy/components/prometheusrule/prometheusrule.yaml

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# --- A real single-node cluster (hack/cluster.sh): the gateway as pods, called by pods. ------------
# Node packages (containerd, runc, CNI plugins, iptables, ...) and the Rust musl target, as root.
cluster-deps:
	hack/cluster.sh deps

# kubelet, kube-controller-manager, kube-scheduler, kube-proxy, CoreDNS (cached like the control plane).
cluster-build: control-plane
	hack/cluster.sh build

# The gateway's OCI image (target/images/portcullis.tar, docker.io/library/portcullis:0.1.0), built
# without a Docker engine; loaded into the local cluster's containerd when it is up.
image: cluster-deps
	hack/cluster.sh image
	@if hack/cluster.sh loaded; then hack/cluster.sh load target/images/portcullis.tar; fi

# pause, the client pod's image and the simulated provider's image.
cluster-images: cluster-deps
	hack/cluster.sh images

CLUSTER_DIR ?= .cluster

cluster-up: cluster-build cluster-images image
	hack/cluster.sh up $(CLUSTER_DIR)
	@echo "export KUBECONFIG=$(CURDIR)/$(CLUSTER_DIR)/kubeconfig PATH=$$(hack/control-plane.sh bin-dir):\$$PATH"
	@echo "kubectl apply -k deploy/   # see README: Deploying to a cluster"

cluster-down:
	hack/cluster.sh down $(CLUSTER_DIR)

# Brings up its own cluster in target/cluster-test and stops it at the end (not part of `make test`).
cluster-test: cluster-build cluster-images image tools
	hack/cluster.sh down $(CLUSTER_DIR) >/dev/null 2>&1 || true
	$(CARGO) test --test cluster -- --include-ignored --test-threads=1 --show-output

clean-cache:
	rm -rf $(HOME)/.cache/portcullis
