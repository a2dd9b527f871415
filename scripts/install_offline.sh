#!/usr/bin/env bash
# Installs this project from a wheelhouse made by scripts/wheelhouse.sh, without network and
# without touching the torch (and torchvision) already installed: every wheel goes in with
# --no-index --no-deps, so pip never resolves anything against torch.
#
#   scripts/install_offline.sh DIR                  # into $PYTHON's environment (default: python3)
#   scripts/install_offline.sh DIR --target PATH    # into PATH (read-only site-packages); prints
#                                                   # the PYTHONPATH and PATH to export
#
# Packages in DIR/if-missing.txt (einops, safetensors, ... which a node's image has) are installed
# only where the environment lacks them or has a version below the floor there. The project itself
# is installed editable with --no-build-isolation (needs setuptools and wheel, which a node has);
# with --target it is not installed: the repository root goes on PYTHONPATH instead, and the
# commands run as `python -m pipeline.train`, `python -m data_prep ...`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2; exit 2; }

dir=""
target=""
while [ $# -gt 0 ]; do
    case "$1" in
        --target) target=${2:?--target needs a path}; shift 2 ;;
        -h|--help) usage ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) [ -z "$dir" ] || usage; dir=$1; shift ;;
    esac
done
[ -n "$dir" ] || usage
if [ ! -f "$dir/requirements.txt" ] || [ ! -f "$dir/if-missing.txt" ]; then
    echo "error: $dir is not a wheelhouse from scripts/wheelhouse.sh (no requirements.txt)" >&2
    exit 2
fi
dir=$(cd "$dir" && pwd)
if ! "$python" -c "import torch" 2>/dev/null; then
    echo "error: $python cannot import torch; install torch first (the wheelhouse has none)" >&2
    exit 2
fi

pip=("$python" -m pip --disable-pip-version-check install --no-index --find-links "$dir" --no-deps)
if [ -n "$target" ]; then
    mkdir -p "$target"
    target=$(cd "$target" && pwd)
    pip+=(--target "$target" --upgrade)
    export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
fi

# The if-missing lines the environment (with the target first on the path) does not satisfy.
# With --target the project is not built, so setuptools and wheel are not needed there.
missing=$("$python" - "$dir/if-missing.txt" "${target:+target}" <<'PY'
import re
import sys
from importlib import metadata

for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, floor = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", line).groups()
    if sys.argv[2] == "target" and name in ("setuptools", "wheel"):
        continue
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(line)
        continue
    try:
        from packaging.version import Version

        older = Version(have) < Version(floor)
    except Exception:  # no packaging, or a version it cannot parse: compare the numbers
        numbers = lambda v: [int(x) for x in re.findall(r"\d+", v)[:3]]
        older = numbers(have) < numbers(floor)
    if older:
        print(line)
PY
)
mapfile -t missing_lines <<<"$missing"
[ -n "$missing" ] || missing_lines=()

torch_before=$("$python" -c "import torch; print(torch.__version__)" 2>/dev/null)
echo "== installing from $dir into ${target:-$("$python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}" >&2
[ ${#missing_lines[@]} -eq 0 ] || echo "   also (missing or older here): ${missing_lines[*]}" >&2
"${pip[@]}" -r "$dir/requirements.txt" "${missing_lines[@]}"

if [ -z "$target" ]; then
    echo "== installing the project (editable, no dependencies) from $root" >&2
    "$python" -m pip --disable-pip-version-check install --no-index --no-deps \
        --no-build-isolation -e "$root"
else
    export PYTHONPATH="$root:$PYTHONPATH"
fi

torch_after=$(cd / && "$python" -c "import torch; print(torch.__version__)" 2>/dev/null)
if [ "$torch_before" != "$torch_after" ]; then
    echo "error: torch changed from $torch_before to $torch_after" >&2
    exit 1
fi
# What the node's image is expected to provide is not in a default wheelhouse: name what is absent.
(cd / && "$python" - <<'PY'
import importlib
import sys

needed = ("numpy PIL yaml tqdm packaging psutil cpuinfo msgpack ninja einops safetensors "
          "tensorboard deepspeed av webdataset braceexpand kornia pydantic hjson").split()
absent = []
for name in needed:
    try:
        importlib.import_module(name)
    except ImportError:
        absent.append(name)
if absent:
    sys.exit(f"error: cannot import {', '.join(absent)}: this environment lacks packages a GPU "
             "node's image has; make the wheelhouse with --with-node-packages, or install them")
import av, deepspeed, kornia, pydantic, torch
import data_prep, model, pipeline.train

print(f"ok: torch {torch.__version__}, deepspeed {deepspeed.__version__}, av {av.__version__}, "
      f"kornia {kornia.__version__}, pydantic {pydantic.__version__}")
PY
)
if [ -n "$target" ]; then
    echo "before running the project, export:"
    echo "export PYTHONPATH=\"$PYTHONPATH\""
    echo "export PATH=\"$target/bin:\$PATH\""
fi
