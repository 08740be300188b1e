"""Image <-> tensor conversions: diffusers' VaeImageProcessor, so ours are the conversions of diffusers' pipelines."""

from __future__ import annotations

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

# Sizes reach here checked (multiples of 8), so the processors need not round them (vae_scale_factor=1).
_IMAGES = VaeImageProcessor(vae_scale_factor=1)  # Lanczos resize, [0, 255] -> [-1, 1]
_MASKS = VaeImageProcessor(vae_scale_factor=1, do_normalize=False, do_convert_grayscale=True)  # -> [0, 1]


def pil_to_tensor(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """PIL -> (1, 3, H, W) in [-1, 1] on the CPU, resized to width x height."""
    # To RGB first: the processor resizes before it converts, and resizing RGBA premultiplies by alpha.
    return _IMAGES.preprocess(image.convert("RGB"), height=height, width=width)


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> 8-bit RGB PIL images."""
    return VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))


def mask_to_tensor(mask: Image.Image, width: int, height: int, blur: int = 0) -> torch.Tensor:
    """A mask (white = 1) -> (1, 1, H, W) in [0, 1] on the CPU, resized to width x height, then Gaussian-blurred by
    `blur` pixels (AUTOMATIC1111 blurs at the generation size; diffusers' examples blur before resizing)."""
    mask = _MASKS.resize(mask.convert("L"), height, width)
    if blur > 0:
        mask = _MASKS.blur(mask, blur)
    return _MASKS.preprocess(mask, height=height, width=width)
