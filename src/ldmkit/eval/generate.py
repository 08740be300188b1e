"""Batched text-to-image sampling for evaluation: many prompts per UNet call, DPM++ 2M Karras, CFG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ldmkit.loading import load_tokenizer
from ldmkit.train.common import EMPTY_CAPTION, tokenize

if TYPE_CHECKING:
    import PIL.Image


@dataclass
class Model:
    """The parts of a diffusers folder that sampling needs, on one device."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    scheduler_config: dict
    device: torch.device


def load_model(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Model:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    device = torch.device(device)
    return Model(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype).to(device).eval(),
        vae=AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).to(device).eval(),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype).to(device).eval(),
        scheduler_config=dict(DDPMScheduler.load_config(folder / "scheduler")),
        device=device,
    )


def default_size(model: Model) -> int:
    """The model's native square size in pixels (the pipeline's default): UNet sample size x VAE factor."""
    return model.unet.config.sample_size * 2 ** (len(model.vae.config.block_out_channels) - 1)


@torch.no_grad()
def generate(
    model: Model,
    prompts: list[str],
    seeds: list[int],
    steps: int = 25,
    guidance: float = 7.5,
    batch_size: int = 128,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """One image per (prompt, seed) pair -> (N, 3, H, W) uint8 on the CPU; noise drawn per seed on the CPU."""
    from diffusers import DPMSolverMultistepScheduler

    height, width = height or default_size(model), width or default_size(model)
    tokenizer = load_tokenizer()
    dtype = next(model.unet.parameters()).dtype
    uncond = model.text_encoder(tokenize(tokenizer, [EMPTY_CAPTION]).to(model.device)).last_hidden_state
    factor = 2 ** (len(model.vae.config.block_out_channels) - 1)
    shape = (model.unet.config.in_channels, height // factor, width // factor)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts, batch_seeds = prompts[start : start + batch_size], seeds[start : start + batch_size]
        n = len(batch_prompts)
        cond = model.text_encoder(tokenize(tokenizer, batch_prompts).to(model.device)).last_hidden_state
        text_states = torch.cat([uncond.expand(n, -1, -1), cond]).to(dtype)  # (2n, 77, hidden)
        # A1111's "DPM++ 2M Karras": second-order multistep DPM-Solver++ on Karras sigmas
        scheduler = DPMSolverMultistepScheduler.from_config(
            model.scheduler_config, use_karras_sigmas=True, algorithm_type="dpmsolver++", solver_order=2
        )
        scheduler.set_timesteps(steps, device=model.device)
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in batch_seeds])
        latents = noise.to(model.device) * scheduler.init_noise_sigma  # (n, 4, h, w)
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(dtype)
            out = model.unet(model_input, t, text_states).sample.float()
            out_uncond, out_cond = out.chunk(2)
            latents = scheduler.step(out_uncond + guidance * (out_cond - out_uncond), t, latents).prev_sample
        decoded = model.vae.decode((latents / model.vae.config.scaling_factor).to(dtype)).sample.float()
        images.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(images)


def grid(images: torch.Tensor, columns: int) -> PIL.Image.Image:
    """(N, 3, H, W) uint8 -> one PIL image, row-major, `columns` wide."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.full((3, rows * h, columns * w), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


GRID_PROMPTS = (
    "otter",
    "red apple",
    "smiling face with sunglasses",
    "rocket",
    "pizza",
    "otter, 3d render",
    "red apple, flat icon",
    "cat face, flat illustration",
    "ghost, cartoon emoji",
)


SCENE_GRID_PROMPTS = (
    "an otter wearing sunglasses relaxing on a floating tube in a swimming pool, on a sunny day",
    "a cute blue-green space rover with cute eyes, lost on a strange planet, cool earth tones",
    "a cat on the left and a rocket on the right",
    "a blue banana",
    "three red apples",
    "a dog wearing a crown",
    "a frog wearing a top hat, 3d render",
    "a penguin in the snow",
)


def sample_grid(
    model: Model,
    prompts=GRID_PROMPTS,
    seeds=(0, 1, 2, 3, 4, 5),
    steps: int = 25,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> PIL.Image.Image:
    """One row per prompt, one column per seed."""
    pairs = [(p, s) for p in prompts for s in seeds]
    prompts_, seeds_ = [p for p, _ in pairs], [s for _, s in pairs]
    images = generate(model, prompts_, seeds_, steps=steps, guidance=guidance, height=height, width=width)
    return grid(images, columns=len(seeds))
