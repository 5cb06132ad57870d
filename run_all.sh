#!/usr/bin/env bash
# fimoda: set up the environment and regenerate every result, table and figure with papermill.
#
#   ./run_all.sh                         # cpu profile (default), its default datasets
#   ./run_all.sh --profile smoke         # seconds per notebook
#   ./run_all.sh --profile paper --datasets concrete,energy --device cuda
#   ./run_all.sh --jobs 1                # one notebook at a time (default on cpu: 2 datasets at once)
#   ./run_all.sh --profile paper --datasets concrete,energy --seeds 10   # fewer seeds (printed)
#   ./run_all.sh --reproduce             # reproduction/: paper settings, Concrete + Energy, 10 seeds
#   ./run_all.sh --test                  # set up, then the default test suite
#   ./run_all.sh --test-slow             # the slow tests (marked @pytest.mark.slow)
#   ./run_all.sh --test-peers            # cross-checks against pyDVL/dattri/kronfluence/traker
#
# Data are read from $FIMODA_DATA_DIR (default: data/raw); missing files are downloaded when online.
set -euo pipefail
cd "$(dirname "$0")"

PROFILE=cpu
DATASETS=""
DEVICE=cpu
JOBS=""
SEEDS=""
MODE=run
PYTHON=${PYTHON:-python3}

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE=$2; shift 2 ;;
    --profile=*) PROFILE=${1#*=}; shift ;;
    --datasets) DATASETS=$2; shift 2 ;;
    --datasets=*) DATASETS=${1#*=}; shift ;;
    --device) DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    --jobs) JOBS=$2; shift 2 ;;
    --jobs=*) JOBS=${1#*=}; shift ;;
    --seeds) SEEDS=$2; shift 2 ;;
    --seeds=*) SEEDS=${1#*=}; shift ;;
    --reproduce) MODE=reproduce; shift ;;
    --test) MODE=test; shift ;;
    --test-slow) MODE=test-slow; shift ;;
    --test-peers) MODE=test-peers; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run_all.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
case "$PROFILE" in smoke|cpu|paper) ;; *) echo "run_all.sh: --profile must be smoke, cpu or paper (got '$PROFILE')" >&2; exit 2 ;; esac

setup() {
  if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
  fi
  # Reinstall only when the dependency list changed.
  local stamp; stamp=$(cat pyproject.toml | sha256sum | cut -c1-16)
  if [ "$(cat .venv/.fimoda-stamp 2>/dev/null)" != "$stamp" ]; then
    echo "== installing fimoda and its dependencies into .venv (log: .venv/install.log)"
    local t0=$SECONDS
    # pip's own output goes to the log; on failure its end is shown. torch is pinned and
    # installed first: a bare 'torch' requirement pulls CUDA packages.
    if ! { .venv/bin/python -m pip install --upgrade pip &&
           .venv/bin/python -m pip install "torch==2.13.0" &&
           .venv/bin/python -m pip install -e ".[dev]"; } > .venv/install.log 2>&1; then
      echo "run_all.sh: installing into .venv failed; the end of .venv/install.log:" >&2
      grep -v "^WARNING: Location '.*' is ignored" .venv/install.log | tail -n 40 >&2
      exit 1
    fi
    echo "$stamp" > .venv/.fimoda-stamp
    echo "== installed in $((SECONDS - t0)) s"
  fi
}
setup
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}
export FIMODA_DATA_DIR=${FIMODA_DATA_DIR:-data/raw}
# absolute, since the notebooks run with notebooks/ as their working directory
case "$FIMODA_DATA_DIR" in /*) ;; *) FIMODA_DATA_DIR="$PWD/$FIMODA_DATA_DIR" ;; esac
PY=.venv/bin/python

case "$MODE" in
  test) exec $PY -m pytest -q -p no:cacheprovider ;;
  test-slow) exec $PY -m pytest -q -p no:cacheprovider -m slow ;;
  test-peers) exec bash tests/peers/run.sh ;;
  reproduce) exec $PY -m fimoda.paper.reproduction --device "$DEVICE" ${SEEDS:+--seeds "$SEEDS"} ${DATASETS:+--datasets "$DATASETS"} ;;
esac

if [ -z "$DATASETS" ]; then
  DATASETS=$($PY -c "from fimoda.paper.config import PROFILE_DATASETS as P; print(','.join(P['$PROFILE']))")
fi
exec $PY -m fimoda.paper.pipeline --profile "$PROFILE" --datasets "$DATASETS" --device "$DEVICE" ${JOBS:+--jobs "$JOBS"} ${SEEDS:+--seeds "$SEEDS"}
