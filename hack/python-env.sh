#!/usr/bin/env bash
# Python virtualenvs for the client tests (tests/python/), kept outside the checkout.
#
#   hack/python-env.sh ensure NAME   build ~/.cache/portcullis/venv-NAME-<hash> from tests/python/requirements-NAME.txt
#                                    unless it exists already; prints the venv's python
#
# The folder name carries a hash of the requirements file (and the Python version), so CI's fresh
# clone on the same machine reuses a venv until the pins change. Built under a temporary name and
# renamed at the end: an interrupted build is never mistaken for a finished one.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${PORTCULLIS_CACHE:-$HOME/.cache/portcullis}
PYTHON=${PYTHON:-python3.11}

say() { printf '[python-env] %s\n' "$*" >&2; }

ensure() {
  local name=$1 req hash venv tmp start
  req="$HERE/../tests/python/requirements-$name.txt"
  [ -f "$req" ] || { say "no requirements file $req"; exit 1; }
  command -v "$PYTHON" >/dev/null || PYTHON=python3
  hash=$( { cat "$req"; "$PYTHON" --version; } | sha256sum | cut -c1-12)
  venv="$CACHE_ROOT/venv-$name-$hash"
  if [ -x "$venv/bin/python" ]; then
    say "$name: reusing $venv"
  else
    start=$(date +%s)
    say "$name: building $venv from $(basename "$req")"
    mkdir -p "$CACHE_ROOT"
    tmp="$venv.partial.$$"
    rm -rf "$tmp"
    "$PYTHON" -m venv "$tmp"
    "$tmp/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$req" >&2
    # Only bin/python is used (as `python -m ...`), which works after the rename; the pip and
    # pytest launcher scripts keep the temporary path in their shebangs.
    if mv -T "$tmp" "$venv" 2>/dev/null; then
      say "$name: built in $(( $(date +%s) - start ))s"
    else
      rm -rf "$tmp"  # another build finished first
    fi
  fi
  echo "$venv/bin/python"
}

case "${1:-}" in
  ensure) shift; for name in "$@"; do ensure "$name"; done ;;
  *) echo "usage: $0 ensure NAME..." >&2; exit 2 ;;
esac
