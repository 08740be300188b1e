"""ControlNet generation against diffusers' ControlNet pipelines on the same tiny random weights, seeds and sampler."""

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionControlNetImg2ImgPipeline,
    StableDiffusionControlNetInpaintPipeline,
    StableDiffusionControlNetPipeline,
)
from PIL import Image
from support.controlnet import control_image, make_tiny_controlnet
from support.tiny import make_tiny_components
from test_parity import assert_parity, ours_as_float, reference_scheduler

from ldmkit import Pipeline
from ldmkit.control_units import ControlUnit

WIDTH, HEIGHT = 24, 16
PROMPT, NEGATIVE = "an otter in a river", "blurry"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny components and two tiny ControlNets saved as diffusers folders (ours load them from disk)."""
    folder = tmp_path_factory.mktemp("controlnets")
    controlnets = [make_tiny_controlnet(seed) for seed in (1, 2)]
    for i, controlnet in enumerate(controlnets):
        controlnet.save_pretrained(folder / f"cn{i}")
    return make_tiny_components(), controlnets, folder


def theirs(pipeline_class, components, controlnets, sampler, seeds, **kwargs):
    scheduler = reference_scheduler(components, sampler, seeds)  # the independent table, not ldmkit's registry
    pipe = pipeline_class(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        controlnet=controlnets if len(controlnets) > 1 else controlnets[0],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return pipe(**kwargs, generator=generators, output_type="np").images


def units(folder, weights, starts, ends, images, **common):
    return [
        ControlUnit(model=str(folder / f"cn{i}"), image=image, weight=w, guidance_start=s, guidance_end=e, **common)
        for i, (w, s, e, image) in enumerate(zip(weights, starts, ends, images))
    ]


TXT2IMG_CASES = {
    # name: (sampler, number of ControlNets, weights, starts, ends, guidance)
    "ddim": ("DDIM", 1, [1.0], [0.0], [1.0], 7.5),
    "euler-weight": ("Euler", 1, [0.6], [0.0], [1.0], 7.5),
    "dpmpp-2m-karras-window": ("DPM++ 2M Karras", 1, [1.0], [0.2], [0.7], 7.5),
    "unipc": ("UniPC", 1, [1.3], [0.0], [0.5], 7.5),
    "heun-second-order": ("Heun", 1, [1.0], [0.1], [0.8], 7.5),
    "euler-a": ("Euler a", 1, [0.9], [0.0], [1.0], 7.5),
    "two-controlnets": ("DDIM", 2, [0.8, 0.5], [0.0, 0.3], [0.6, 1.0], 7.5),
    "two-controlnets-dpmpp": ("DPM++ 2M Karras", 2, [1.0, 1.2], [0.0, 0.0], [1.0, 0.4], 7.5),
    "no-cfg": ("Euler", 1, [1.0], [0.0], [1.0], 1.0),
    "no-cfg-two": ("UniPC", 2, [0.7, 0.9], [0.0, 0.25], [0.75, 1.0], 1.0),
}


@pytest.mark.parametrize("case", list(TXT2IMG_CASES))
def test_txt2img_matches_diffusers_controlnet_pipeline(setup, case):
    components, controlnets, folder = setup
    sampler, count, weights, starts, ends, guidance = TXT2IMG_CASES[case]
    images = [control_image(i) for i in range(count)]
    seed, n, steps = 1234, 2, 8
    expected = theirs(
        StableDiffusionControlNetPipeline,
        components,
        controlnets[:count],
        sampler,
        [seed + i for i in range(n)],
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=images if count > 1 else images[0],
        num_inference_steps=steps,
        guidance_scale=guidance,
        width=WIDTH,
        height=HEIGHT,
        num_images_per_prompt=n,
        controlnet_conditioning_scale=weights if count > 1 else weights[0],
        control_guidance_start=starts if count > 1 else starts[0],
        control_guidance_end=ends if count > 1 else ends[0],
    )
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(
        pipe,
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        seed=seed,
        width=WIDTH,
        height=HEIGHT,
        num_images=n,
        controls=units(folder, weights, starts, ends, images),
    )
    assert_parity(ours_float, ours_uint8, expected)
    print(f"{case}: max abs diff {np.abs(ours_float - expected).max():.2e}")


def test_the_controlnet_changes_the_image(setup):
    """The parity bound could not be met by ignoring the ControlNet: with it the images differ well beyond it."""
    components, _, folder = setup
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    common = {"prompt": PROMPT, "steps": 6, "sampler": "DDIM", "seed": 5, "width": WIDTH, "height": HEIGHT}
    plain, _ = ours_as_float(pipe, **common)
    guided, _ = ours_as_float(pipe, **common, controls=units(folder, [1.0], [0.0], [1.0], [control_image()]))
    assert np.abs(plain - guided).max() > 1e-2


@pytest.mark.parametrize(("sampler", "strength", "start", "end"), [("DDIM", 0.6, 0.0, 1.0), ("Euler", 0.8, 0.2, 0.9)])
def test_img2img_matches_diffusers(setup, sampler, strength, start, end):
    components, controlnets, folder = setup
    init, control = control_image(7), control_image(0)
    expected = theirs(
        StableDiffusionControlNetImg2ImgPipeline,
        components,
        controlnets[:1],
        sampler,
        [77],
        prompt=PROMPT,
        image=init,
        control_image=control,
        strength=strength,
        num_inference_steps=10,
        guidance_scale=5.0,
        controlnet_conditioning_scale=1.0,  # the img2img pipeline's default is 0.8
        control_guidance_start=start,
        control_guidance_end=end,
    )
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(
        pipe,
        prompt=PROMPT,
        init_image=init,
        strength=strength,
        steps=10,
        guidance=5.0,
        sampler=sampler,
        seed=77,
        controls=units(folder, [1.0], [start], [end], [control]),
    )
    assert_parity(ours_float, ours_uint8, expected)
    print(f"img2img {sampler}: max abs diff {np.abs(ours_float - expected).max():.2e}")


@pytest.mark.parametrize(("sampler", "strength"), [("DDIM", 1.0), ("UniPC", 0.8)])
def test_inpainting_matches_diffusers(setup, sampler, strength):
    components, controlnets, folder = setup
    init, control = control_image(7), control_image(0)
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[4:12, 8:20] = 255
    mask = Image.fromarray(mask)
    expected = theirs(
        StableDiffusionControlNetInpaintPipeline,
        components,
        controlnets[:1],
        sampler,
        [3],
        prompt=PROMPT,
        image=init,
        mask_image=mask,
        control_image=control,
        controlnet_conditioning_scale=1.0,  # the inpainting pipeline's default is 0.5
        strength=strength,
        num_inference_steps=8,
        guidance_scale=6.0,
        width=WIDTH,
        height=HEIGHT,
    )
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(
        pipe,
        prompt=PROMPT,
        init_image=init,
        mask_image=mask,
        mask_blur=0,
        strength=strength,
        steps=8,
        guidance=6.0,
        sampler=sampler,
        seed=3,
        controls=units(folder, [1.0], [0.0], [1.0], [control]),
    )
    assert_parity(ours_float, ours_uint8, expected)
    print(f"inpainting {sampler}: max abs diff {np.abs(ours_float - expected).max():.2e}")
