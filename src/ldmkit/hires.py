"""Hires fix (AUTOMATIC1111): the upscaling between the base pass and the img2img pass at the larger size.

The settings are ldmkit.params.HiresFix; the second pass is the pipeline's img2img stage run again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit.params import HiresFix


def upscale(hires: HiresFix, pipe, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h', w') latents of the target size."""
    f = pipe.vae_scale_factor
    width, height = hires.target_size(latents.shape[-1] * f, latents.shape[-2] * f)
    if hires.upscaler == "latent":
        return F.interpolate(latents, size=(height // f, width // f), mode="bilinear", align_corners=False)
    images = [image.resize((width, height), Image.Resampling.LANCZOS) for image in pipe.latents_to_images(latents)]
    pixels = torch.cat([pipe.image_to_tensor(image, width, height) for image in images])
    return pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
