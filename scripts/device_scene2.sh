#!/usr/bin/env bash
# GPU call 2 of 2 for the scene model, on the machine call 1 left warm (it keeps .data/ and .runs/): resume the
# scene stage for SCENE_SESSION minutes, train the eval CLIP, export, run `ldm eval` on the new model and on the
# shipped (old) one, draw the sample grids of both, and return the model folder, the metrics and the grids.
# The tree must hold the old model at src/ldmkit/assets/default-model; .dev holds the sources and diffusers-slim.zip
# (the tree plus .dev must stay under 64 MiB: link .dev/src/ldmkit/configs to the tree's src/ldmkit/configs).
# What comes back must stay under 64 MiB too: the model parts (58 MB) and the grids quantized to 128 colours.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
exec > >(tee "$OUT/log2.txt") 2>&1
t0=$(date +%s); say() { echo "[$(( $(date +%s) - t0 ))s] $*"; }
test -f .runs/scene/ckpt.pt && test -f .data/emoji/sprites.npy || { echo "not the warm machine of call 1"; exit 3; }
export PYTHONPATH=$PWD/.dev/src:/tmp/site
OLD=src/ldmkit/assets/default-model
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
LDM=(python3 -W ignore -m ldmkit.train.cli)
if [ "$NGPU" -gt 1 ]; then
  LAUNCH=(python3 -W ignore -m torch.distributed.run --standalone --nproc_per_node "$NGPU" -m ldmkit.train.cli)
else
  LAUNCH=("${LDM[@]}")
fi
"${LAUNCH[@]}" train scene --vae .runs/vae/vae --minutes "${SCENE_TOTAL:-9.2}" --set session_minutes="${SCENE_SESSION:-4.4}" \
  --set max_steps=10000000 --set text_encoder_dir=$OLD/text_encoder --set workers=10 \
  || "${LDM[@]}" train scene --vae .runs/vae/vae --minutes "${SCENE_TOTAL:-9.2}" --set session_minutes="${SCENE_SESSION:-4}" \
  --set max_steps=10000000 --set text_encoder_dir=$OLD/text_encoder --set workers=10 || exit 4
say scene
"${LDM[@]}" train export --vae .runs/vae/vae --out .runs/default-model
(tar cf - .runs/default-model .runs/vae/train.json .runs/scene/train.json | split -b 15m - "$OUT/model.tar.part-")
say export
"${LDM[@]}" train clip --minutes "${CLIP_MIN:-1.2}" --set max_steps=100000 || exit 5
say clip
"${LDM[@]}" eval --model .runs/default-model --clip .runs/clip/clip --out "$OUT/eval-new.json" > /dev/null
say eval-new
"${LDM[@]}" eval --model $OLD --clip .runs/clip/clip --out "$OUT/eval-old.json" > /dev/null
say eval-old
mkdir -p "$OUT/grids"
python3 -W ignore - <<'PY'
import os, torch
from ldmkit.eval.generate import GRID_PROMPTS, SCENE_GRID_PROMPTS, load_model, sample_grid
out = os.environ["OUT"] + "/grids/"
new = load_model(".runs/default-model", "cuda")
old = load_model("src/ldmkit/assets/default-model", "cuda")
sample_grid(new, SCENE_GRID_PROMPTS).save(out + "new-scenes.png")
sample_grid(old, SCENE_GRID_PROMPTS).save(out + "old-scenes.png")
sample_grid(new, GRID_PROMPTS).save(out + "new-names.png")
sample_grid(new, ("a cat wearing sunglasses", "sunglasses wearing a cat", "a rocket on the left and a cat on the right"),
            seeds=(0, 1, 2, 3, 4, 5)).save(out + "new-order.png")
sample_grid(new, ("an otter wearing sunglasses relaxing on a floating tube in a swimming pool, on a sunny day",),
            seeds=(0, 1, 2), height=512, width=512).save(out + "new-512.png")
sample_grid(new, ("a cat on the left and a rocket on the right", "a penguin in the snow"), seeds=(0, 1, 2),
            height=256, width=384).save(out + "new-wide.png")
from ldmkit.eval.generate import generate, grid
names = ("otter", "red apple", "cat face", "rocket", "pizza", "ghost")
styles = ("cartoon emoji", "flat icon", "flat illustration", "3d render")
prompts = [f"{n}, {s}" for n in names for s in styles]
grid(generate(new, prompts, [0] * len(prompts)), columns=4).save(out + "new-styles.png")
PY
python3 -c "
import glob
from PIL import Image
for path in glob.glob('$OUT/grids/*.png'):
    Image.open(path).convert('RGB').quantize(colors=128, dither=Image.Dither.NONE).save(path, optimize=True)
"
say grids
cp "$OUT"/eval-*.json "$OUT/grids/" && tar cf "$OUT/results.tar" -C "$OUT" grids && rm -rf "$OUT/grids" "$OUT"/eval-*.json
ls -la "$OUT"; say done
