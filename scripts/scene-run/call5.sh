# Call 5: the ControlNet for the new model (.runs/new), on pairs drawn at its 256 px size, and its edge F1.
source scripts/scene-run/env.sh
set -x
ldm train controlnet --model .runs/new --minutes "${CN_MIN:-6.3}" --set max_steps=1000000 --set canvas=256 \
  --set noise_discount=0.6 2>&1 | tee $OUT/controlnet.txt
ldm eval --model .runs/new --controlnet .runs/controlnet/controlnets/emoji-lines --count 32 \
  --out $OUT/controlnet-eval.json
cp .runs/controlnet/controlnets/emoji-lines/* $OUT/
