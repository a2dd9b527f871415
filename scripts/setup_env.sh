#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and installs the project into it.
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. scripts/setup_env.sh test
# The venv lives in $VENV (default: .venv at the repository root). A stamp file records what was
# installed, so a second call with unchanged pyproject.toml and constraints.txt returns at once.
# pyproject.toml declares version ranges; constraints.txt pins the known-good versions CI runs.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${1:-}
venv=${VENV:-$root/.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    echo "creating virtual environment in $venv" >&2
    "$python" -m venv "$venv"
fi
hash=$(cat "$root/pyproject.toml" "$root/constraints.txt" | sha256sum | cut -c1-16)
stamp="$venv/.installed-$hash-${extras:-base}"
if [ ! -f "$stamp" ]; then
    spec="$root"
    [ -n "$extras" ] && spec="${root}[$extras]"
    echo "installing $spec into $venv (first run: about 2 minutes)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -c "$root/constraints.txt" -e "$spec" \
        2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$venv/bin/python" -c "import model, torch" # fail loudly if the install did not work
    touch "$stamp"
fi
echo "$venv"
