"""A wall-clock timeline of a fresh `--fast` process up to its second image (issue 5), printed as JSON.

python3 scripts/device_warm_timeline.py MODEL_FOLDER [SIZE]   # after a process has filled the compile cache

Wraps the steps a warm start goes through (imports, weight loading, make_fast, loading each saved compiled
function and checking its guards, the CUDA graph capture, text encoding, the decode) with timers that
synchronize the GPU, so each step's own GPU work is counted in it. cProfile cannot do this: dynamo's frame
hook hides the call tree from it, and it inflates the Python-heavy imports.
"""

import json
import sys
import time
from collections import defaultdict

T0 = time.perf_counter()
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke test of this script
torch.zeros(1, device=DEVICE)
T_TORCH = time.perf_counter()
import diffusers  # noqa: F401
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401

T_DIFFUSERS = time.perf_counter()
from ldmkit import cuda_graphs, fast, loading, pipeline, precompile

T_LDMKIT = time.perf_counter()
totals: dict = defaultdict(float)
counts: dict = defaultdict(int)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(owner, name, label):
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sync()
            totals[label] += time.perf_counter() - start
            counts[label] += 1

    setattr(owner, name, wrapper)


timed(loading, "load_components", "load weights")
timed(fast, "make_fast", "make_fast")  # imported from ldmkit.fast when called
timed(torch.compiler, "load_compiled_function", "load compiled file")
timed(precompile.PrecompiledCall, "_load_or_compile", "load compiled file + guard_check")
timed(cuda_graphs.CUDAGraphed, "_capture", "CUDA graph capture (2 warm-up calls + record)")
timed(pipeline.Pipeline, "encode_prompt", "encode prompt")
timed(fast.FastDecode, "__call__", "VAE decode (load + run)")
timed(pipeline, "tensor_to_pil", "to PIL")


def main():
    size = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    phases = {
        "import torch + CUDA init": T_TORCH - T0,
        "import diffusers models": T_DIFFUSERS - T_TORCH,
        "import ldmkit": T_LDMKIT - T_DIFFUSERS,
    }
    start = time.perf_counter()
    pipe = pipeline.Pipeline.from_pretrained(sys.argv[1], device=DEVICE, fast=True)
    sync()
    phases["from_pretrained"] = time.perf_counter() - start
    for run in ("first image", "second image"):
        start = time.perf_counter()
        pipe.generate("a castle on a hill", steps=50, sampler="DDIM", seed=1, width=size, height=size)
        sync()
        phases[run] = time.perf_counter() - start
        if run == "first image":
            phases.update({f"  {k} (x{counts[k]})": v for k, v in totals.items()})
    phases["process"] = time.perf_counter() - T0
    print("RESULT", json.dumps({k: round(v, 3) for k, v in phases.items()}, indent=1), flush=True)


if __name__ == "__main__":
    main()
