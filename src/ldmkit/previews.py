"""Intermediate images: decode each step's predicted clean latents, lay them out as a grid or animation."""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit.pipeline import Pipeline, StepInfo, tensor_to_pil

PREVIEW_MODES = ("full", "fast")

# AUTOMATIC1111/ComfyUI's linear map from SD's 4 (scaled) latent channels to RGB in [-1, 1].
SD_LATENT_RGB = torch.tensor(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
)
SD_VAE_BLOCKS = [128, 256, 512, 512]

_fitted_projections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@torch.inference_mode()
def preview_images(pipe: Pipeline, step: StepInfo, mode: str = "full") -> list[Image.Image]:
    """The step's predicted clean images: 'full' decodes with the VAE, 'fast' projects latents to RGB."""
    if mode == "full":
        return tensor_to_pil(pipe.decode_latents(step.denoised))
    if mode == "fast":
        return tensor_to_pil(fast_preview(pipe, step.denoised))
    raise ValueError(f"unknown preview mode {mode!r}; use one of {PREVIEW_MODES}")


@torch.inference_mode()
def fast_preview(pipe: Pipeline, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, H, W) in [0, 1] through a linear map, upsampled to image size."""
    weight, bias = latent_rgb_projection(pipe)
    rgb = (
        torch.einsum("bchw,cr->brhw", latents.float(), weight.to(latents.device))
        + bias.to(latents.device)[:, None, None]
    )
    rgb = F.interpolate(rgb, scale_factor=pipe.vae_scale_factor, mode="bilinear", align_corners=False)
    return ((rgb + 1) / 2).clamp(0, 1)


def latent_rgb_projection(pipe: Pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 3) weight and (3,) bias: SD's known factors for SD's VAE, else a fit to this VAE (cached)."""
    vae = pipe.vae
    if vae.config.latent_channels == 4 and list(vae.config.block_out_channels) == SD_VAE_BLOCKS:
        return SD_LATENT_RGB, torch.zeros(3)
    if vae not in _fitted_projections:
        _fitted_projections[vae] = fit_latent_rgb(pipe)
    return _fitted_projections[vae]


@torch.inference_mode()
def fit_latent_rgb(pipe: Pipeline, count: int = 16, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares map from latents to the colours they encode, over smooth random colour fields."""
    generator = torch.Generator("cpu").manual_seed(0)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    posterior = pipe.vae.encode(images.to(pipe.device, pipe.vae.dtype)).latent_dist
    latents = posterior.mean.float().cpu() * pipe.vae.config.scaling_factor  # (N, C, h, w)
    colours = F.adaptive_avg_pool2d(images, latents.shape[-2:])  # (N, 3, h, w)
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    y = colours.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x, y).solution  # (C + 1, 3)
    return solution[:-1], solution[-1]


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile same-sized images left to right, top to bottom."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_animation(
    frames: list[Image.Image], path, fmt: str = "gif", frame_ms: int = 150, last_frame_ms: int = 1500
) -> None:
    """An animated GIF or WebP of the progression, holding on the final image."""
    durations = [frame_ms] * (len(frames) - 1) + [last_frame_ms]
    frames[0].save(path, format=fmt.upper(), save_all=True, append_images=frames[1:], duration=durations, loop=0)
