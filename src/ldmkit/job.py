"""One generation run that ends in files: progress bar, intermediate previews, PNGs with metadata."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from ldmkit.errors import LdmError, describe
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
    # Called with each file (or folder) as soon as it is complete on disk, so that whoever runs the job
    # can say truthfully what was written when it stops early (Ctrl-C, a full disk).
    on_saved: Callable[[Path], None] | None = None

    def run(self, first_index: int | None = None, **generate_kwargs) -> list[Path]:
        """Generate, then write each image (and its progression) under a fresh A1111-style name.

        Image i is named from index first_index + i when given (so processes that split a prompt
        list name files as one process would), else from the folder's next free index.
        """
        frames: list[tuple[int, list[Image.Image]]] = []  # (step number in the run, one preview per image)
        bar = None
        taken = 0  # steps of the whole run: the hires fix's second pass counts on from the first

        def on_step(step: StepInfo) -> None:
            nonlocal bar, taken
            taken += 1
            if self.progress:
                if bar is None:
                    bar = tqdm(total=step.total, unit="step", leave=False)
                elif step.step == 0:  # a further pass (the hires fix) starts
                    bar.total += step.total
                    bar.refresh()
                bar.update(1)
            if self.intermediates_every and (
                (step.step + 1) % self.intermediates_every == 0 or step.step + 1 == step.total
            ):
                frames.append((taken, preview_images(self.pipe, step, self.preview_mode)))

        try:
            result = self.pipe.generate(**generate_kwargs, callback=on_step)
        finally:
            if bar is not None:
                bar.close()
        paths = []
        for i, (image, seed, infotext) in enumerate(zip(result.images, result.seeds, result.infotexts)):
            start = None if first_index is None else first_index + i
            path = self._saved(
                save_png(image, self.output_dir, lambda index, s=seed: f"{index:05d}-{s}.png", infotext, start)
            )
            paths.append(path)
            if frames:
                paths.extend(self.save_progression([(n, previews[i]) for n, previews in frames], path))
        return paths

    def save_progression(self, numbered_frames: list[tuple[int, Image.Image]], image_path: Path) -> list[Path]:
        """Frames as step-NNN.png in a folder named after the image, plus a grid and an animation."""
        stem = image_path.stem
        steps_dir = self.output_dir / f"{stem}-steps"
        try:
            steps_dir.mkdir()  # the image's index is fresh, so this name is too
        except OSError as error:
            raise LdmError(f"cannot write to {self.output_dir}: {describe(error)}") from None
        self._saved(steps_dir)
        for number, frame in numbered_frames:
            save_new_file(lambda tmp, f=frame: f.save(tmp, format="PNG"), steps_dir / f"step-{number:03d}.png")
        # The hires fix's second pass is larger: show every frame at the final size.
        size = numbered_frames[-1][1].size
        frames = [frame if frame.size == size else frame.resize(size) for _, frame in numbered_frames]
        columns = math.ceil(len(frames) / math.ceil(len(frames) / 10))
        grid = self._saved(
            save_new_file(
                lambda tmp: make_grid(frames, columns=columns).save(tmp, format="PNG"),
                self.output_dir / f"{stem}-progress.png",
            )
        )
        suffix = self.animation_format
        animation = self._saved(
            save_new_file(
                lambda tmp: save_animation(frames, tmp, fmt=suffix), self.output_dir / f"{stem}-progress.{suffix}"
            )
        )
        return [steps_dir, grid, animation]

    def _saved(self, path: Path) -> Path:
        if self.on_saved is not None:
            self.on_saved(path)
        return path
