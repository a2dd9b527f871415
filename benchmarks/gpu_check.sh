#!/usr/bin/env bash
# The GPU check: one prepared command for a one-GPU machine (an H200 without network) that fits
# in 9 minutes, and leaves every figure as JSON in OUT:
#
#   bash benchmarks/gpu_check.sh OUT
#
# Parts, in this order, each under `timeout` with its own budget and never past the total; each
# one's exit code and seconds go to OUT/summary.json, and a failing part does not stop the next:
#   install    the wheelhouse: scripts/install_offline.sh "$WHEELHOUSE" --target /tmp/site
#   env        nvidia-smi (into the log), torch / CUDA / cuDNN / NCCL versions (summary.json)
#   tests      python3 -m pytest -m gpu tests/gpu (training tests first), junit XML: pytest.xml
#   gpu_train  benchmarks/bench_gpu_train.py, base_128.yaml for 20 steps: gpu_train.json
#   model, encode, train   the side-by-side benchmarks on CUDA in bf16: model/encode/train.json
#   switches   benchmarks/bench_switches.py, channels-last and compiled blocks on and off: its JSON
#              goes into summary.json ("switches"), not a file of its own
#   lfq_entropy  benchmarks/bench_lfq_entropy.py, the batch entropy at 2**18 codes: lfq_entropy.json
# The throughput figure (gpu_train) runs before the side-by-side benchmarks: if time runs out,
# the side-by-side ones are what is lost. OUT gets 8 files (the device tool returns at most 8):
# gpu_check.log, summary.json, pytest.xml and the five benchmark JSONs. A part stopped by its
# timeout gets SIGINT first (pytest then still writes its XML), SIGKILL 10 s later.
#
# Environment:
#   WHEELHOUSE          wheel folder made by scripts/wheelhouse.sh [.whl]
#   PYTHON              interpreter [python3, the one with torch on the GPU machine]
#   GPU_CHECK_BUDGET_S  total seconds for all parts [540; run it with the device tool's
#                       timeout_s=590]
#   GPU_CHECK_DEVICE    cuda [cuda]; cpu = a dry run of the plumbing with tiny settings on a
#                       machine without a GPU (no install; the GPU tests skip)
set -uo pipefail  # no -e: a failing part is recorded and the next one runs
out=${1:?usage: bash benchmarks/gpu_check.sh OUT}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
device=${GPU_CHECK_DEVICE:-cuda}
budget=${GPU_CHECK_BUDGET_S:-540}
log="$out/gpu_check.log"
scratch=$(mktemp -d /tmp/gpu_check.XXXXXX)  # records, versions, work folders: not in OUT
records="$scratch/parts.tsv"
: >"$log"
: >"$records"
start=$(date +%s)
deadline=$((start + budget))

# part NAME BUDGET_S COMMAND...: runs COMMAND with at most BUDGET_S seconds (fewer if the total
# would run out), output to the log; records "name, exit code, seconds, note".
part() {
    local name=$1 want=$2
    shift 2
    local left=$((deadline - $(date +%s) - 10))  # 10 s: the kill-after grace
    local limit=$((want < left ? want : left))
    if [ "$limit" -lt 15 ]; then
        printf '%s\tskipped\t0\tno time left in the %ss budget\n' "$name" "$budget" >>"$records"
        echo "== $name: skipped, no time left" | tee -a "$log"
        return
    fi
    echo "== $name (timeout ${limit}s): $*" | tee -a "$log"
    local began
    began=$(date +%s)
    timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local code=$?
    local took=$(($(date +%s) - began))
    local note=""
    [ "$code" -eq 124 ] && note="timed out after ${limit}s"
    [ "$code" -eq 137 ] && note="killed ${limit}s + 10s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$code" "$took" "$note" >>"$records"
    echo "== $name: exit $code in ${took}s $note" | tee -a "$log"
}

skip() {  # skip NAME REASON
    printf '%s\tskipped\t0\t%s\n' "$1" "$2" >>"$records"
    echo "== $1: skipped ($2)" | tee -a "$log"
}

# (i) Dependencies: into /tmp/site, torch untouched (the machine's own).
wheels=${WHEELHOUSE:-.whl}
if [ "$device" != "cuda" ]; then
    skip install "dry run on $device"
elif [ ! -d "$wheels" ]; then
    skip install "no wheelhouse at $wheels (set WHEELHOUSE)"
elif [ -f scripts/install_offline.sh ]; then
    part install 60 env PYTHON="$PYTHON" bash scripts/install_offline.sh "$wheels" --target /tmp/site
else  # the wheelhouse alone, as the device notes install one
    part install 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl
