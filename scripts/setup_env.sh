#!/usr/bin/env bash
# Create .venv if missing and install the project (training + test requirements). Sourced by the other scripts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=.venv/.clip-kd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements-test.txt -nt "$stamp" ] \
   || [ requirements-training.txt -nt "$stamp" ]; then
  echo "[setup] installing requirements (first run downloads PyTorch; later runs skip this)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-test.txt
  python -m pip install -q --no-deps -e .
  touch "$stamp"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
