"""Hires fix (AUTOMATIC1111): the upscaling between the base pass and the img2img pass at the larger size.

The settings are ldmkit.params.HiresFix; the second pass is the pipeline's img2img stage run again.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit.params import HiresFix


def upscale(
    hires: HiresFix,
    latents: torch.Tensor,
    vae_scale_factor: int,
    to_images: Callable[[torch.Tensor], list[Image.Image]],
    to_latents: Callable[[list[Image.Image]], torch.Tensor],
    upscale_image: Callable[[Image.Image, str, tuple[int, int]], Image.Image],
) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h', w') latents of the target size: bilinear on the latents ("latent"), or decoded,
    upscaled (Lanczos for "pixel", else the named upscaler, as `upscale_image(image, name, size)` does it) and
    encoded again, through the conversions given: AUTOMATIC1111's non-latent upscalers."""
    f = vae_scale_factor
    width, height = hires.upscaled_size(latents.shape[-1] * f, latents.shape[-2] * f)
    if hires.upscaler == "latent":
        upscaled = F.interpolate(latents, size=(height // f, width // f), mode="bilinear", align_corners=False)
    else:
        name = "Lanczos" if hires.upscaler == "pixel" else hires.upscaler
        upscaled = to_latents([upscale_image(image, name, (width, height)) for image in to_images(latents)])
    return centre_crop(upscaled, hires.crop_to, f)


def centre_crop(latents: torch.Tensor, crop_to: tuple[int, int] | None, vae_scale_factor: int) -> torch.Tensor:
    """The latents of the middle crop_to (width, height) pixels, as A1111 cuts them: of an odd count of latent
    rows (columns) to drop, the extra one comes off the bottom (right)."""
    if crop_to is None:
        return latents
    drop_y = latents.shape[-2] - crop_to[1] // vae_scale_factor
    drop_x = latents.shape[-1] - crop_to[0] // vae_scale_factor
    top, left = drop_y // 2, drop_x // 2
    return latents[..., top : top + crop_to[1] // vae_scale_factor, left : left + crop_to[0] // vae_scale_factor]
