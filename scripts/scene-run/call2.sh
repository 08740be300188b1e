# Call 2: the scene stage from the shipped UNet (or UNET_SRC, carried) for SESS of MIN minutes; the EMA UNet so far
# returned.
source scripts/scene-run/env.sh
set -x
mkdir -p .runs/base/unet && cp ${UNET_SRC:-src/ldmkit/assets/default-model/unet}/* .runs/base/unet/
ldm_train train scene --minutes "$MIN" --set session_minutes="$SESS" "${SCENE_ARGS[@]}" 2>&1 | tee $OUT/train2.txt
tar cf /tmp/unet.tar -C .runs/scene unet && ret /tmp/unet.tar unet2
