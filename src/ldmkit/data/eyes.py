"""Where an animal emoji's eyes are, found from its pixels, so scenes can put sunglasses on them.

Faces are drawn frontally and centred, so glasses go at a fixed height of the face. Animal bodies are not: the
otter's head is at its top left, tilted. Emoji draw eyes as small dark blobs with lighter pixels around them, so a
pair of such blobs, about level and apart by a plausible distance in the upper part of the sprite, is taken as the
eyes; a sprite without such a pair (a side view with one eye, a black penguin) gets None and no glasses.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

SIDE = 128  # measured at this resolution (sprites are downsampled by an integer factor first)
DARK = 0.22  # luminance below which an opaque pixel may be part of an eye
MAX_TILT = 1.0  # dy / dx of the pair: up to 45 degrees (the otters' heads are tilted)


def find_eyes(rgba: np.ndarray) -> tuple[float, float, float] | None:
    """(x, y, span) of the eyes' midpoint and distance, in units of the sprite's side; None when no pair is found.

    rgba: (S, S, 4) uint8, straight alpha, S a multiple of 128 or at most 128."""
    image = np.asarray(rgba, np.float32) / 255.0
    factor = image.shape[0] // SIDE
    if factor > 1:
        image = image.reshape(SIDE, factor, SIDE, factor, 4).mean(axis=(1, 3))
    n = image.shape[0]
    opaque = image[..., 3] > 0.5
    if not opaque.any():
        return None
    luminance = image[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
    dark = opaque & (luminance < DARK)
    rows = np.flatnonzero(opaque.any(1))
    lowest_eye = rows[0] + 0.7 * (rows[-1] + 1 - rows[0])
    labels, _ = ndimage.label(dark, structure=np.ones((3, 3)))
    blobs = []  # (x, y, area)
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        blob = labels[box] == label
        area = int(blob.sum())
        height, width = blob.shape
        if not 3 <= area <= 0.012 * n * n or max(height, width) > 2.2 * min(height, width) + 1:
            continue  # a speck, a dark body part, or an outline stroke
        y, x = ndimage.center_of_mass(blob)
        y, x = y + box[0].start, x + box[1].start
        if y > lowest_eye:
            continue
        ring = np.zeros_like(dark)
        ring[max(box[0].start - 2, 0) : box[0].stop + 2, max(box[1].start - 2, 0) : box[1].stop + 2] = True
        ring[box] = False
        if not ring.any() or dark[ring].mean() > 0.25 or (~opaque[ring]).mean() > 0.3:
            continue  # not surrounded by the face: part of a larger dark shape, or on the silhouette's edge
        blobs.append((x, y, area))
    best = None
    for i, (xa, ya, area_a) in enumerate(blobs):
        for xb, yb, area_b in blobs[i + 1 :]:
            dx, dy = abs(xa - xb), abs(ya - yb)
            if not 0.05 * n <= dx <= 0.45 * n or dy > MAX_TILT * dx or max(area_a, area_b) > 2.5 * min(area_a, area_b):
                continue
            score = dy / dx + 0.3 * (ya + yb) / (2 * n)  # the most level pair, then the highest (eyes over a nose)
            if best is None or score < best[0]:
                best = (score, (xa + xb) / 2 / n, (ya + yb) / 2 / n, float(np.hypot(dx, dy)) / n)
    return None if best is None else (float(best[1]), float(best[2]), best[3])
