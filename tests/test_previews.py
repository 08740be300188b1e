"""Intermediates: x0 at every step, fast and full previews, grids and animations."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit import Pipeline
from ldmkit.previews import make_grid, preview_images, save_animation


@pytest.fixture
def pipe(tiny_components):
    return Pipeline(tiny_components, torch.device("cpu"), torch.float32)


def test_callback_sees_every_step_and_final_x0_is_the_result(pipe):
    steps = []
    result = pipe.generate("otter", steps=5, sampler="DDIM", seed=0, width=24, height=16, callback=steps.append)
    assert [s.step for s in steps] == list(range(5)) and all(s.total == 5 for s in steps)
    assert steps[0].sigma > steps[-1].sigma > 0
    assert steps[-1].denoised.shape == (1, 4, 8, 12)
    # The last step's x0 prediction decodes to (nearly) the final image.
    final_preview = np.asarray(preview_images(pipe, steps[-1], "full")[0], dtype=int)
    assert np.abs(final_preview - np.asarray(result.images[0], dtype=int)).mean() < 8


def test_fast_preview_is_image_sized_and_tracks_colour(pipe):
    red = torch.zeros(1, 3, 16, 16)
    red[:, 0] = 1.0
    latents = pipe.vae.encode(red).latent_dist.mean * pipe.vae.config.scaling_factor
    blue = torch.zeros(1, 3, 16, 16)
    blue[:, 2] = 1.0
    latents_blue = pipe.vae.encode(blue).latent_dist.mean * pipe.vae.config.scaling_factor
    rgb_red, rgb_blue = pipe.fast_preview(latents), pipe.fast_preview(latents_blue)
    assert rgb_red.shape == (1, 3, 16, 16)
    assert rgb_red[:, 0].mean() - rgb_red[:, 2].mean() > rgb_blue[:, 0].mean() - rgb_blue[:, 2].mean()


def test_grid_and_animation(tmp_path):
    frames = [Image.new("RGB", (8, 6), c) for c in ("red", "green", "blue")]
    grid = make_grid(frames, columns=2)
    assert grid.size == (16, 12) and grid.getpixel((9, 1)) == (0, 128, 0)
    for fmt in ("gif", "webp"):
        save_animation(frames, tmp_path / f"a.{fmt}", fmt=fmt)
        with Image.open(tmp_path / f"a.{fmt}") as anim:
            assert anim.n_frames == 3
