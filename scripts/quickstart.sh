#!/usr/bin/env bash
# Quickstart: create the environment if missing, then run the embedded offline demo
# (procedural world -> teacher -> CLIP-KD student + no-KD baseline -> zero-shot and retrieval table).
# Extra arguments go to scripts/quickstart.py (e.g. --out DIR, --teacher-epochs N).
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python scripts/quickstart.py "$@"
