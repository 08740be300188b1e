"""Hires fix (AUTOMATIC1111): generate at the base size, upscale, then repaint details with img2img."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit.errors import InvalidRequest

UPSCALERS = ("latent", "pixel")
MAX_HIRES_SCALE = 4.0


@dataclass
class HiresFix:
    scale: float = 2.0
    strength: float = 0.5  # denoising strength of the second pass
    steps: int | None = None  # second-pass steps; None = the first pass's
    upscaler: str = "latent"  # "latent": bilinear on latents; "pixel": decode, Lanczos, encode

    def check(self, steps: int, width: int, height: int) -> None:
        from ldmkit.pipeline import check_size  # the pipeline imports this module

        if not isinstance(self.scale, (int, float)) or not 1.0 < self.scale <= MAX_HIRES_SCALE:
            raise InvalidRequest(f"hires scale must be above 1 and at most {MAX_HIRES_SCALE}, got {self.scale!r}")
        if not isinstance(self.strength, (int, float)) or not 0.0 < self.strength <= 1.0:
            raise InvalidRequest(f"hires strength must be in (0, 1], got {self.strength!r}")
        hires_steps = self.steps or steps
        if not isinstance(hires_steps, int) or hires_steps < 1 or int(hires_steps * self.strength) < 1:
            raise InvalidRequest(f"hires steps {hires_steps!r} at strength {self.strength} leave no denoising step")
        if self.upscaler not in UPSCALERS:
            raise InvalidRequest(f"unknown hires upscaler {self.upscaler!r}; use one of {', '.join(UPSCALERS)}")
        check_size(*self.target_size(width, height))

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The upscaled size, rounded down to multiples of 8."""
        return int(width * self.scale) // 8 * 8, int(height * self.scale) // 8 * 8

    def upscale(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h', w') latents of the target size."""
        f = pipe.vae_scale_factor
        width, height = self.target_size(latents.shape[-1] * f, latents.shape[-2] * f)
        if self.upscaler == "latent":
            return F.interpolate(latents, size=(height // f, width // f), mode="bilinear", align_corners=False)
        images = [image.resize((width, height), Image.Resampling.LANCZOS) for image in pipe.latents_to_images(latents)]
        pixels = torch.cat([pipe.image_to_tensor(image, width, height) for image in images])
        return pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor

    def infotext_params(self, base_steps: int) -> dict:
        return {
            "Hires upscale": self.scale,
            "Hires steps": self.steps if self.steps and self.steps != base_steps else None,
            "Hires upscaler": "Latent" if self.upscaler == "latent" else "Lanczos",
            "Denoising strength": self.strength,
        }