fi
if [ -d /tmp/site ]; then  # what install_offline.sh says to export with --target
    export PYTHONPATH="/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="/tmp/site/bin:$PATH"
else
    export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
fi

# (ii) The machine.
versions="$scratch/versions.json"
# shellcheck disable=SC2016  # expanded by the inner bash, from its arguments
part env 30 bash -c '
    nvidia-smi || echo "nvidia-smi: not available"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    df -h /dev/shm /tmp || true  # loader workers hand batches over in /dev/shm
    "$0" - "$1" <<"PY"
import importlib.metadata as metadata, json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
                cudnn=torch.backends.cudnn.version(), bf16=torch.cuda.is_bf16_supported(),
                nccl=".".join(map(str, torch.cuda.nccl.version())),
                memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
for name in ("deepspeed", "torchvision", "av", "webdataset", "kornia", "magvit2-pytorch",
             "scikit-video", "decord", "pytest"):
    try:
        info[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        info[name] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
PY
' "$PYTHON" "$versions"

# (iii) The GPU tests (they skip, with the reason, without CUDA): the training ones first, so
# that a short budget cuts the cheap ones.
test_files=(tests/gpu/test_gpu_training.py)
for file in tests/gpu/test_*.py; do
    [ "$file" = "${test_files[0]}" ] || test_files+=("$file")
done
part tests 160 "$PYTHON" -m pytest -m gpu "${test_files[@]}" -q -rs -p no:cacheprovider \
    --junitxml="$out/pytest.xml" -o junit_family=xunit1 -o junit_logging=all

# (v) then (iv): throughput of base_128.yaml, then the side-by-side benchmarks.
if [ "$device" = cuda ]; then
    part gpu_train 100 "$PYTHON" benchmarks/bench_gpu_train.py --work "$scratch/gpu_train" \
        --out "$out/gpu_train.json"
    # base_128 without activation checkpointing is estimated at 50-100 GB: if it did not fit,
    # the figure with checkpointing is the one to have (same file, so still 8 in OUT).
    if [ "$(tail -n 1 "$records" | cut -f2)" != 0 ] &&
        grep -q "OutOfMemoryError\|CUDA out of memory" "$log"; then
        part gpu_train_checkpointed 100 "$PYTHON" benchmarks/bench_gpu_train.py \
            --work "$scratch/gpu_train" --out "$out/gpu_train.json" activation_checkpointing=true
    fi
    part model 45 "$PYTHON" benchmarks/bench_model.py --device cuda --precision bf16 \
        --size 128 --frames 17 --batch 1 --init-dim 64 --repeats 5 --out "$out/model.json"
    part encode 35 "$PYTHON" benchmarks/bench_encode.py --device cuda --precision bf16 \
        --presets card convs --repeats 5 --memory-frames 33 65 129 --out "$out/encode.json"
    # No ZeRO table (2 CPU ranks) and no memory subprocesses here: they do not fit the budget;
    # tests/gpu measures activation checkpointing's memory on CUDA instead.
    part train 55 "$PYTHON" benchmarks/bench_train.py --device cuda --precision bf16 \
        --skip-zero --skip-memory --repeats 4 --warmup 2 --out "$out/train.json"
    # The speed switches, each against off (compiling takes most of this part's time).
    # No "all" variant: its compilation would not fit; the penalty step runs compiled blocks
    # eagerly, so it is left out too.
    part switches 120 "$PYTHON" benchmarks/bench_switches.py --device cuda --precision bf16 \
        --size 128 --frames 17 --init-dim 64 --repeats 3 \
        --variants off channels_last_3d channels_last compile \
        --parts generator discriminator encode --out "$scratch/switches.json"
    # LFQ's batch entropy at 2**18 codes: the old fixed block against the one chosen from the
    # free GPU memory (time, peak memory, operator launches).
    part lfq_entropy 25 "$PYTHON" benchmarks/bench_lfq_entropy.py --device cuda \
        --blocks 4194304 --out "$out/lfq_entropy.json"
else  # the same commands with settings a CPU runs in minutes
    part gpu_train 300 "$PYTHON" benchmarks/bench_gpu_train.py --device cpu \
        --config launch/configs/tiny_cpu.yaml --steps 3 --warmup 1 --shard-workers 1 \
        --work "$scratch/gpu_train" --out "$out/gpu_train.json"
    part model 300 "$PYTHON" benchmarks/bench_model.py --device cpu --precision bf16 \
        --size 32 --frames 5 --batch 1 --init-dim 8 --codebook-size 64 --repeats 1 \
        --skip-memory --out "$out/model.json"
    part encode 300 "$PYTHON" benchmarks/bench_encode.py --device cpu --precision bf16 \
        --presets convs --size 32 --init-dim 8 --batch 1 --frames 9 --repeats 1 \
        --memory-frames 17 --chunk-frames 8 --out "$out/encode.json"
    part train 300 "$PYTHON" benchmarks/bench_train.py --device cpu --precision bf16 \
        --skip-zero --skip-memory --repeats 1 --warmup 1 --out "$out/train.json"
    part switches 300 "$PYTHON" benchmarks/bench_switches.py --device cpu --precision bf16 \
        --size 32 --frames 5 --init-dim 8 --codebook-size 64 --repeats 1 \
        --variants off channels_last_3d compile --parts generator encode \
        --out "$scratch/switches.json"
    part lfq_entropy 300 "$PYTHON" benchmarks/bench_lfq_entropy.py --device cpu \
        --rows 256 --blocks 1048576 --out "$out/lfq_entropy.json"
fi

# summary.json: every part's exit code, the machine, each test's outcome and figures, and the
# headline figures of each benchmark.
summary_failed='{"error": "the summary could not be written; see gpu_check.log"}'
"$PYTHON" - "$out" "$records" "$versions" "$device" "$budget" "$(($(date +%s) - start))" \
    "$scratch/switches.json" >>"$log" 2>&1 <<'PY' || echo "$summary_failed" >"$out/summary.json"
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

out, records, versions, device, budget, seconds, switches = sys.argv[1:]
out = Path(out)


def load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


parts = {}
for line in Path(records).read_text().splitlines():
    name, code, took, note = (line.split("\t") + [""] * 4)[:4]
    parts[name] = {"exit_code": None if code == "skipped" else int(code), "seconds": int(took),
                   "note": note or ("skipped" if code == "skipped" else "")}

tests = {"outcomes": {}}
try:
    suite = ElementTree.parse(out / "pytest.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    for case in suite.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome, message = tag, (found.get("message") or found.text or "")[:600]
        figures = {p.get("name"): p.get("value") for p in case.iter("property")}
        tests["outcomes"][case.get("name")] = {
            "outcome": outcome, "seconds": float(case.get("time", 0)), "message": message,
            "figures": figures,
        }
except (OSError, ElementTree.ParseError, AttributeError) as exc:
    tests["error"] = f"no readable pytest.xml: {exc}"

figures = {}
gpu_train = load(out / "gpu_train.json")
if gpu_train:
    figures["gpu_train"] = {k: gpu_train.get(k) for k in (
        "clips_per_s", "clips_per_s_compute_only", "step_seconds_median", "mfu",
        "mfu_mean_step", "achieved_tflop_per_s", "peak_memory_bytes", "all_losses_finite")}
    figures["gpu_train"]["tflop_per_iteration"] = gpu_train["flops"]["per_iteration"] / 1e12
model = load(out / "model.json")
if model:
    figures["model"] = {f"{step}/{impl}": {k: row.get(k) for k in (
        "seconds_median", "speedup_vs_reference", "peak_step_bytes")}
        for step, rows in model["steps"].items() for impl, row in rows.items()}
encode = load(out / "encode.json")
if encode:
    figures["encode"] = {f"{preset}/{impl}": {k: row.get(k) for k in (
        "clips_per_s", "speedup_vs_reference", "peak_step_bytes")}
        for preset, result in encode.get("speed", {}).items()
        for impl, row in result["rows"].items()}
train = load(out / "train.json")
if train and "speed" in train:
    figures["train"] = {name: {k: row.get(k) for k in ("seconds_median", "speedup_vs_reference")}
                        for name, row in train["speed"]["rows"].items()}

switched = load(Path(switches))
if switched:
    figures["switches"] = {part: {variant: {k: row.get(k) for k in (
        "median_s", "speedup_vs_off", "first_call_s")} for variant, row in rows.items()}
        for part, rows in switched["parts"].items()}

summary = {
    "switches": switched,
    "device": device, "budget_s": int(budget), "seconds": int(seconds),
    "all_parts_ok": all(p["exit_code"] in (0, None) for p in parts.values()),
    "skipped_parts": [name for name, p in parts.items() if p["exit_code"] is None],
    "parts": parts, "machine": load(Path(versions)), "tests": tests, "figures": figures,
}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: summary[k] for k in ("all_parts_ok", "parts", "seconds")}, indent=1))
PY
rm -rf "$scratch"
head -c 4000 "$out/summary.json" 2>/dev/null
echo
echo "== done in $(($(date +%s) - start))s: $out"
