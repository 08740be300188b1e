"""The fast path with the tiled VAE at 2048x2048 (issue 5): time and peak GPU memory per image.

python3 scripts/device_fast_tiled.py MODEL_FOLDER   # e.g. from scripts/save_random_sd15.py
The first image includes compiling (or loading) the UNet for 256x256 latents; the tiled decode runs eager.
"""

import json
import sys
import time

import torch

from ldmkit.pipeline import Pipeline


def main():
    pipe = Pipeline.from_pretrained(sys.argv[1], device="cuda", fast=True, vae_tiling=True)
    for run in ("first", "second"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        image = pipe.generate("a castle on a hill", steps=25, width=2048, height=2048, seed=0).images[0]
        torch.cuda.synchronize()
        row = {"run": run, "size": image.size, "seconds": round(time.perf_counter() - start, 2)}
        print(json.dumps({**row, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)


if __name__ == "__main__":
    main()
