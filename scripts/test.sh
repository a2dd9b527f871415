#!/usr/bin/env bash
# The test command: sets up .venv with the test extra when needed, then runs pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" tests/test_quantizers.py
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$("$root/scripts/setup_env.sh" test)
cd "$root"
# Two cores: one thread per process keeps multi-process tests from oversubscribing.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$venv/bin/python" -m pytest "$@"
