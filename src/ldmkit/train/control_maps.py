"""Control maps for training the shipped ControlNet, made from the training images by the inference preprocessors.

Each map is made the way a user's map is made at generation time, so the ControlNet trains on what it will see:
* "canny": `control_preprocess.detect(image, "canny", res, low, high)` fitted to the image size, with res drawn
  from 128/256/512 (pixel perfect up to the extension's default 512) and thresholds around the default 100/200;
* "scribble_xdog": the same with the `scribble_xdog` preprocessor (lines from a picture);
* "sketch": a hand-drawn sketch of the image: its silhouette and its strongest inner contours, simplified and
  jittered, drawn in black with a pen 4-12 px wide on a white 512 px pad (the web UI's sketch pad), then run
  through `invert` (the pad's preprocessor) and fitted to the image size.

A map is (H, W) uint8, white lines on black (edge maps are 0/255; a sketch's antialiased pen leaves grey
edges, as the pad's does); the ControlNet sees it as RGB in [0, 1].
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from ldmkit.control_preprocess import detect, fit_to_size, opencv

KINDS = ("canny", "scribble_xdog", "sketch")
PAD = 512  # the web UI's sketch pad size
PROCESSOR_RESOLUTIONS = (128, 256, 512)


def canny(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    low = float(rng.uniform(60, 140))
    return _preprocess(image, "canny", rng, low, min(255.0, 2 * low))


def scribble_xdog(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _preprocess(image, "scribble_xdog", rng, float(rng.uniform(20, 44)), None)


def _preprocess(image: np.ndarray, module: str, rng: np.random.Generator, a, b) -> np.ndarray:
    res = int(rng.choice(PROCESSOR_RESOLUTIONS))
    detected = detect(Image.fromarray(image), module, res, a, b)
    height, width = image.shape[:2]
    return fit_to_size(detected, width, height, "Crop and Resize")[..., 0]


def sketch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """What a person tracing the image on the sketch pad would send: outline and main inner lines, roughly."""
    cv2 = opencv()
    height, width = image.shape[:2]
    scale = PAD / max(height, width)
    foreground = (image.min(axis=2) < 235).astype(np.uint8)  # the emoji on its white background
    foreground = cv2.morphologyEx(foreground, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    outlines, _ = cv2.findContours(foreground, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    # inner lines: edges of a blurred copy at high thresholds (only strong colour boundaries), long ones only
    blurred = cv2.GaussianBlur(image, (0, 0), 1.5)
    edges = cv2.Canny(blurred, 150, 300)
    inner, _ = cv2.findContours(edges, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    inner = [c for c in inner if cv2.arcLength(c, False) > 0.15 * max(height, width) and rng.random() < 0.7]
    pad = np.full((round(height * scale), round(width * scale)), 255, np.uint8)
    pen = int(rng.integers(4, 13))
    for contour, closed in [(c, True) for c in outlines] + [(c, False) for c in inner]:
        if cv2.arcLength(contour, closed) < 0.05 * max(height, width):
            continue
        simplified = cv2.approxPolyDP(contour, float(rng.uniform(0.5, 2.0)), closed).astype(np.float64)
        wobble = rng.normal(0.0, 0.6, simplified.shape)  # a hand is not a tracer: each vertex off by ~1 px
        points = np.round((simplified + wobble) * scale).astype(np.int32)
        cv2.polylines(pad, [points], closed, 0, thickness=pen, lineType=cv2.LINE_AA)
    drawn = detect(Image.fromarray(pad).convert("RGB"), "invert")
    return fit_to_size(drawn, width, height, "Crop and Resize")[..., 0]


MAKERS = {"canny": canny, "scribble_xdog": scribble_xdog, "sketch": sketch}


def _maps_of_chunk(args: tuple[np.ndarray, int]) -> np.ndarray:
    images, seed = args
    opencv().setNumThreads(1)  # one process per core already
    rng = np.random.default_rng(seed)
    return np.stack([np.stack([MAKERS[kind](image, rng) for kind in KINDS]) for image in images])


def make_maps(images: np.ndarray, seed: int = 0, workers: int | None = None, chunk: int = 256) -> np.ndarray:
    """(N, H, W, 3) uint8 images -> (N, len(KINDS), H, W) uint8 maps, one of each kind per image.

    Deterministic for a seed whatever the worker count (each chunk of images has its own seed)."""
    jobs = [(np.ascontiguousarray(images[i : i + chunk]), seed * 1_000_003 + i) for i in range(0, len(images), chunk)]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            return np.concatenate(list(pool.map(_maps_of_chunk, jobs)))
    return np.concatenate([_maps_of_chunk(job) for job in jobs])
