# Call 3: the scene stage resumed from .runs/scene/ckpt.pt until MIN minutes; exported with the decoder-tuned VAE.
source scripts/scene-run/env.sh
set -x
ldm train scene --minutes "$MIN" --set session_minutes="$SESS" "${SCENE_ARGS[@]}" 2>&1 | tee $OUT/train3.txt
ldm train export --vae .runs/vae/vae --out .runs/new
tar cf /tmp/unet.tar -C .runs/scene unet && ret /tmp/unet.tar unet
