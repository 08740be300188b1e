#!/usr/bin/env bash
# GPU call 1 of 2 (one H100, < 10 min): render the emoji set, train CLIP and the VAE, smoke-test the UNet stage.
# Carried: .npm (the four npm .tgz), .whl (diffusers + resvg-py wheels). Returns the CLIP, text encoder and VAE
# as a tar split into 15 MB parts under $OUT, and the log.
# Env for CPU dry runs: CLIP_MIN, VAE_MIN, LIMIT, TINY=1 (tiny models).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LDM="python3 -W ignore -m ldmkit.train.cli"
CLIP_MIN=${CLIP_MIN:-2.0}; VAE_MIN=${VAE_MIN:-4.5}; LIMIT=${LIMIT:-}
clip_set=(); vae_set=(); unet_set=()
if [ -n "${TINY:-}" ]; then
  clip_set=(--set text_hidden=32 --set text_layers=1 --set text_heads=2 --set vision_hidden=32 --set vision_layers=1 --set vision_heads=2 --set batch_size=16 --set log_every=5 --set warmup_steps=2)
  vae_set=(--set 'block_out_channels=[8,8,16,16]' --set norm_num_groups=4 --set batch_size=8 --set log_every=5 --set warmup_steps=2)
  unet_set=(--set 'block_out_channels=[16,32]' --set 'attention_heads=[2,2]' --set norm_num_groups=8 --set layers_per_block=1 --set batch_size=8 --set log_every=5)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
rm -rf .runs  # a fresh run: stages resume from .runs/<stage>/ckpt.pt if present
t0=$(date +%s)
$LDM data emoji --out .data/emoji --cache .npm ${LIMIT:+--limit $LIMIT}
echo "data: $(( $(date +%s) - t0 ))s"
$LDM train clip --minutes "$CLIP_MIN" --set max_steps=100000 "${clip_set[@]}"
echo "clip done: $(( $(date +%s) - t0 ))s"
$LDM train vae --minutes "$VAE_MIN" --set max_steps=100000 "${vae_set[@]}"
echo "vae done: $(( $(date +%s) - t0 ))s"
# UNet smoke test on this device: catches GPU-only bugs and measures throughput before the real run
$LDM train unet --steps 40 --set log_every=20 --set out_dir=.runs/smoke-unet "${unet_set[@]}"
echo "unet smoke done: $(( $(date +%s) - t0 ))s"
tar cf - .runs/clip/clip .runs/clip/text_encoder .runs/vae/vae .runs/vae/train.json | split -b 15m - "$OUT/stage1.tar.part-"
ls -la "$OUT"
