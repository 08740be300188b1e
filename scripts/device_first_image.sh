#!/usr/bin/env bash
# First-image time of `ldm generate --fast` in a fresh process, cold and then on a warm compile cache, and
# batch-8 throughput next to diffusers (docs/benchmarks.md). SD1.5-shaped random fp16 weights, 512x512.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src}
MODEL=/tmp/sd15
python3 - "$MODEL" <<'PY'
import sys, torch
from ldmkit.bench import random_sd15
from ldmkit.loading import save_pretrained
components = random_sd15(torch.device("cuda"))
for module in (components.unet, components.vae, components.text_encoder):
    module.half()
save_pretrained(components, sys.argv[1])
PY
for run in cold warm; do
  start=$(date +%s.%N)
  python3 -m ldmkit.cli generate "a castle on a hill" --model "$MODEL" --fast --size 512x512 --steps 50 \
    --sampler DDIM --seed 1 -o /tmp/first-image -q > /dev/null 2>>/tmp/first-image.log || tail -5 /tmp/first-image.log
  end=$(date +%s.%N)
  echo "first image, $run compile cache, whole command: $(python3 -c "print(round($end - $start, 1))") s"
done
python3 -m ldmkit.bench --model "$MODEL" --rows diffusers,ours-fast --batch 8 --size 512 --steps 50 --sampler DDIM \
  --warmup 1 --repeats 3 2>&1 | grep -v "Loading\|Warn" | tail -8
