#!/usr/bin/env bash
# Cross-check fimoda's attribution methods against pyDVL, dattri, kronfluence and traker.
#
#   bash tests/peers/run.sh              # set up .venv-peers (first run), then the peer tests
#   bash tests/peers/run.sh -k dattri    # extra arguments go to pytest
#
# The peers live in their own virtual environment, .venv-peers at the repository root (pyDVL
# pins numpy<2). It is created when missing and (re)installed when tests/peers/requirements.txt
# changed. The main test suite ignores tests/peers (pyproject addopts --ignore=tests/peers);
# here addopts is cleared so that they run. The benchmark uses the same environment:
#   .venv-peers/bin/python benchmarks/methods_speed.py
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
VENV=${PEERS_VENV:-$ROOT/.venv-peers}
REQ=tests/peers/requirements.txt
PY="$VENV/bin/python"
STAMP="$VENV/.peers-requirements"

if [ ! -x "$PY" ]; then
  echo "run.sh: creating $VENV" >&2
  python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || ! cmp -s "$REQ" "$STAMP"; then
  echo "run.sh: installing the peers into $VENV" >&2
  "$PY" -m pip install -q --upgrade pip
  # torch first and pinned: an unpinned torch would pull the CUDA build (GBs)
  "$PY" -m pip install -q torch==2.13.0
  "$PY" -m pip install -q -r "$REQ"
  sed -n 's/^#no-deps[[:space:]]*//p' "$REQ" | xargs -r "$PY" -m pip install -q --no-deps
  "$PY" -m pip install -q --no-deps -e .
  "$PY" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  cp "$REQ" "$STAMP"
fi
exec "$PY" -m pytest tests/peers -q -p no:cacheprovider -o addopts="" "$@"
