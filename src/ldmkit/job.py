"""One generation run that ends in files: progress bar, intermediate previews, PNGs with metadata."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ldmkit.metadata import save_new_file, save_png
from ldmkit.pipeline import Pipeline, StepInfo
from ldmkit.previews import make_grid, preview_images, save_animation


@dataclass
class GenerateJob:
    pipe: Pipeline
    output_dir: Path
    intermediates_every: int | None = None  # None: no intermediates; K: every K steps (and the last)
    preview_mode: str = "full"
    animation_format: str = "gif"
    progress: bool = True

    def run(self, first_index: int | None = None, **generate_kwargs) -> list[Path]:
        """Generate, then write each image (and its progression) under a fresh A1111-style name.

        Image i is named from index first_index + i when given (so processes that split a prompt
        list name files as one process would), else from the folder's next free index.
        """
        frames: list[tuple[int, list[Image.Image]]] = []  # (step number, one preview per image)
        bar = None

        def on_step(step: StepInfo) -> None:
            nonlocal bar
            if self.progress:
                bar = bar or tqdm(total=step.total, unit="step", leave=False)
                bar.update(1)
            if self.intermediates_every and (
                (step.step + 1) % self.intermediates_every == 0 or step.step + 1 == step.total
            ):
                frames.append((step.step + 1, preview_images(self.pipe, step, self.preview_mode)))

        try:
            result = self.pipe.generate(**generate_kwargs, callback=on_step)
        finally:
            if bar is not None:
                bar.close()
        paths = []
        for i, (image, seed, infotext) in enumerate(zip(result.images, result.seeds, result.infotexts)):
            start = None if first_index is None else first_index + i
            path = save_png(image, self.output_dir, lambda index, s=seed: f"{index:05d}-{s}.png", infotext, start)
            paths.append(path)
            if frames:
                paths.extend(self.save_progression([(n, previews[i]) for n, previews in frames], path))
        return paths

    def save_progression(self, numbered_frames: list[tuple[int, Image.Image]], image_path: Path) -> list[Path]:
        """Frames as step-NNN.png in a folder named after the image, plus a grid and an animation."""
        stem = image_path.stem
        steps_dir = self.output_dir / f"{stem}-steps"
        steps_dir.mkdir()  # the image's index is fresh, so this name is too
        for number, frame in numbered_frames:
            save_png(frame, steps_dir, lambda index, n=number: f"step-{n:03d}.png")
        frames = [frame for _, frame in numbered_frames]
        grid = save_png(
            make_grid(frames, columns=math.ceil(len(frames) / math.ceil(len(frames) / 10))), self.output_dir, lambda index: f"{stem}-progress.png"
        )
        suffix = self.animation_format
        animation = save_new_file(
            lambda tmp: save_animation(frames, tmp, fmt=suffix),
            self.output_dir,
            lambda index: f"{stem}-progress.{suffix}",
        )
        return [steps_dir, grid, animation]
