"""Inpainting: the mask (white = repaint) at pixel size, and regular models' known region as a per-step hook."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from ldmkit.denoise import Schedule
from ldmkit.images import mask_to_tensor


@dataclass
class KnownRegion:
    """Regular (4-channel) models inpaint by getting the original back outside the mask at every step."""

    image_latents: torch.Tensor  # (B, C, h, w) the init image's latents
    noise: torch.Tensor  # (B, C, h, w) the start noise, reused to re-noise the known region
    mask: torch.Tensor  # (B, 1, h, w) 1 = repaint
    schedule: Schedule
    handover: torch.Tensor | None = None  # the timestep a refiner goes on from after the schedule's last step

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor:
        """The original, noised to the next step's level (a refiner's first, at a hand-over), outside the mask."""
        known = self.image_latents
        timesteps = self.schedule.timesteps[step + 1 : step + 2] if step < len(self.schedule) - 1 else self.handover
        if timesteps is not None:
            known = self.schedule.scheduler.add_noise(known, self.noise, timesteps)
        return (1 - self.mask) * known + self.mask * latents

    def clean(self, x0: torch.Tensor) -> torch.Tensor:
        """What the finished latents will hold: the original itself outside the mask."""
        return (1 - self.mask) * self.image_latents + self.mask * x0


def prepare_mask(mask_image: Image.Image, width: int, height: int, blur: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, H, W) soft mask (Gaussian-blurred, AUTOMATIC1111's mask blur) and its 0/1 version.

    The binary one is what inpainting UNets were trained on (diffusers thresholds at 0.5 too).
    """
    soft = mask_to_tensor(mask_image, width, height, blur)
    return soft, (soft >= 0.5).float()


# A1111's inpainting_fill values as GenerationParams.masked_content names them, and its infotext's words for them
MASKED_CONTENT_INFOTEXT = {"fill": "fill", "latent_noise": "latent noise", "latent_nothing": "latent nothing"}


def latent_start(image_latents: torch.Tensor, noise: torch.Tensor, hole: torch.Tensor, content: str) -> torch.Tensor:
    """The clean latents img2img noises to its first step: the init image's, except in the (B, 1, h, w) 0/1 `hole`
    with 'latent_noise' (the image's own start noise there, the tensor A1111 draws from the same seed) or
    'latent_nothing' (zeros there)."""
    if content == "latent_noise":
        return image_latents * (1 - hole) + noise * hole
    if content == "latent_nothing":
        return image_latents * (1 - hole)
    return image_latents


def inpainting_infotext(content: str, only_masked: bool, padding: int) -> dict:
    """A1111's names: "Masked content" unless 'original'; "Inpaint area" and "Masked area padding" for 'only masked'."""
    params = {"Masked content": MASKED_CONTENT_INFOTEXT.get(content)}
    if only_masked:
        params |= {"Inpaint area": "Only masked", "Masked area padding": padding}
    return params
