"""Batched text-to-image sampling for evaluation: many prompts per UNet call, DPM++ 2M Karras, CFG, via the Pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ldmkit.pipeline import Pipeline

if TYPE_CHECKING:
    import PIL.Image

EVAL_SAMPLER = "DPM++ 2M Karras"


def load_model(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Pipeline:
    """The model to evaluate, in fp32 by default (the figures in docs/training.md were measured so)."""
    return Pipeline.from_pretrained(Path(folder), device=device, dtype=dtype)


def generate(
    pipe: Pipeline,
    prompts: list[str],
    seeds: list[int],
    steps: int = 25,
    guidance: float | None = None,
    batch_size: int = 64,
    height: int | None = None,
    width: int | None = None,
) -> torch.Tensor:
    """One image per (prompt, seed) pair -> (N, 3, H, W) uint8 on the CPU; `batch_size` prompts per UNet batch.

    The size defaults to the model's native one, the guidance (None) to the model's own."""
    images = []
    for start in range(0, len(prompts), batch_size):
        batch = pipe.generate(
            prompts[start : start + batch_size],
            seed=seeds[start : start + batch_size],
            steps=steps,
            guidance=guidance,
            sampler=EVAL_SAMPLER,
            width=width,
            height=height,
        ).images
        images.append(torch.from_numpy(np.stack([np.asarray(image) for image in batch])).permute(0, 3, 1, 2))
    return torch.cat(images)


def grid(images: torch.Tensor, columns: int) -> PIL.Image.Image:
    """(N, 3, H, W) uint8 -> one PIL image, row-major, `columns` wide."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = (n + columns - 1) // columns
    canvas = torch.full((3, rows * h, columns * w), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = images[i]
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


GRID_PROMPTS = (
    "otter",
    "red apple",
    "smiling face with sunglasses",
    "rocket",
    "pizza",
    "otter, 3d render",
    "red apple, flat icon",
    "cat face, flat illustration",
    "ghost, cartoon emoji",
)


SCENE_GRID_PROMPTS = (
    "an otter wearing sunglasses relaxing on a floating tube in a swimming pool, on a sunny day",
    "a cute blue-green space rover with cute eyes, lost on a strange planet, cool earth tones",
    "a cat on the left and a rocket on the right",
    "a blue banana",
    "three red apples",
    "a dog wearing a crown",
    "a frog wearing a top hat, 3d render",
    "a penguin in the snow",
)


def sample_grid(
    model: Pipeline,
    prompts=GRID_PROMPTS,
    seeds=(0, 1, 2, 3, 4, 5),
    steps: int = 25,
    guidance: float = 7.5,  # not the model's own: docs/training.md's grids are compared at 7.5
    height: int | None = None,
    width: int | None = None,
) -> PIL.Image.Image:
    """One row per prompt, one column per seed."""
    pairs = [(p, s) for p in prompts for s in seeds]
    prompts_, seeds_ = [p for p, _ in pairs], [s for _, s in pairs]
    images = generate(model, prompts_, seeds_, steps=steps, guidance=guidance, height=height, width=width)
    return grid(images, columns=len(seeds))
