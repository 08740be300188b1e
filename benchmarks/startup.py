"""The first image of `ldm generate --fast` in a fresh process, whole command timed (imports, loading, compile).

    python -m benchmarks first-image     # empty compile caches: the cost a user pays once per model and size
    python -m benchmarks warm-start      # the caches filled by a first run (made here if empty): every later run

SD1.5-shaped random fp16 weights at 512x512, 50 DDIM steps, saved once under --work. The compile caches
(inductor's and ldmkit's precompiled UNet, LDMKIT_COMPILE_CACHE) live under --work too, so a first-image run
starts them empty. `--bench-batch N` adds `ldm bench` rows diffusers and ours-fast at batch N.
Prints one JSON line per run and writes them to OUT/startup.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import describe_environment, out_dir, save_random_sd15


def main(name: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/ldmkit-bench"), help="model and caches")
    parser.add_argument("--runs", type=int, default=1 if name == "first-image" else 2, help="timed commands")
    parser.add_argument("--bench-batch", type=int, default=0, help="also run `ldm bench` at this batch (0: no)")
    parser.add_argument("--out-dir", default="bench-out")
    args = parser.parse_args(argv)
    out = out_dir(args.out_dir)
    describe_environment(out)
    model = save_random_sd15(args.work / "sd15")
    caches = args.work / "caches"
    env = {
        **os.environ,
        "LDMKIT_COMPILE_CACHE": str(caches / "ldmkit"),
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        # Python's own bytecode cache, which a normal install has (some container images turn it off)
        "PYTHONPYCACHEPREFIX": str(caches / "pycache"),
        "PYTHONDONTWRITEBYTECODE": "",
    }
    if name == "first-image":
        shutil.rmtree(caches, ignore_errors=True)
    elif not caches.exists():
        generate(model, env, args.work / "images")  # fill the caches; not timed
    with open(out / "startup.jsonl", "a") as log:
        for run in range(1, args.runs + 1):
            seconds, images = generate(model, env, args.work / f"images-{run}")
            row = {"scenario": name, "run": run, "seconds": round(seconds, 1), "images": images}
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
    if args.bench_batch:
        bench = ["-m", "ldmkit.bench", "--model", str(model), "--rows", "diffusers,ours-fast", "--size", "512"]
        bench += ["--batch", str(args.bench_batch), "--steps", "50", "--sampler", "DDIM", "--warmup", "1"]
        subprocess.run([sys.executable, *bench, "--repeats", "3", "--out", str(out / "table.md")], env=env, check=False)
    return 0


def generate(model: Path, env: dict, images: Path) -> tuple[float, int]:
    """Seconds for one whole `ldm generate --fast` command, and the images it wrote."""
    shutil.rmtree(images, ignore_errors=True)
    command = [sys.executable, "-m", "ldmkit.cli", "generate", "a castle on a hill", "--model", str(model), "--fast"]
    command += ["--size", "512x512", "--steps", "50", "--sampler", "DDIM", "--seed", "1", "-o", str(images), "-q"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, len(list(images.glob("*.png")))
