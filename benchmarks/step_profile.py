"""Where one warm generation's wall time goes outside the UNet: a torch.profiler trace of a warm call, split
into phases by the Denoiser's calls, with the GPU's idle time in each phase.

    python -m benchmarks step-profile --family sdxl --steps 30 --sampler Euler     # ours-fast, 1024x1024

Prints, per phase (before the first UNet call: prompt encoding and setup; the denoising loop; after the last UNet
call: decode and conversion), the wall time, the GPU's busy time (the union of its kernels' intervals) and the
difference, plus the operators with the most CPU time. Writes OUT/step-profile.json and OUT/trace.json (chrome).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from ldmkit import bench

from .common import describe_environment, out_dir

MARK = "ldmkit.denoiser_call"


def busy_ms(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length (ms) of the union of [a, b) intervals (µs) clipped to [start, end)."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total / 1000


def phases(kernels: list[tuple[float, float]], marks: list[tuple[float, float]], start: float, end: float) -> dict:
    """Per phase (before the first Denoiser call, the loop, after it) the wall ms, the GPU's busy ms and the rest.

    The loop ends where the GPU finishes the last step's work: the CPU marks end when the work is queued.
    """
    bounds = {"whole": (start, end)}
    if marks:
        last_mark_end = max(b for _, b in marks)
        loop_end = max([b for a, b in kernels if a < last_mark_end] or [last_mark_end])
        bounds = {"before": (start, min(a for a, _ in marks)), "loop": (min(a for a, _ in marks), loop_end),
                  "after": (loop_end, end)}  # fmt: skip
    result = {}
    for name, (a, b) in bounds.items():
        wall, busy = (b - a) / 1000, busy_ms(kernels, a, b)
        result[name] = {"wall_ms": round(wall, 2), "gpu_busy_ms": round(busy, 2), "gpu_idle_ms": round(wall - busy, 2)}
    return result


def main(name: str, argv: list[str]) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ldmkit import denoise
    from ldmkit.params import GenerationParams

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sdxl", choices=sorted(bench.RANDOM_MODELS))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sampler", default="Euler")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the family's)")
    parser.add_argument("--row", default="ours-fast", choices=bench.RUNNER_NAMES)
    parser.add_argument("--out-dir", default="bench-out")
    args = parser.parse_args(argv)
    out = out_dir(args.out_dir)
    bench.quiet_libraries()
    describe_environment(out)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU: a smoke run only
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = args.size or bench.DEFAULT_SIZE[args.family]
    request = GenerationParams(
        bench.PROMPT, steps=args.steps, guidance=bench.GUIDANCE, sampler=args.sampler, width=size, height=size
    ).resolved(size)
    master = bench.load_master(None, device, dtype, args.family)
    generate = bench.RUNNERS[args.row](bench.place(master, device, dtype), device, dtype, request)
    start = time.perf_counter()
    generate(0)
    print(f"first image (compile included): {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(2):
        generate(0)
    if device.type == "cuda":
        torch.cuda.synchronize()

    original = denoise.Denoiser.__call__

    def marked(self, *a, **k):
        with record_function(MARK):
            return original(self, *a, **k)

    denoise.Denoiser.__call__ = marked
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            with record_function("generate"):
                generate(1)
            if device.type == "cuda":
                torch.cuda.synchronize()
    finally:
        denoise.Denoiser.__call__ = original
    events = prof.events()
    whole = next(e for e in events if e.name == "generate")
    kernels = [(e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA"]
    marks = [(e.time_range.start, e.time_range.end) for e in events if e.name == MARK]
    start, end = whole.time_range.start, max([whole.time_range.end, *[b for _, b in kernels]])
    result = {**phases(kernels, marks, start, end), "denoiser_calls": len(marks)}
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(json.dumps(result, indent=1))
    print(table)
    record = {"request": dataclasses.asdict(request), **result}
    (out / "step-profile.json").write_text(json.dumps(record, indent=1, default=str))
    (out / "step-profile-ops.txt").write_text(table)
    prof.export_chrome_trace(str(out / "trace.json"))
    return 0
