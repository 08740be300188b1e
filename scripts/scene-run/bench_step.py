"""Time one scene-stage UNet step on the GPU, apart from the data: where a step's 0.27 s may go.

The shipped UNet's shape at the scene stage's batch (256 latents of 32x32, 77 caption states of 128), under bf16
autocast with fp32 weights as `ldm train scene` runs it, in a few memory layouts and optimizer settings; and the
close-up teacher's forward (1,024 latents of 16x16, no grad). Prints one line a variant and appends it to
$OUT/bench_step.txt, so a call cut short still returns what it measured.
Run: PYTHONPATH=src:/tmp/site python3 scripts/scene-run/bench_step.py [variant ...]
"""

import os
import sys
import time

import torch
from diffusers import UNet2DConditionModel

CONFIG = "src/ldmkit/assets/default-model/unet"
OUT = os.path.join(os.environ.get("OUT", "."), "bench_step.txt")
# on a machine without a GPU (a smoke run of the script itself): the CPU, and SCALE divides the batches
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCALE = int(os.environ.get("SCALE", "1"))


def report(line: str) -> None:
    print(line, flush=True)
    with open(OUT, "a") as f:
        f.write(line + "\n")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, warmup: int = 5, steps: int = 20) -> float:
    for _ in range(warmup):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def train_step(channels_last: bool, fused: bool, compiled: bool, batch=256, side=32):
    batch //= SCALE
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG)).to(DEVICE)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    unet = unet.to(memory_format=layout)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused)
    forward = torch.compile(unet) if compiled else unet
    x = torch.randn(batch, 4, side, side, device=DEVICE).contiguous(memory_format=layout)
    t = torch.randint(0, 1000, (batch,), device=DEVICE)
    states = torch.randn(batch, 77, 128, device=DEVICE)
    target = torch.randn_like(x)

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            prediction = forward(x, t, states).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()

    return step


def teacher_forward(batch=1024, side=16):
    batch //= SCALE
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG)).to(DEVICE).eval()
    unet = unet.to(memory_format=torch.channels_last).requires_grad_(False)
    x = torch.randn(batch, 4, side, side, device=DEVICE).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,), device=DEVICE)
    states = torch.randn(batch, 77, 128, device=DEVICE)

    def step():
        with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
            unet(x, t, states)

    return step


VARIANTS = {
    "channels_last": lambda: train_step(True, False, False),  # what the scene stage does now
    "contiguous": lambda: train_step(False, False, False),
    "channels_last_fused_adamw": lambda: train_step(True, True, False),
    "contiguous_fused_adamw": lambda: train_step(False, True, False),
    "close_up_student_1024x16": lambda: train_step(True, False, False, batch=1024, side=16),
    "close_up_teacher_1024x16": teacher_forward,
    "compiled_contiguous_fused": lambda: train_step(False, True, True),
}

if __name__ == "__main__":
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else f"CPU, batches / {SCALE}"
    report(f"# {name}, torch {torch.__version__}")
    for name in sys.argv[1:] or VARIANTS:
        begin = time.perf_counter()
        seconds = timed(VARIANTS[name]())
        report(f"{name}: {1000 * seconds:.1f} ms a step ({time.perf_counter() - begin:.0f} s with set-up)")
