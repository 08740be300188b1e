"""Our workflow against diffusers' own pipelines on the same tiny random weights, seeds and sampler."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from ldmkit import Pipeline
from ldmkit.families import reference_pipeline
from ldmkit.samplers import SAMPLERS, get_sampler

PARITY_SAMPLERS = ["DDIM", "Euler", "DPM++ 2M Karras", "UniPC"]


def diffusers_images(pipeline_class, components, sampler_name, seeds, *args, **kwargs):
    """diffusers' own pipeline on the same components, one CPU generator per image seeded like ours."""
    scheduler = get_sampler(sampler_name).make_scheduler(components.scheduler_config)
    reference = reference_pipeline(components, scheduler, pipeline_class)
    reference.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return reference(*args, **kwargs, generator=generators, output_type="np").images


def ours_as_float(pipe, **kwargs):
    """Our images as floats in [0, 1] before 8-bit quantization (decoded one at a time), plus the 8-bit images."""
    captured = []
    decode = pipe.decode_latents

    def capture(latents):
        image = decode(latents)
        captured.append(image.permute(0, 2, 3, 1).numpy())
        return image

    pipe.decode_latents = capture
    result = pipe.generate(**kwargs)
    return np.concatenate(captured), np.stack([np.asarray(im) for im in result.images])


def assert_parity(ours_float, ours_uint8, theirs_float):
    assert ours_float.shape == theirs_float.shape
    assert np.abs(ours_float - theirs_float).max() < 1e-3
    theirs_uint8 = (theirs_float * 255).round().astype(np.uint8)
    assert np.abs(ours_uint8.astype(int) - theirs_uint8.astype(int)).max() <= 1


@pytest.mark.parametrize("sampler", PARITY_SAMPLERS)
@pytest.mark.parametrize("width,height", [(16, 16), (24, 16)])
def test_txt2img_matches_diffusers(tiny_components, sampler, width, height):
    seed, n = 1234, 2
    theirs = diffusers_images(
        StableDiffusionPipeline,
        tiny_components,
        sampler,
        [seed + i for i in range(n)],
        "an otter in a river",
        negative_prompt="blurry",
        num_inference_steps=6,
        guidance_scale=7.5,
        width=width,
        height=height,
        num_images_per_prompt=n,
    )
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(
        pipe,
        prompt="an otter in a river",
        negative_prompt="blurry",
        steps=6,
        guidance=7.5,
        sampler=sampler,
        seed=seed,
        width=width,
        height=height,
        num_images=n,
    )
    assert_parity(ours_float, ours_uint8, theirs)


@pytest.mark.parametrize("sampler", PARITY_SAMPLERS)
def test_img2img_matches_diffusers(tiny_components, sampler):
    seed, n, width, height = 77, 2, 24, 16
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    theirs = diffusers_images(
        StableDiffusionImg2ImgPipeline,
        tiny_components,
        sampler,
        [seed + i for i in range(n)],
        "a red apple",
        image=init,
        strength=0.6,
        num_inference_steps=10,
        guidance_scale=5.0,
        num_images_per_prompt=n,
    )
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(
        pipe,
        prompt="a red apple",
        init_image=init,
        strength=0.6,
        steps=10,
        guidance=5.0,
        sampler=sampler,
        seed=seed,
        num_images=n,
    )
    assert_parity(ours_float, ours_uint8, theirs)


def test_no_guidance_matches_diffusers(tiny_components):
    theirs = diffusers_images(
        StableDiffusionPipeline,
        tiny_components,
        "Euler",
        [5],
        "otter",
        num_inference_steps=4,
        guidance_scale=1.0,
    )
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(pipe, prompt="otter", steps=4, guidance=1.0, sampler="Euler", seed=5)
    assert_parity(ours_float, ours_uint8, theirs)


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_is_reproducible_and_seed_dependent(tiny_components, sampler):
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    run = lambda seed: np.stack(
        [np.asarray(im) for im in pipe.generate("otter", steps=4, sampler=sampler, seed=seed, num_images=2).images]
    )  # noqa: E731
    first, again, other = run(3), run(3), run(4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_image_i_is_independent_of_batch(tiny_components):
    """Image i uses seed + i, so asking for image 1 alone with seed + 1 gives the same picture."""
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    batch = pipe.generate("otter", steps=4, sampler="Euler a", seed=10, num_images=2)
    single = pipe.generate("otter", steps=4, sampler="Euler a", seed=11, num_images=1)
    assert batch.seeds == [10, 11]
    diff = np.abs(np.asarray(batch.images[1], dtype=int) - np.asarray(single.images[0], dtype=int)).max()
    assert diff <= 1


def test_parity_tolerance_detects_a_small_guidance_change(tiny_components):
    """The 1e-3 bound is tight enough to catch a wrong guidance scale on these tiny weights."""
    theirs = diffusers_images(
        StableDiffusionPipeline,
        tiny_components,
        "DDIM",
        [1],
        "otter",
        num_inference_steps=6,
        guidance_scale=6.5,
    )
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    ours_float, _ = ours_as_float(pipe, prompt="otter", steps=6, guidance=7.5, sampler="DDIM", seed=1)
    assert np.abs(ours_float - theirs).max() > 1e-3
