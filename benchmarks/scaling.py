"""Multi-GPU scaling: generation images/s and UNet training samples/s on 1, 2, ... N processes.

    python -m benchmarks scaling --gpus "1 2 4"

Generation: SD1.5-shaped random fp16 weights at 512x512 through benchmarks/scaling_worker.py under torchrun
(the prompt split of `ldm generate --prompts`, timed without model loading). Training: `ldm train unet` under
`accelerate launch` on a synthetic 128x128 set, with the shipped model's text encoder and VAE. `--cpu-dry-run
--model TINY_DIR` checks the scenario on a CPU (torchrun's gloo group) before spending GPU time.
Writes OUT/generation.jsonl and OUT/training.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from .common import describe_environment, out_dir, save_random_sd15

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "src" / "ldmkit" / "assets" / "default-model"


def main(name: str, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", default="1 2 4", help="process counts, space-separated")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--train-steps", type=int, default=150)
    parser.add_argument("--train-images", type=int, default=4096)
    parser.add_argument("--model", type=Path, default=None, help="default: SD1.5-shaped random weights")
    parser.add_argument("--cpu-dry-run", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/ldmkit-scaling"))
    parser.add_argument("--out-dir", default="scaling-out")
    args = parser.parse_args(argv)
    out = out_dir(args.out_dir)
    describe_environment(out)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1"}
    model = args.model or save_random_sd15(args.work / "sd15")
    data = synthetic_data(args.work / "data", args.train_images, 128)
    device = "cpu" if args.cpu_dry_run else "auto"
    counts = [int(n) for n in args.gpus.split()]
    for n in counts:
        worker = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "-m"]
        worker += ["benchmarks.scaling_worker", "--model", str(model), "--prompts", str(args.prompts)]
        worker += ["--steps", str(args.steps), "--size", str(args.size), "--device", device]
        line = subprocess.run(worker, env=env, check=True, capture_output=True, text=True).stdout.strip()
        print(line, flush=True)
        with open(out / "generation.jsonl", "a") as log:
            log.write(line + "\n")
    for n in counts:
        if args.cpu_dry_run:  # accelerate launch --cpu starts one process; torchrun forms a gloo group
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n)]
        else:
            launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n)]
            launch += ["--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"]
            launch += ["--multi_gpu"] if n > 1 else []
        train = ["-m", "ldmkit.cli", "train", "unet", "--data", str(data), "--runs", str(args.work / f"runs{n}")]
        train += ["--steps", str(args.train_steps), "--set", "log_every=50"]
        train += ["--set", f'text_encoder_dir="{DEFAULT_MODEL / "text_encoder"}"']
        train += ["--set", f'vae_dir="{DEFAULT_MODEL / "vae"}"']
        log_lines = subprocess.run([*launch, *train], env=env, check=True, capture_output=True, text=True).stdout
        last = [line for line in log_lines.splitlines() if "unet step" in line][-1]
        print(f"processes {n}: {last}", flush=True)
        with open(out / "training.txt", "a") as log:
            log.write(f"processes {n}: {last}\n")
    return 0


def synthetic_data(out: Path, count: int, size: int) -> Path:
    """A captioned set in `ldm data emoji`'s layout (noise images: throughput does not depend on content)."""
    from ldmkit.data.emoji import EmojiRecord

    if (out / "records.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    styles = ["flat icon", "3d render", "cartoon emoji", "flat illustration"]
    records = [
        EmojiRecord(key=f"{i:x}", name=f"thing {i // 4}", style=styles[i % 4], package="synthetic")
        for i in range(count)
    ]
    np.save(out / "images.npy", rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8))
    (out / "records.json").write_text(json.dumps([r.__dict__ for r in records]))
    (out / "LICENSES.md").write_text("synthetic noise images\n")
    return out
