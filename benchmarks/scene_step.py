"""The scene stage's step, timed in parts: the frozen VAE's encode and the UNet's training step, eager and compiled.

Random weights and inputs in the shipped model's layouts (timing only): a batch of 256-px scenes through the VAE
encoder, and the UNet's forward, backward and AdamW step on 32x32 latents, bf16 autocast and channels_last as
`ldm train scene` runs them. Compiling the UNet takes minutes, so `--compile-unet` asks for it.
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


def main(name: str, argv: list[str]) -> int:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ldmkit.loading import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=256, help="scene side in pixels")
    parser.add_argument("--compile-unet", action="store_true")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("scene-step: needs a CUDA GPU")
        return 2
    device, batch = "cuda", args.batch
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(DEFAULT_MODEL_DIR / "vae"))
    vae = vae.to(device).eval().requires_grad_(False).to(memory_format=torch.channels_last)
    unet_config = dict(UNet2DConditionModel.load_config(DEFAULT_MODEL_DIR / "unet"), sample_size=args.size // 8)
    unet = UNet2DConditionModel.from_config(unet_config).to(device).to(memory_format=torch.channels_last)
    pixels = torch.randn(batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)

    def encode():
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            return vae.encode(pixels).latent_dist.mean

    def train_step(model, latents):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(latents, timesteps, states).sample.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    latents = encode().float().contiguous(memory_format=torch.channels_last)
    print(f"batch {batch} at {args.size} px: VAE encode {_timed(encode) * 1e3:.0f} ms eager", flush=True)
    print(f"UNet forward+backward+AdamW {_timed(lambda: train_step(unet, latents)) * 1e3:.0f} ms eager", flush=True)
    vae.encoder = torch.compile(vae.encoder)
    start = time.perf_counter()
    encode()
    torch.cuda.synchronize()
    print(f"VAE encoder compiled in {time.perf_counter() - start:.0f} s: {_timed(encode) * 1e3:.0f} ms", flush=True)
    if args.compile_unet:
        compiled = torch.compile(unet)
        start = time.perf_counter()
        train_step(compiled, latents)
        torch.cuda.synchronize()
        step_ms = _timed(lambda: train_step(compiled, latents)) * 1e3
        print(f"UNet compiled in {time.perf_counter() - start:.0f} s: {step_ms:.0f} ms", flush=True)
    return 0
