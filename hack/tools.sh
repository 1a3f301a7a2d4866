#!/usr/bin/env bash
# Prints the path of a pinned tool, installing it into ~/.cache/portcullis/tools on first use.
#   hack/tools.sh oha
set -euo pipefail
CACHE=${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}/tools
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
  *) echo "usage: hack/tools.sh oha" >&2; exit 2 ;;
esac
