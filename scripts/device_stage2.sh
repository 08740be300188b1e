#!/usr/bin/env bash
# GPU call 2 of 2 (one H100, < 10 min), on the machine stage 1 left warm (it keeps .data/ and .runs/):
# train the UNet on the stage-1 CLIP text encoder and VAE, assemble the model folder, return it as a tar split
# into 15 MB parts under $OUT (unpack: cat model.tar.part-* | tar xf - -C .runs).
# On a fresh machine, carry .npm (re-render, 4 s) and the stage-1 .runs/clip/text_encoder and .runs/vae/vae.
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LDM="python3 -W ignore -m ldmkit.train.cli"
UNET_MIN=${UNET_MIN:-7.2}
test -f .runs/clip/text_encoder/config.json && test -f .runs/vae/vae/config.json || { echo "no stage-1 outputs in .runs"; exit 3; }
test -f .data/emoji/images.npy || $LDM data emoji --out .data/emoji --cache .npm
$LDM train unet --minutes "$UNET_MIN" --set max_steps=1000000
$LDM train export --out .runs/default-model
(cd .runs && tar cf - default-model unet/train.json | split -b 15m - "$OUT/model.tar.part-")
ls -la "$OUT"
