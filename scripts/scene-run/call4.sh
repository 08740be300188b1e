# Call 4: the sample grids of docs/training.md at guidance 3.5, and `ldm eval` of the new model with the framed CLIP
# at 3.5 (256 px, bare names at two seeds) and at 128 px (what the close-ups keep); the VAE and train.json returned.
# The shipped model's figures by the committed eval CLIP are in docs/training.md ("Twelfth run"); EVAL_SHIPPED=1
# scores it here too.
source scripts/scene-run/env.sh
set -x
python3 - <<'PY'
import os
from ldmkit.eval.generate import GRID_PROMPTS, SCENE_GRID_PROMPTS, sample_grid
from ldmkit.pipeline import Pipeline
out = os.environ["OUT"]
p = Pipeline.from_pretrained(".runs/new", device="cuda")
sample_grid(p, SCENE_GRID_PROMPTS, guidance=3.5).save(f"{out}/grid-scenes.png")
sample_grid(p, GRID_PROMPTS, guidance=3.5).resize((768, 1152)).save(f"{out}/grid-names.png")
PY
ldm eval --model .runs/new --name-seeds 2 --guidance 3.5 --clip .runs/clip/clip --out $OUT/eval-g3.5.json > $OUT/eval-g3.5.txt 2>&1
ldm eval --model .runs/new --guidance 3.5 --size 128 --clip .runs/clip/clip --out $OUT/eval-128.json > $OUT/eval-128.txt 2>&1
if [ "${EVAL_SHIPPED:-0}" = 1 ]; then
  ldm eval --model .runs/base --guidance 3.5 --clip .runs/clip/clip --out $OUT/eval-shipped.json > $OUT/eval-shipped.txt 2>&1
fi
tar cf $OUT/vae.tar -C .runs/new vae
cp .runs/scene/train.json $OUT/
