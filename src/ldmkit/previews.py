"""Intermediate images: decode each step's predicted clean latents, lay them out as a grid or animation."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit.denoise import StepInfo
from ldmkit.images import tensor_to_pil

PREVIEW_MODES = ("full", "fast")

# AUTOMATIC1111/ComfyUI's linear map from SD's 4 (scaled) latent channels to RGB in [-1, 1].
SD_LATENT_RGB = torch.tensor(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
)
SD_VAE_BLOCKS = [128, 256, 512, 512]

_fitted_projections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def preview_images(pipe, step: StepInfo, mode: str = "full") -> list[Image.Image]:
    """The step's predicted clean images: 'full' decodes with the pipeline's VAE, 'fast' projects latents to RGB.

    `pipe` is used through its public methods latents_to_images and fast_preview only.
    """
    if mode == "full":
        return pipe.latents_to_images(step.denoised)
    if mode == "fast":
        return tensor_to_pil(pipe.fast_preview(step.denoised))
    raise ValueError(f"unknown preview mode {mode!r}; use one of {PREVIEW_MODES}")


def fast_preview(latents: torch.Tensor, projection: tuple[torch.Tensor, torch.Tensor], scale: int) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, H, W) in [0, 1] through a linear map, upsampled `scale` times."""
    weight, bias = projection
    rgb = (
        torch.einsum("bchw,cr->brhw", latents.float(), weight.to(latents.device))
        + bias.to(latents.device)[:, None, None]
    )
    rgb = F.interpolate(rgb, scale_factor=scale, mode="bilinear", align_corners=False)
    return ((rgb + 1) / 2).clamp(0, 1)


def latent_rgb_projection(vae, to_latents: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 3) weight and (3,) bias: SD's known factors for SD's VAE, else a fit to this VAE (cached).

    `to_latents` turns the VAE's samples into the UNet's latents (the model family's scaling).
    """
    if vae.config.latent_channels == 4 and list(vae.config.block_out_channels) == SD_VAE_BLOCKS:
        return SD_LATENT_RGB, torch.zeros(3)
    if vae not in _fitted_projections:
        _fitted_projections[vae] = fit_latent_rgb(vae, to_latents)
    return _fitted_projections[vae]


@torch.inference_mode()
def fit_latent_rgb(vae, to_latents: Callable, count: int = 16, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares map from latents to the colours they encode, over smooth random colour fields."""
    generator = torch.Generator("cpu").manual_seed(0)
    coarse = torch.rand(count, 3, 4, 4, generator=generator) * 2 - 1
    images = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    latents = to_latents(posterior.mean).float().cpu()  # (N, C, h, w)
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
