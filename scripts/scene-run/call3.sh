# Call 3: the scene stage resumed from .runs/scene/ckpt.pt until MIN minutes; exported with the decoder-tuned VAE
# (and the eval CLIP for call 4): call 1's, or the committed ones (`prep.sh 3 scene-vae eval-clip`).
source scripts/scene-run/env.sh
set -x
[ -d .runs/vae/vae ] || { mkdir -p .runs/vae && cp -r checkpoints/scene-vae .runs/vae/vae; }
[ -d .runs/clip/clip ] || { mkdir -p .runs/clip && cp -r checkpoints/eval-clip .runs/clip/clip; }
ldm_train train scene --minutes "$MIN" --set session_minutes="$SESS" "${SCENE_ARGS[@]}" 2>&1 | tee $OUT/train3.txt
ldm train export --vae .runs/vae/vae --out .runs/new
tar cf /tmp/unet.tar -C .runs/scene unet && ret /tmp/unet.tar unet
