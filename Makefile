# Portcullis: `make run` brings up a local control plane, a simulated provider and the gateway;
# `make run-standalone` serves the same examples from files, without Kubernetes; `make test` runs
# every test. They install what they need (the control-plane binaries are built once into
# ~/.cache/portcullis and reused).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: run run-standalone test unit-test e2e-test control-plane python-env redis crds lint fmt build bench bench-quick clean-cache

build:
	$(CARGO) build --workspace

control-plane:
	hack/control-plane.sh build

# The limits tests start their own redis-server on a free loopback port; install it once (as root).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# The real MLflow 2.5, MLflow 3 and OpenAI SDK clients for tests/clients.rs (venvs under ~/.cache/portcullis).
python-env:
	hack/python-env.sh ensure mlflow25 mlflow3 >/dev/null

run: control-plane
	$(CARGO) build --workspace
	hack/run-local.sh

# The same gateway without Kubernetes: `portcullis serve` on examples/, no control-plane build.
run-standalone:
	$(CARGO) build --workspace
	hack/run-standalone.sh

test: control-plane python-env redis lint
	$(CARGO) test --workspace --no-fail-fast

unit-test:
	$(CARGO) test --workspace --lib --bins

e2e-test: control-plane python-env redis
	$(CARGO) test --workspace --tests

# Gateway cost against calling the provider directly; writes bench/results/latest.md. Not a test.
bench: control-plane
	$(CARGO) build --workspace --release
	ulimit -n "$$(ulimit -Hn)"; python3 bench/run.py --oha "$$(hack/tools.sh oha)" \
	  --kubectl "$$(hack/control-plane.sh bin-dir)/kubectl" --control-plane hack/control-plane.sh

# The same harness with small counts, to check it works (writes to bench/results/quick.md).
bench-quick: control-plane
	$(CARGO) build --workspace --release
	ulimit -n "$$(ulimit -Hn)"; python3 bench/run.py --quick --reps 3 --out bench/results/quick.md --oha "$$(hack/tools.sh oha)" \
	  --kubectl "$$(hack/control-plane.sh bin-dir)/kubectl" --control-plane hack/control-plane.sh

crds:
	$(CARGO) run --quiet -- crd > crds/route.yaml
	cp crds/route.yaml deploy/base/crd.yaml

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean-cache:
	rm -rf $(HOME)/.cache/portcullis
