"""A1111's inpainting_fill 0 ('fill'): before inpainting, the masked part of the init image takes the colours of
the unmasked part around it, so the repainted area starts from its surroundings instead of what was there."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

SMOOTHING = 2  # px: a blur of the filled part only, so the coarse levels' blocks do not show


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`image` (RGB) with its masked part (mask > 127) filled from the unmasked pixels around it."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    known = np.asarray(mask.convert("L")) <= 127
    if known.all() or not known.any():
        return image.convert("RGB")  # nothing to fill, or nothing to fill it from
    filled = Image.fromarray(np.round(_pull_push(rgb, known)).astype(np.uint8))
    smoothed = np.asarray(filled.filter(ImageFilter.GaussianBlur(SMOOTHING)))
    return Image.fromarray(np.where(known[..., None], rgb.astype(np.uint8), smoothed))


def _pull_push(colour: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Pull-push hole filling: average the known pixels into a half-size level (recursively, until every pixel
    of a level is known), then give each unknown pixel its coarser level's colour."""
    if known.all():
        return colour
    height, width = known.shape
    pad = ((0, height % 2), (0, width % 2))
    weight = np.pad(known.astype(np.float32), pad)
    premultiplied = np.pad(colour * known[..., None], (*pad, (0, 0)))
    h2, w2 = weight.shape[0] // 2, weight.shape[1] // 2
    weight_sum = weight.reshape(h2, 2, w2, 2).sum(axis=(1, 3))
    colour_sum = premultiplied.reshape(h2, 2, w2, 2, 3).sum(axis=(1, 3))
    coarse = _pull_push(colour_sum / np.maximum(weight_sum, 1e-6)[..., None], weight_sum > 0)
    up = coarse.repeat(2, axis=0).repeat(2, axis=1)[:height, :width]
    return np.where(known[..., None], colour, up)
