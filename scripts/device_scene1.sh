#!/usr/bin/env bash
# GPU call 1 of 2 for the scene model (nvidia-h200-x2 or one GPU, < 10 min). Run from the repo root with the
# sources in .dev/src and, in .dev: diffusers-slim.zip, the resvg-py wheel, npm/ (the four emoji sets + emojilib).
# Renders the sprites, fine-tunes the shipped VAE on scenes, trains the scene stage for SCENE_SESSION minutes of a
# SCENE_TOTAL-minute schedule (scripts/device_scene2.sh resumes it), exports a model and a first grid to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log1.txt") 2>&1
t0=$(date +%s); say() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
mkdir -p /tmp/site && python3 -m zipfile -e .dev/diffusers-slim.zip /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .dev/*.whl
export PYTHONPATH=$PWD/.dev/src:/tmp/site
OLD=src/ldmkit/assets/default-model
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
LDM=(python3 -W ignore -m ldmkit.train.cli)
if [ "$NGPU" -gt 1 ]; then
  LAUNCH=(python3 -W ignore -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m ldmkit.train.cli)
else
  LAUNCH=("${LDM[@]}")
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; say "gpus $NGPU"
"${LDM[@]}" data emoji --out .data/emoji --cache .dev/npm || exit 2
say data
"${LAUNCH[@]}" train vae --minutes "${VAE_MIN:-1.4}" --set max_steps=1000000 --set init_dir=$OLD/vae --set scenes=true \
  --set scene_size=256 --set batch_size=128 --set lr=2e-4 --set warmup_steps=50 --set log_every=50 --set workers=6 \
  || "${LDM[@]}" train vae --minutes "${VAE_MIN:-1.4}" --set max_steps=1000000 --set init_dir=$OLD/vae --set scenes=true \
  --set scene_size=256 --set batch_size=128 --set lr=2e-4 --set warmup_steps=50 --set log_every=50 --set workers=6 || exit 3
say vae
"${LAUNCH[@]}" train scene --vae .runs/vae/vae --minutes "${SCENE_TOTAL:-9.2}" --set session_minutes="${SCENE_SESSION:-4.8}" \
  --set max_steps=10000000 --set text_encoder_dir=$OLD/text_encoder --set workers=10 \
  || "${LDM[@]}" train scene --vae .runs/vae/vae --minutes "${SCENE_TOTAL:-9.2}" --set session_minutes="${SCENE_SESSION:-4}" \
  --set max_steps=10000000 --set text_encoder_dir=$OLD/text_encoder --set workers=10 || exit 4
say scene
"${LDM[@]}" train export --vae .runs/vae/vae --out .runs/default-model
python3 -W ignore - <<'PY'
import os, torch
from ldmkit.eval.generate import SCENE_GRID_PROMPTS, load_model, sample_grid
model = load_model(".runs/default-model", "cuda")
sample_grid(model, SCENE_GRID_PROMPTS, seeds=(0, 1, 2, 3)).save(os.environ["OUT"] + "/grid1.png")
PY
say grid
(tar cf - .runs/default-model .runs/vae/train.json .runs/scene/train.json | split -b 15m - "$OUT/model1.tar.part-")
ls -la "$OUT"; say done
