"""The shipped default model: within its size limits, loads offline, generates deterministically, follows prompts."""

import json

import numpy as np
import pytest
from safetensors import safe_open

from ldmkit import Pipeline
from ldmkit.loading import DEFAULT_MODEL_DIR

STEPS = 12  # enough for a recognizable emoji; keeps the test a few seconds on a CPU


def test_folder_layout_and_size_limits():
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 60_000_000
    assert max(p.stat().st_size for p in files) <= 15_000_000
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "LICENSES.md"):
        assert (DEFAULT_MODEL_DIR / part).exists(), part
    for weights in DEFAULT_MODEL_DIR.rglob("*.safetensors"):
        with safe_open(str(weights), "np") as f:
            assert all(str(f.get_slice(k).get_dtype()) == "F16" for k in f.keys()), weights  # noqa: SIM118 (not iterable)
    vae_config = json.loads((DEFAULT_MODEL_DIR / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured from the data, not SD's


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained()


def generate(pipe, prompt, seed):
    result = pipe.generate(
        prompt, steps=STEPS, guidance=7.5, sampler="DPM++ 2M Karras", seed=seed, width=128, height=128
    )
    return np.asarray(result.images[0], dtype=np.float32)


def test_same_seed_same_image(pipe):
    first = generate(pipe, "red apple", seed=0)
    assert first.shape == (128, 128, 3)
    np.testing.assert_array_equal(first, generate(pipe, "red apple", seed=0))


def test_prompts_give_different_emoji(pipe):
    apple, frog = generate(pipe, "red apple", seed=0), generate(pipe, "frog", seed=0)
    assert np.abs(apple - frog).mean() > 20  # different objects, not noise-level differences

    def mean_color(image):
        foreground = image[(image < 230).any(axis=-1)]  # the emoji, not the white background
        return foreground.mean(axis=0)

    r, g, b = mean_color(apple)
    assert r > g + 40 and r > b + 40  # a red apple is red
    r, g, b = mean_color(frog)
    assert g > r and g > b  # a frog is green
