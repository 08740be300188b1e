"""The scene stage's step, timed in parts: the frozen VAE's encode and the UNet's training step, eager and compiled.

Random weights and inputs in the shipped model's layouts (timing only): a batch of 256-px scenes through the VAE
encoder, and the UNet's forward, backward and AdamW step on 32x32 latents, bf16 autocast and channels_last as
`ldm train scene` runs them. Compiling the UNet takes minutes, so `--compile-unet` asks for it.

`--variants` times instead the UNet's step alone in each choice `ldm train scene --set unet_layout=... --set
fused_adamw=...` offers, compiled, and a close-up step (1,024 latents of 16x16) with a frozen teacher's forward on it
(`--set close_up_teacher`). `--out FILE` appends each line to FILE as it is measured, so a device call cut short
still returns what it measured.
"""

from __future__ import annotations

import argparse
import time

import torch


def _timed(fn, repeats: int = 10) -> float:
    """Mean seconds per call after 3 warm-up calls, synchronised."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _unet_step(unet, optimizer, latents, timesteps, states, clip: bool = False):
    """One forward, backward and AdamW step of `unet` on latents under bf16 autocast; `clip`: with the gradient norm
    clipped to 1 first, as every training stage does (common.optimizer_step)."""

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            loss = unet(latents, timesteps, states).sample.float().pow(2).mean()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _variants(unet_config: dict, batch: int, report) -> None:
    """The UNet's step alone in each layout and optimizer choice, compiled, and a close-up step with its teacher."""
    from diffusers import UNet2DConditionModel

    layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}

    def build(
        layout: str, fused: bool, compiled: bool = False, batch: int = batch, side: int = unet_config["sample_size"]
    ):
        unet = UNet2DConditionModel.from_config(unet_config).to("cuda").to(memory_format=layouts[layout])
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=fused)
        latents = torch.randn(batch, 4, side, side, device="cuda").contiguous(memory_format=layouts[layout])
        states = torch.randn(batch, 77, unet.config.cross_attention_dim, device="cuda")
        timesteps = torch.randint(0, 1000, (batch,), device="cuda")
        return _unet_step(torch.compile(unet) if compiled else unet, optimizer, latents, timesteps, states, clip=True)

    def teacher_forward(batch: int = 1024, side: int = 16):
        unet = UNet2DConditionModel.from_config(unet_config).to("cuda").eval().requires_grad_(False)
        unet = unet.to(memory_format=torch.channels_last)
        latents = torch.randn(batch, 4, side, side, device="cuda").contiguous(memory_format=torch.channels_last)
        states = torch.randn(batch, 77, unet.config.cross_attention_dim, device="cuda")
        timesteps = torch.randint(0, 1000, (batch,), device="cuda")

        def forward():
            with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
                unet(latents, timesteps, states)

        return forward

    variants = {
        "channels_last": lambda: build("channels_last", False),  # the scene stage's default layout
        "contiguous": lambda: build("contiguous", False),
        "channels_last_fused_adamw": lambda: build("channels_last", True),
        "contiguous_fused_adamw": lambda: build("contiguous", True),
        "close_up_student_1024x16": lambda: build("channels_last", False, batch=1024, side=16),
        "close_up_teacher_1024x16": teacher_forward,
        "compiled_contiguous_fused": lambda: build("contiguous", True, compiled=True),
    }
    for variant, make in variants.items():
        begin = time.perf_counter()
        seconds = _timed(make())
        report(f"{variant}: {1000 * seconds:.1f} ms a step ({time.perf_counter() - begin:.0f} s with set-up)")


def main(name: str, argv: list[str]) -> int:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ldmkit.loading import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=256, help="scene side in pixels")
    parser.add_argument("--compile-unet", action="store_true")
    parser.add_argument("--variants", action="store_true", help="the UNet's step alone in each layout and optimizer")
    parser.add_argument("--out", help="also append each line measured to this file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("scene-step: needs a CUDA GPU")
        return 2

    def report(line: str) -> None:
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    unet_config = dict(UNet2DConditionModel.load_config(DEFAULT_MODEL_DIR / "unet"), sample_size=args.size // 8)
    if args.variants:
        report(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch} at {args.size} px")
        _variants(unet_config, args.batch, report)
        return 0
    device, batch = "cuda", args.batch
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(DEFAULT_MODEL_DIR / "vae"))
    vae = vae.to(device).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    unet = UNet2DConditionModel.from_config(unet_config).to(device).to(memory_format=torch.channels_last)
    pixels = torch.randn(batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def encode():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            return vae.encode(pixels).latent_dist.mean

    latents = encode().float().contiguous(memory_format=torch.channels_last)
    report(f"batch {batch} at {args.size} px: VAE encode {_timed(encode) * 1e3:.0f} ms eager")
    eager_step = _unet_step(unet, optimizer, latents, timesteps, states)
    report(f"UNet forward+backward+AdamW {_timed(eager_step) * 1e3:.0f} ms eager")
    vae.encoder = torch.compile(vae.encoder)
    start = time.perf_counter()
    encode()
    torch.cuda.synchronize()
    report(f"VAE encoder compiled in {time.perf_counter() - start:.0f} s: {_timed(encode) * 1e3:.0f} ms")
    if args.compile_unet:
        compiled_step = _unet_step(torch.compile(unet), optimizer, latents, timesteps, states)
        start = time.perf_counter()
        compiled_step()
        torch.cuda.synchronize()
        step_ms = _timed(compiled_step) * 1e3
        report(f"UNet compiled in {time.perf_counter() - start:.0f} s: {step_ms:.0f} ms")
    return 0
