#!/usr/bin/env bash
# GPU call: generate the eval images (256 name prompts + 256 "name, style" prompts) and the sample grid with the
# shipped model. Carried: .slim/diffusers-slim.zip only (diffusers without its other pipelines: the tree already
# holds the 58 MB model and the tree + carry limit is 64 MiB). Score the images on any
# machine with the data set and the CLIP: `ldm eval --images DIR --clip .runs/clip/clip`.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -W ignore -m ldmkit.train.cli eval --generate-only "$OUT/eval-images" ${PROMPTS:+--prompts $PROMPTS}
python3 -W ignore - <<'PY'
import os, time, torch
from pathlib import Path
from ldmkit.eval.generate import load_model, sample_grid
from ldmkit.loading import DEFAULT_MODEL_DIR
model = load_model(DEFAULT_MODEL_DIR, "cuda" if torch.cuda.is_available() else "cpu")
start = time.perf_counter()
sample_grid(model).save(Path(os.environ.get("OUT", "/tmp/out")) / "samples.png")
print(f"grid: {time.perf_counter() - start:.1f}s")
PY
ls -la "$OUT" "$OUT/eval-images"
