"""Where one warm generation's wall time goes outside the UNet: a torch.profiler trace of a warm call, split
into phases by the Denoiser's calls, with the GPU's idle time in each phase.

    python -m benchmarks step-profile --family sdxl --steps 30 --sampler Euler     # ours-fast, 1024x1024

    python -m benchmarks step-profile --analyse trace.json.gz   # the same numbers from a trace brought back

Prints, per phase (before the first UNet call: prompt encoding and setup; the denoising loop; after the last UNet
call: decode and conversion), the wall time, the GPU's busy time (the union of its kernels' intervals) and the
difference, plus the operators with the most CPU time. Writes OUT/step-profile.json and OUT/trace.json (chrome).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import time
from pathlib import Path

from ldmkit import bench

from .common import describe_environment, out_dir

MARK = "ldmkit.denoiser_call"


KERNEL_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


def busy_ms(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Length (ms) of the union of [a, b) intervals (µs) clipped to [start, end)."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total / 1000


def analyse(events: list[dict]) -> dict:
    """Phases of one profiled call from its chrome trace events (a "generate" range around it, MARK ranges around
    each Denoiser call, on the CPU as user_annotation and on the GPU as gpu_user_annotation):
    * before: from the call's start to the first Denoiser call on the CPU (prompt encoding, noise, schedule);
    * loop: the GPU's span of the Denoiser calls, the kernels' share of it, and per step;
    * after: from the last step's end on the GPU to the call's end (decode, conversion to 8 bits).
    """
    call = next(e for e in events if e.get("name") == "generate" and e.get("cat") == "user_annotation")
    marks = {
        cat: sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == MARK and e.get("cat") == cat)
        for cat in ("user_annotation", "gpu_user_annotation")
    }
    cpu_marks = [a for a, _ in marks["user_annotation"]]
    gpu_marks = marks["gpu_user_annotation"] or marks["user_annotation"]  # a CPU run has no GPU timeline
    kernels = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in KERNEL_CATEGORIES]
    start = call["ts"]
    end = max([call["ts"] + call["dur"], *[b for _, b in kernels]])
    loop_start, loop_end = gpu_marks[0][0], gpu_marks[-1][1]

    def phase(a, b):
        wall, busy = (b - a) / 1000, busy_ms(kernels, a, b)
        return {"wall_ms": round(wall, 2), "gpu_busy_ms": round(busy, 2), "gpu_idle_ms": round(wall - busy, 2)}

    steps = [busy_ms(kernels, a, b) for a, b in gpu_marks]
    spans = [(b - a) / 1000 for a, b in gpu_marks]
    return {
        "total": phase(start, end),
        "before": phase(start, cpu_marks[0]),
        "loop": phase(loop_start, loop_end),
        "after": phase(loop_end, end),
        "steps": len(gpu_marks),
        "step_kernels_ms": {
            "first": round(steps[0], 2),
            "last": round(steps[-1], 2),
            "mean": round(sum(steps) / len(steps), 2),
        },
        "step_span_ms_mean": round(sum(spans) / len(spans), 2),
    }


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
    parser.add_argument("--analyse", type=Path, default=None, help="only analyse this trace (.json or .json.gz)")
    args = parser.parse_args(argv)
    if args.analyse:
        opener = gzip.open if args.analyse.suffix == ".gz" else open
        with opener(args.analyse, "rt") as f:
            print(json.dumps(analyse(json.load(f)["traceEvents"]), indent=1))
        return 0
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
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    result = analyse(json.loads(trace.read_text())["traceEvents"])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(json.dumps(result, indent=1))
    print(table)
    record = {"request": dataclasses.asdict(request), **result}
    (out / "step-profile.json").write_text(json.dumps(record, indent=1, default=str))
    (out / "step-profile-ops.txt").write_text(table)
    return 0
