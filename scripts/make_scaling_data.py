"""A synthetic captioned set in `ldm data emoji`'s layout, for throughput runs (content does not matter)."""

import json
import sys
from pathlib import Path

import numpy as np

from ldmkit.data.emoji import EmojiRecord

out, count, size = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
styles = ["flat icon", "3d render", "cartoon emoji", "flat illustration"]
records = [
    EmojiRecord(key=f"{i:x}", name=f"thing {i // 4}", style=styles[i % 4], package="synthetic") for i in range(count)
]
np.save(out / "images.npy", rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8))
(out / "records.json").write_text(json.dumps([r.__dict__ for r in records]))
(out / "LICENSES.md").write_text("synthetic noise images\n")
