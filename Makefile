# Portcullis: `make run` brings up a local control plane, a simulated provider and the gateway;
# `make test` runs every test. Both install what they need (the control-plane binaries are built
# once into ~/.cache/portcullis and reused).

CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: run test unit-test e2e-test control-plane redis crds lint fmt build clean-cache

build:
	$(CARGO) build --workspace

control-plane:
	hack/control-plane.sh build

# The limits tests start their own redis-server on a free loopback port; install it once (as root).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

run: control-plane
	$(CARGO) build --workspace --release
	hack/run-local.sh

test: control-plane redis lint
	$(CARGO) test --workspace --no-fail-fast

unit-test:
	$(CARGO) test --workspace --lib --bins

e2e-test: control-plane redis
	$(CARGO) test --workspace --tests

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
