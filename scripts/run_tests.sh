#!/usr/bin/env bash
# The test command: sets up the environment if needed, then runs the default (non-slow) suite.
# Extra arguments go to pytest, e.g. `bash scripts/run_tests.sh -m slow` for the slow tests.
set -euo pipefail
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
if [ "$#" -eq 0 ]; then set -- -m "not slow"; fi
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests were collected"; fi
exit "$rc"
