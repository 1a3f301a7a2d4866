#!/usr/bin/env bash
# Node packages for the client tests (tests/node/), kept outside the checkout.
#
#   hack/node-env.sh ensure   install tests/node/package-lock.json into
#                             ~/.cache/portcullis/node-<hash>/node_modules unless it exists; prints it
#
# As hack/python-env.sh: the folder name carries a hash of the lock file (and node's version), built
# under a temporary name and renamed at the end.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}
SRC="$HERE/../tests/node"

say() { printf '[node-env] %s\n' "$*" >&2; }

ensure() {
  local hash dir tmp start
  hash=$( { cat "$SRC/package.json" "$SRC/package-lock.json"; node --version; } | sha256sum | cut -c1-12)
  dir="$CACHE_ROOT/node-$hash"
  if [ -d "$dir/node_modules" ]; then
    say "reusing $dir"
  else
    start=$(date +%s)
    say "installing into $dir"
    mkdir -p "$CACHE_ROOT"
    tmp="$dir.partial.$$"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    cp "$SRC/package.json" "$SRC/package-lock.json" "$tmp/"
    (cd "$tmp" && npm ci --no-audit --no-fund --loglevel=error >&2)
    if mv -T "$tmp" "$dir" 2>/dev/null; then
      say "installed in $(( $(date +%s) - start ))s"
    else
      rm -rf "$tmp"
    fi
  fi
  echo "$dir/node_modules"
}

case "${1:-}" in
  ensure) ensure ;;
  *) echo "usage: $0 ensure" >&2; exit 2 ;;
esac
