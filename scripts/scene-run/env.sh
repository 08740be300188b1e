# Sourced by every call: the carried wheels, `ldm` from this tree, the scene stage's settings, and `ret`.
export PYTHONUNBUFFERED=1
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev/a/whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src:/tmp/site
ldm() { python3 -m ldmkit.cli "$@"; }
# GPUS=2 (on nvidia-h200-x2): the scene stage runs under torchrun, one process a GPU (DDP; batch_size and workers
# are per process, so a step trains twice the scenes). Checked on this repo's CPU with two gloo processes.
ldm_train() {
  if [ "${GPUS:-1}" -gt 1 ]; then python3 -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m ldmkit.cli "$@"; else ldm "$@"; fi
}
# The shipped model's VAE latents and (frozen) text encoder, and its UNet to start from (UNET_FROM=unet_dir instead:
# a scene UNet to go on training); multi-resolution noise; 40% single emoji on white (SHARES, LR, CLASSIC_STYLE,
# CLOSE_UP and TEXT_LR override the share list, the peak learning rate, the share of single-emoji captions with a
# style phrase, the share of steps of single emoji filling a 128 px canvas, and the text encoder's LR scale (0:
# frozen)); TEACHER (a UNet folder) and DISTILL set close_up_teacher and close_up_distill; PROFILE=N prints where
# N steps' time went, after 60 (train.profiling); LAYOUT (contiguous) and FUSED set unet_layout and fused_adamw
# (FUSED defaults to true: the step alone took 139 ms a step fused against 190 ms, thirteenth run); OBJECT_WEIGHT
# sets object_weight (the objects' pixels' extra loss weight; object_error.py) and CLASSIC_SIZE classic_size; BATCH
# sets batch_size (256: the scenes a step at 256x256, fewer at the larger canvases).
SCENE_ARGS=(--vae .runs/base/vae --set max_steps=10000000 --set text_encoder_dir=.runs/base/text_encoder
  --set text_lr_scale=${TEXT_LR:-0} --set ${UNET_FROM:-init_unet_dir}=.runs/base/unet
  --set 'block_out_channels=[64,128,192]' --set layers_per_block=2 --set 'attention_heads=[2,4,6]'
  --set top_attention=true --set lr=${LR:-2e-4}
  --set warmup_steps=200 --set noise_discount=0.6 --set compile_vae=true
  --set "scene_shares=${SHARES:-[0.4,0.22,0.13,0.07,0.13,0.05]}" --set "classic_size=${CLASSIC_SIZE:-[0.45,0.6]}"
  --set workers=14 --set "batch_size=${BATCH:-256}"
  --set "classic_style=${CLASSIC_STYLE:-null}" --set "close_up=${CLOSE_UP:-0}" --set "profile_steps=${PROFILE:-0}"
  --set "close_up_teacher=${TEACHER:-null}" --set "close_up_distill=${DISTILL:-0.5}"
  --set "unet_layout=${LAYOUT:-channels_last}" --set "fused_adamw=${FUSED:-true}"
  --set "object_weight=${OBJECT_WEIGHT:-0}")
# ret FILE NAME: FILE into 15 MB parts $OUT/NAME.part-NN (a call returns files of at most 16 MB)
ret() { split -b 15000000 -d "$1" "$OUT/$2.part-"; }
