#!/usr/bin/env bash
# Build the peer gateway agentgateway (v1.4.1, commit 163ea2146acb) for `make bench`.
#
# usage: build.sh SRC_DIR
#   SRC_DIR: the agentgateway source tree at commit 163ea2146acb7b82082acea30ed691b29079095f
#            (tag v1.4.1), e.g. `git --git-dir=<mirror> archive v1.4.1 | tar -x -C SRC_DIR`.
#
# Applies agentgateway.patch (beside this script) to SRC_DIR, builds the release binary with the
# project's own shipped [profile.release] (lto = true, codegen-units = 1) and toolchain
# (rust-toolchain.toml: 1.97), and caches it at
#   ${PEER_CACHE:-~/.cache/portcullis/peers}/agentgateway-163ea2146acb/agentgateway
# with the patch beside it. Exits 0 quietly if that binary already exists.
#
# Env (all optional):
#   PEER_CACHE          cache root (default ~/.cache/portcullis/peers)
#   CARGO_TARGET_DIR    cargo target dir (default SRC_DIR/target); needs ~10 GB
#   AGW_LTO_FALLBACK=1  build with CARGO_PROFILE_RELEASE_LTO=thin instead of the shipped fat LTO
#                       (NOT the "measured with defaults" build; recorded in BUILDINFO)
# The build is heavy (>1 h on 2 cores, ~6.5 GB at the final link) and runs under `nice -n 19`.
set -euo pipefail

COMMIT=163ea2146acb7b82082acea30ed691b29079095f
TAG=v1.4.1
TOOLCHAIN=1.97
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PATCH="$HERE/agentgateway.patch"
CACHE_ROOT="${PEER_CACHE:-$HOME/.cache/portcullis/peers}"
DEST_DIR="$CACHE_ROOT/agentgateway-${COMMIT:0:12}"
DEST="$DEST_DIR/agentgateway"

if [[ -x "$DEST" ]]; then
	exit 0
fi

SRC="${1:?usage: build.sh SRC_DIR (agentgateway source at $TAG / $COMMIT)}"
SRC="$(cd "$SRC" && pwd)"
[[ -f "$PATCH" ]] || { echo "build.sh: missing $PATCH" >&2; exit 1; }
[[ -f "$SRC/crates/agentgateway-app/Cargo.toml" ]] || { echo "build.sh: $SRC is not an agentgateway source tree" >&2; exit 1; }

# If SRC is a git checkout of the upstream repo, make sure it is the right commit.
if head=$(git -C "$SRC" rev-parse HEAD 2>/dev/null) && git -C "$SRC" cat-file -e "$COMMIT^{commit}" 2>/dev/null; then
	if [[ "$head" != "$COMMIT" ]]; then
		echo "build.sh: $SRC is at $head, expected $COMMIT ($TAG)" >&2
		exit 1
	fi
fi

# Apply the patch once (idempotent: skip if it is already applied).
if patch -p1 -d "$SRC" -R --dry-run -s -f < "$PATCH" >/dev/null 2>&1; then
	echo "build.sh: patch already applied in $SRC"
else
	patch -p1 -d "$SRC" -N -s < "$PATCH"
fi

# Toolchain pinned by the tag's rust-toolchain.toml (with the components it lists).
if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
	rustup toolchain install "$TOOLCHAIN" --profile minimal -c clippy,rustfmt,rust-docs
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SRC/target}"
export VERSION="$TAG" GIT_REVISION="$COMMIT" IGNORE_DIRTY_TREE=1
PROFILE_DESC="shipped [profile.release]: lto=true (fat), codegen-units=1, opt-level=3"
if [[ "${AGW_LTO_FALLBACK:-0}" == 1 ]]; then
	export CARGO_PROFILE_RELEASE_LTO=thin
	PROFILE_DESC="FALLBACK: [profile.release] with CARGO_PROFILE_RELEASE_LTO=thin, codegen-units=1"
fi

start=$(date +%s)
(cd "$SRC" && nice -n 19 cargo build --release -p agentgateway-app --bin agentgateway)
end=$(date +%s)

BIN="$CARGO_TARGET_DIR/release/agentgateway"
"$BIN" --version >/dev/null
mkdir -p "$DEST_DIR"
cp "$PATCH" "$DEST_DIR/agentgateway.patch"
cat > "$DEST_DIR/BUILDINFO" <<EOF
agentgateway $TAG commit $COMMIT + agentgateway.patch (sha256 $(sha256sum "$PATCH" | cut -d' ' -f1))
toolchain: $(cd "$SRC" && rustc --version)
profile: $PROFILE_DESC
command: cargo build --release -p agentgateway-app --bin agentgateway (default features: jemalloc, mimalloc, tls-aws-lc; no ui)
build seconds: $((end - start))
built: $(date -u +%FT%TZ)
EOF
cp "$BIN" "$DEST.tmp" && mv "$DEST.tmp" "$DEST"
echo "build.sh: cached $DEST"
