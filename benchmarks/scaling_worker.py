"""Multi-process generation throughput: the prompts of `ldm generate --prompts` split across ranks.

`python -m benchmarks scaling` runs it under `torchrun --nproc-per-node N -m benchmarks.scaling_worker`. It uses
the same split as the CLI (ldmkit.distributed), loads the model on every rank, then times the generation alone
(between barriers, images kept in memory) and prints one JSON line on rank 0.
"""

import argparse
import json
import time

import torch

from ldmkit.distributed import start_workers
from ldmkit.pipeline import Pipeline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=32, help="number of prompts")
    parser.add_argument("-n", type=int, default=4, help="images per prompt (one batch)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    workers = start_workers(args.device)
    t_load = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.model, device=workers.device, dtype=args.dtype)
    pipe.generate("warm-up", steps=2, width=args.size, height=args.size, seed=0)  # kernels, allocator
    load_s = time.perf_counter() - t_load
    prompts = [f"prompt number {j}" for j in range(args.prompts)]
    workers.barrier()
    start = time.perf_counter()
    for j in workers.mine(list(range(len(prompts)))):
        pipe.generate(
            prompts[j], steps=args.steps, width=args.size, height=args.size, num_images=args.n, seed=j * args.n
        )
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    workers.barrier()
    seconds = time.perf_counter() - start
    if workers.rank == 0:
        images = args.prompts * args.n
        print(
            json.dumps(
                {
                    "processes": workers.world_size,
                    "images": images,
                    "seconds": round(seconds, 2),
                    "images_per_s": round(images / seconds, 3),
                    "load_s_rank0": round(load_s, 1),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
