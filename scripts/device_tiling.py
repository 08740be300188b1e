"""Large images with the tiled VAE on a GPU: peak memory and time at 2048x2048, and tiled vs whole decode.

SD1.5-shaped random fp16 weights (ldm bench's), diffusers' tiled VAE and then ldmkit.tiled_vae.
Prints one JSON line per measurement.
"""

import json
import time

import numpy as np
import torch

from ldmkit.bench import random_sd15
from ldmkit.pipeline import Pipeline


def measure(pipe, size, steps):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    image = pipe.generate("a castle on a hill", steps=steps, width=size, height=size, seed=0).images[0]
    torch.cuda.synchronize()
    return image, time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def main():
    device = torch.device("cuda")
    pipe = Pipeline(random_sd15(device), device, torch.float16)
    pipe.generate("warm-up", steps=1, width=512, height=512, seed=0)
    latents = torch.randn(1, 4, 128, 128, generator=torch.Generator("cpu").manual_seed(0)).to(device, torch.float16)
    whole = np.asarray(pipe.latents_to_images(latents)[0], dtype=np.float64)
    for method in ("diffusers", "ldmkit"):
        if method == "ldmkit":
            pipe.vae.disable_tiling()
            pipe.enable_vae_tiling()  # shared GroupNorm statistics; diffusers' tiling before it
        else:
            pipe.vae.enable_tiling()
        tiled = np.asarray(pipe.latents_to_images(latents)[0], dtype=np.float64)
        mse = ((whole - tiled) ** 2).mean()
        print(
            json.dumps(
                {"method": method, "decode_1024": "tiled vs whole", "psnr_db": round(10 * np.log10(255**2 / mse), 2)}
            ),
            flush=True,
        )
        for size, steps in ((1024, 25), (2048, 25)):
            _, seconds, peak = measure(pipe, size, steps)
            row = {
                "method": method,
                "size": size,
                "steps": steps,
                "seconds": round(seconds, 2),
                "peak_gib": round(peak, 2),
            }
            print(json.dumps(row), flush=True)
        big = torch.randn(1, 4, 256, 256, generator=torch.Generator("cpu").manual_seed(0)).to(device, torch.float16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        pipe.latents_to_images(big)
        torch.cuda.synchronize()
        row = {"method": method, "decode_only": 2048, "seconds": round(time.perf_counter() - start, 2)}
        print(json.dumps({**row, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)


if __name__ == "__main__":
    main()
