"""img2img's resize modes (AUTOMATIC1111's resize_mode): how an init image of another shape meets the size.

"resize" (0) stretches it; "crop" (1) scales it to cover the size and cuts the middle; "fill" (2) scales it to fit
inside and fills the gaps by stretching its edge rows or columns outwards; "latent" (3) encodes it at its own size
and resizes the latents (bilinear), which the pipeline does (Pipeline.init_latents).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.LANCZOS  # A1111's resize without an upscaler model


def fit(image: Image.Image, width: int, height: int, mode: str) -> Image.Image:
    """`image` at exactly width x height by the resize mode "resize", "crop" or "fill"."""
    if mode == "resize" or image.size == (width, height):
        return image.resize((width, height), RESAMPLE)
    cover = mode == "crop"
    scale = (max if cover else min)(width / image.width, height / image.height)
    # The side that meets the size is exact; the other keeps the aspect ratio (rounded down, at least 1 px).
    scaled_w = width if width / image.width == scale else max(1, image.width * height // image.height)
    scaled_h = height if height / image.height == scale else max(1, image.height * width // image.width)
    scaled = image.resize((scaled_w, scaled_h), RESAMPLE)
    left, top = (width - scaled_w) // 2, (height - scaled_h) // 2
    if cover:
        return scaled.crop((-left, -top, -left + width, -top + height))
    return _stretch_edges(scaled, width, height, left, top)


def _stretch_edges(scaled: Image.Image, width: int, height: int, left: int, top: int) -> Image.Image:
    """`scaled` placed at (left, top) of width x height, each gap taking the nearest edge row or column."""
    pixels = np.asarray(scaled)
    rows = np.clip(np.arange(height) - top, 0, scaled.height - 1)
    cols = np.clip(np.arange(width) - left, 0, scaled.width - 1)
    return Image.fromarray(np.ascontiguousarray(pixels[rows][:, cols]), mode=scaled.mode)
