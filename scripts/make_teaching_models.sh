#!/bin/bash
# The shipped teaching models, solq/models/weights/smoke_uqr.pt and smoke_sqr.pt (names "smoke-uqr", "smoke-sqr"):
# the smoke preset trained for STEPS optimiser steps (batch 8, seed 42) on the smoke scenes (2,000 training scenes of
# seed 0; scored on the 100 val scenes of seed 1), the two modes side by side on one thread each, then slimmed to
# weights + config + measured metrics (loadable with torch.load(weights_only=True)).
#   scripts/make_teaching_models.sh                 # both (about 50-60 min on two idle cores)
#   MODES=uqr scripts/make_teaching_models.sh       # one of them
#   RECIPE= scripts/make_teaching_models.sh         # today's smoke preset instead of the shipped files' settings
# RECIPE pins the model settings stored in the shipped files (made at code version 0.1.0+gd08e388, when the smoke
# preset was smaller and predicted raw mask codes); SQR's mask head also read the encoder output then.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-8000}
MODES=${MODES:-"uqr sqr"}
OUT=${OUT:-runs/teaching}
SEED=${SEED:-42}
RECIPE=${RECIPE-"model.hidden_dim=64 model.dim_feedforward=128 model.dec_layers=2 model.vector_hidden_dim=128 model.vector_standardize=false"}
mkdir -p "$OUT"
$PY -m solq.cli synth --out "$OUT/data" --num-train 2000 --num-val 100 --image-size 256 --seed 0 --val-seed 1
pids=()
for mode in $MODES; do
  extra=""
  if [ -n "$RECIPE" ] && [ "$mode" = sqr ]; then extra="model.sqr_mask_features=encoder"; fi
  echo "training $mode: $STEPS steps, log $OUT/$mode.log"
  OMP_NUM_THREADS=1 $PY -m solq.cli train --config smoke --no-progress --output "$OUT/$mode" \
    --set model.mode=$mode train.seed=$SEED train.max_steps=$STEPS train.epochs=$(( (STEPS + 249) / 250 )) \
    train.eval_every=4 runtime.num_threads=1 data.root="$OUT/data" $RECIPE $extra > "$OUT/$mode.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for mode in $MODES; do
  $PY - "$OUT/$mode" "solq/models/weights/smoke_$mode.pt" "$STEPS" "$SEED" <<'PYEOF'
import json, sys
from pathlib import Path
from solq.engine.checkpoint import save_weights_only
run, dst, steps, seed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
metrics = json.loads((run / "metrics.json").read_text())
keep = {f"{t}/{k}": v for t in ("bbox", "segm") for k, v in (metrics.get(t) or {}).items()}
extra = {"metrics": keep, "scored_on": "100 synthetic val scenes of seed 1 at 256 px (solq synth defaults)",
         "steps": steps, "batch_size": 8, "seed": seed, "command": "scripts/make_teaching_models.sh"}
path = save_weights_only(run / "checkpoint.pth", dst, extra=extra)
path.chmod(0o644)  # a package file, readable by all
print(f"{dst}: {path.stat().st_size / 2**20:.1f} MB; box AP {100 * keep.get('bbox/AP', -1):.1f}, "
      f"mask AP {100 * keep.get('segm/AP', -1):.1f}")
PYEOF
done
