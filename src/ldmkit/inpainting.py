"""Inpainting inputs: the mask (white = repaint) at pixel and latent size, and known-region blending."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter


@dataclass
class Inpainting:
    start_latents: torch.Tensor  # (B, C, h, w) where the sampler starts
    noise: torch.Tensor  # (B, C, h, w) the start noise, reused to re-noise the known region
    image_latents: torch.Tensor | None  # (B, C, h, w) the init image's latents (regular models)
    mask: torch.Tensor  # (B, 1, h, w) 1 = repaint
    masked_latents: torch.Tensor | None  # (B, C, h, w) the masked image's latents (9-channel models)

    def keep_known_region(self, latents, scheduler, timesteps, i) -> torch.Tensor:
        """Regular models: put the original, noised to the next step's level, back outside the mask."""
        known = self.image_latents
        if i < len(timesteps) - 1:
            known = scheduler.add_noise(known, self.noise, timesteps[i + 1 : i + 2])
        return (1 - self.mask) * known + self.mask * latents


def prepare_mask(mask_image: Image.Image, width: int, height: int, blur: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, H, W) soft mask (Gaussian-blurred, AUTOMATIC1111's mask blur) and its 0/1 version.

    The binary one is what inpainting UNets were trained on (diffusers thresholds at 0.5 too).
    """
    mask = mask_image.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    soft = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    return soft, (soft >= 0.5).float()
