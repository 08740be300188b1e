#!/bin/bash
# Keep a returned scene UNet for the next session: `keep.sh DIR` (DIR: the unet folder unpacked from call 3's
# unet.part-*) rewrites it as checkpoints/scene-unet (fp16, shards <= 14 MB), checked tensor by tensor. Commit it.
[ -f "$1/config.json" ] || { echo "keep.sh: $1 is not a UNet folder" >&2; exit 2; }
source=$(realpath "$1")
cd "$(dirname "$0")/../.." || exit 1
exec .venv/bin/python - "$source" <<'PY'
import shutil, sys
from pathlib import Path
import torch
from diffusers import UNet2DConditionModel
source, target = Path(sys.argv[1]), Path("checkpoints/scene-unet")
unet = UNet2DConditionModel.from_pretrained(source, torch_dtype=torch.float16)
# where it came from, relative to the repository when inside it (not this machine's absolute path)
unet.register_to_config(_name_or_path=str(source.relative_to(Path.cwd()) if source.is_relative_to(Path.cwd()) else source))
shutil.rmtree(target, ignore_errors=True)
unet.save_pretrained(target, max_shard_size="14MB")
kept = UNet2DConditionModel.from_pretrained(target, torch_dtype=torch.float16).state_dict()
same = all(torch.equal(t, kept[name]) for name, t in unet.state_dict().items())
if not same or len(kept) != len(unet.state_dict()):
    sys.exit("keep.sh: the written checkpoint differs from its source")
print(f"keep.sh: {len(kept)} tensors -> {target} ({sum(p.stat().st_size for p in target.iterdir()) / 1e6:.1f} MB)")
PY
