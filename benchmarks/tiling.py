"""Large images with the tiled VAE on a GPU: peak memory and time at 1024 and 2048 px, and tiled vs whole decode.

    python -m benchmarks tiling [--fast]

SD1.5-shaped random fp16 weights (ldm bench's), 25 steps of the default sampler, eager: diffusers' tiled VAE, then
ldmkit's (tiles that share GroupNorm statistics). With --fast, ldmkit's fast path with tiling at 2048 px
(the first image includes compiling the UNet for 256x256 latents). One JSON line per measurement, also in
OUT/tiling.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time

from .common import describe_environment, out_dir


def main(name: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="time the fast path with tiling instead")
    parser.add_argument("--out-dir", default="bench-out")
    args = parser.parse_args(argv)
    out = out_dir(args.out_dir)
    describe_environment(out)
    with open(out / "tiling.jsonl", "a") as log:

        def report(row: dict) -> None:
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")

        if args.fast:
            fast_path(report)
        else:
            for method in ("diffusers", "ldmkit"):
                compare(method, report)
    return 0


def pipeline(method: str):
    import torch

    from ldmkit.bench import random_sd15
    from ldmkit.pipeline import Pipeline

    device = torch.device("cuda")
    components = random_sd15(device)
    if method == "diffusers":
        components.vae.enable_tiling()  # diffusers' own tiling, on a VAE no other pipeline shares
    pipe = Pipeline(components, device, torch.float16)
    if method == "ldmkit":
        pipe.enable_vae_tiling()
    return pipe


def measure(pipe, size: int, steps: int) -> tuple[float, float]:
    """Seconds and peak GiB of one image."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    pipe.generate("a castle on a hill", steps=steps, width=size, height=size, seed=0)
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30


def compare(method: str, report) -> None:
    import numpy as np
    import torch

    pipe = pipeline(method)
    pipe.generate("warm-up", steps=1, width=512, height=512, seed=0)
    untiled = pipeline("none")  # the same seed-0 weights decoding whole: the reference for the seams
    latents = torch.randn(1, 4, 128, 128, generator=torch.Generator("cpu").manual_seed(0)).to("cuda", torch.float16)
    whole = np.asarray(untiled.latents_to_images(latents)[0], dtype=np.float64)
    del untiled
    tiled = np.asarray(pipe.latents_to_images(latents)[0], dtype=np.float64)
    psnr = 10 * np.log10(255**2 / ((whole - tiled) ** 2).mean())
    report({"method": method, "decode_1024": "tiled vs whole", "psnr_db": round(float(psnr), 2)})
    for size in (1024, 2048):
        seconds, peak = measure(pipe, size, 25)
        report({"method": method, "size": size, "steps": 25, "seconds": round(seconds, 2), "peak_gib": round(peak, 2)})


def fast_path(report) -> None:
    import torch

    from ldmkit.bench import random_sd15
    from ldmkit.pipeline import Pipeline

    device = torch.device("cuda")
    pipe = Pipeline(random_sd15(device), device, torch.float16)
    pipe.make_fast()
    pipe.enable_vae_tiling()
    for run in ("first", "second"):
        seconds, peak = measure(pipe, 2048, 25)
        report(
            {
                "method": "ldmkit fast",
                "run": run,
                "size": 2048,
                "seconds": round(seconds, 2),
                "peak_gib": round(peak, 2),
            }
        )
