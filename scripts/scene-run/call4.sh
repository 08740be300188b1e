# Call 4: the sample grids of docs/training.md, and `ldm eval` of the new and the shipped model with the framed CLIP.
source scripts/scene-run/env.sh
set -x
python3 - <<'PY'
import os
from ldmkit.eval.generate import GRID_PROMPTS, SCENE_GRID_PROMPTS, sample_grid
from ldmkit.pipeline import Pipeline
out = os.environ["OUT"]
p = Pipeline.from_pretrained(".runs/new", device="cuda")
sample_grid(p, SCENE_GRID_PROMPTS).save(f"{out}/grid-scenes.png")
sample_grid(p, GRID_PROMPTS).resize((768, 1152)).save(f"{out}/grid-names.png")
sample_grid(p, SCENE_GRID_PROMPTS[:4], seeds=(0, 1, 2), height=512, width=512).resize((768, 1024)).save(f"{out}/grid-512.png")
PY
ldm eval --model .runs/new --name-seeds 4 --clip .runs/clip/clip --out $OUT/eval-new.json > $OUT/eval-new.txt 2>&1
ldm eval --model .runs/base --name-seeds 2 --clip .runs/clip/clip --out $OUT/eval-shipped.json > $OUT/eval-shipped.txt 2>&1
cp .runs/scene/train.json $OUT/
