"""Where a fresh `--fast` process spends its time before the first image (issue 5): one JSON line.

python3 scripts/device_warm_start.py MODEL_FOLDER   # run twice: the first fills inductor's caches
"""

import json
import logging
import sys
import time

T0 = time.perf_counter()
import torch

from ldmkit.pipeline import Pipeline


def main():
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    logging.getLogger("ldmkit.precompile").setLevel(logging.DEBUG)
    phases = {"import": time.perf_counter() - T0}
    start = time.perf_counter()
    pipe = Pipeline.from_pretrained(sys.argv[1], device="cuda", fast=True)
    torch.cuda.synchronize()
    phases["load_and_make_fast"] = time.perf_counter() - start
    start = time.perf_counter()
    pipe.generate("a castle on a hill", steps=50, sampler="DDIM", seed=1, width=512, height=512)
    torch.cuda.synchronize()
    phases["first_image"] = time.perf_counter() - start
    start = time.perf_counter()
    pipe.generate("a castle on a hill", steps=50, sampler="DDIM", seed=2, width=512, height=512)
    torch.cuda.synchronize()
    phases["second_image"] = time.perf_counter() - start
    phases["process"] = time.perf_counter() - T0
    phases = {k: round(v, 2) for k, v in phases.items()}
    print("RESULT", json.dumps(phases), flush=True)
    print(torch._dynamo.utils.compile_times(repr="str"), flush=True)


if __name__ == "__main__":
    main()
