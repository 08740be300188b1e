#!/usr/bin/env bash
# Multi-GPU scaling in one device call (docs/benchmarks.md): generation images/s and UNet training
# samples/s on 1, 2, ... N GPUs. Generation: SD1.5-shaped random fp16 weights at 512x512 through
# scripts/scaling_bench.py (the CLI's prompt split, timed without model loading). Training: `ldm train unet`
# under `accelerate launch` on a synthetic 128x128 set, with the shipped model's text encoder and VAE.
# Env: GPUS ("1 2 4"), PROMPTS (48), STEPS (25), SIZE (512), TRAIN_STEPS (150), DEVICE (auto);
# CPU_DRY_RUN=1 SMALL_MODEL=DIR DEVICE=cpu TRAIN_SETS='--set ...' check the script here before a device call.
set -uo pipefail
OUT=${OUT:-scaling-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-src} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
GPUS=${GPUS:-"1 2 4"}
WORK=${WORK:-/tmp/scaling}
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT/env.txt"

MODEL=${SMALL_MODEL:-$WORK/sd15}  # SMALL_MODEL: a CPU dry run of this script with a tiny model
[ -n "${SMALL_MODEL:-}" ] || python3 - "$MODEL" <<'PY'
import sys, torch
from ldmkit.bench import random_sd15
from ldmkit.loading import save_pretrained
components = random_sd15(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
for module in (components.unet, components.vae, components.text_encoder):
    module.half()
save_pretrained(components, sys.argv[1])
PY
python3 scripts/make_scaling_data.py "$WORK/data" "${TRAIN_IMAGES:-4096}" 128

for n in $GPUS; do
  python3 -m torch.distributed.run --nproc-per-node "$n" scripts/scaling_bench.py --model "$MODEL" --prompts "${PROMPTS:-48}" -n 4 \
    --steps "${STEPS:-25}" --size "${SIZE:-512}" --device "${DEVICE:-auto}" 2>>"$OUT/log.txt" | tee -a "$OUT/generation.jsonl"
done

DEFAULT=src/ldmkit/assets/default-model
for n in $GPUS; do
  if [ -n "${CPU_DRY_RUN:-}" ]; then  # accelerate launch --cpu starts one process; torchrun forms a gloo group
    LAUNCH=(python3 -m torch.distributed.run --nproc-per-node "$n")
  else
    LAUNCH=(python3 -m accelerate.commands.launch --num_processes "$n" --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
    [ "$n" -gt 1 ] && LAUNCH+=(--multi_gpu)
  fi
  "${LAUNCH[@]}" -m ldmkit.cli train unet --data "$WORK/data" --runs "$WORK/runs$n" --steps "${TRAIN_STEPS:-150}" \
    --set text_encoder_dir="\"$DEFAULT/text_encoder\"" --set vae_dir="\"$DEFAULT/vae\"" --set log_every=50 ${TRAIN_SETS:-} \
    2>>"$OUT/log.txt" | grep "unet step" | tail -1 | sed "s/^/processes $n: /" | tee -a "$OUT/training.txt"
done
echo "== generation"; cat "$OUT/generation.jsonl"; echo "== training (last log line: global samples/s)"; cat "$OUT/training.txt"
