"""SDXL ControlNets: generation against diffusers' SDXL ControlNet pipelines on the same tiny random weights, seeds
and samplers (the ControlNet takes the UNet's added conditioning: pooled text and size ids), and the family check."""

import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetInpaintPipeline,
    StableDiffusionXLControlNetPipeline,
)
from PIL import Image
from support.controlnet import control_image, make_tiny_controlnet, make_tiny_sdxl_controlnet
from support.sdxl import make_tiny_sdxl_components
from test_parity import assert_parity, ours_as_float, reference_scheduler

from ldmkit import Pipeline
from ldmkit.control_units import ControlUnit
from ldmkit.errors import InvalidRequest

WIDTH, HEIGHT = 24, 16
PROMPT, NEGATIVE = "an otter in a river", "blurry"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny SDXL components and two tiny SDXL ControlNets saved as diffusers folders (ours load them from disk)."""
    folder = tmp_path_factory.mktemp("controlnets")
    components = make_tiny_sdxl_components(seed=0)
    controlnets = [make_tiny_sdxl_controlnet(components.unet, seed) for seed in (1, 2)]
    for i, controlnet in enumerate(controlnets):
        controlnet.save_pretrained(folder / f"cn{i}")
    return components, controlnets, folder


def theirs(pipeline_class, components, controlnets, sampler, seeds, **kwargs):
    c = components
    flags = {"force_zeros_for_empty_prompt": True}
    if pipeline_class is not StableDiffusionXLControlNetPipeline:
        flags["requires_aesthetics_score"] = False
    pipe = pipeline_class(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2, unet=c.unet, controlnet=controlnets if len(controlnets) > 1 else controlnets[0],
        scheduler=reference_scheduler(c, sampler, seeds), add_watermarker=False, **flags,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    return pipe(**kwargs, generator=generators, output_type="np").images


def units(folder, weights, starts, ends, images, **common):
    return [
        ControlUnit(model=str(folder / f"cn{i}"), image=image, weight=w, guidance_start=s, guidance_end=e, **common)
        for i, (w, s, e, image) in enumerate(zip(weights, starts, ends, images))
    ]


def one_or_list(values):
    return values if len(values) > 1 else values[0]


TXT2IMG_CASES = {
    # name: (sampler, number of ControlNets, weights, starts, ends, guidance)
    "ddim": ("DDIM", 1, [1.0], [0.0], [1.0], 7.5),
    "euler-weight": ("Euler", 1, [0.6], [0.0], [1.0], 7.5),
    "dpmpp-2m-karras-window": ("DPM++ 2M Karras", 1, [1.0], [0.2], [0.7], 7.5),
    "unipc": ("UniPC", 1, [1.3], [0.0], [0.5], 7.5),
    "two-controlnets": ("DDIM", 2, [0.8, 0.5], [0.0, 0.3], [0.6, 1.0], 7.5),
    "two-controlnets-euler": ("Euler", 2, [1.0, 1.2], [0.0, 0.0], [1.0, 0.4], 7.5),
    "no-cfg": ("Euler", 1, [1.0], [0.0], [1.0], 1.0),
    "no-cfg-two": ("UniPC", 2, [0.7, 0.9], [0.0, 0.25], [0.75, 1.0], 1.0),
}


@pytest.mark.parametrize("case", list(TXT2IMG_CASES))
def test_txt2img_matches_diffusers_sdxl_controlnet_pipeline(setup, case):
    components, controlnets, folder = setup
    sampler, count, weights, starts, ends, guidance = TXT2IMG_CASES[case]
    images = [control_image(i) for i in range(count)]
    seed, n, steps = 1234, 2, 8
    expected = theirs(
        StableDiffusionXLControlNetPipeline, components, controlnets[:count], sampler, [seed + i for i in range(n)],
        prompt=PROMPT, negative_prompt=NEGATIVE, image=one_or_list(images), num_inference_steps=steps,
        guidance_scale=guidance, width=WIDTH, height=HEIGHT, num_images_per_prompt=n,
        controlnet_conditioning_scale=one_or_list(weights), control_guidance_start=one_or_list(starts),
        control_guidance_end=one_or_list(ends),
    )  # fmt: skip
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(
        pipe, prompt=PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance=guidance, sampler=sampler, seed=seed,
        width=WIDTH, height=HEIGHT, num_images=n, controls=units(folder, weights, starts, ends, images),
    )  # fmt: skip
    assert_parity(ours_float, ours_uint8, expected)
    print(f"{case}: max abs diff {np.abs(ours_float - expected).max():.2e}")


def test_the_controlnet_and_its_added_conditioning_change_the_image(setup):
    """The parity bound could not be met by ignoring the ControlNet, or by giving it other size ids than the UNet's."""
    components, controlnets, folder = setup
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    common = {"prompt": PROMPT, "steps": 6, "sampler": "DDIM", "seed": 5, "width": WIDTH, "height": HEIGHT}
    plain, _ = ours_as_float(pipe, **common)
    guided, _ = ours_as_float(pipe, **common, controls=units(folder, [1.0], [0.0], [1.0], [control_image()]))
    assert np.abs(plain - guided).max() > 1e-2
    other_size = theirs(
        StableDiffusionXLControlNetPipeline, components, controlnets[:1], "DDIM", [5], prompt=PROMPT,
        image=control_image(), num_inference_steps=6, guidance_scale=7.5, width=WIDTH, height=HEIGHT,
        original_size=(64, 64),
    )  # fmt: skip
    assert np.abs(guided - other_size).max() > 1e-3


def test_controlnet_is_more_important_guides_the_conditional_half_only(setup):
    """diffusers' guess mode is the extension's "ControlNet is more important" with every layer at full weight:
    here the soft weights differ, so the check is on what the ControlNet is given: the conditional half's added
    conditioning, not the unconditional's."""
    components, controlnets, folder = setup
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    seen = []
    model = pipe.controlnets.load(folder / "cn0", pipe.device, pipe.dtype)
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]), with_kwargs=True
    )
    unit = units(folder, [1.0], [0.0], [1.0], [control_image()], control_mode="ControlNet is more important")
    pipe.generate(PROMPT, negative_prompt=NEGATIVE, steps=2, sampler="DDIM", seed=1, width=WIDTH, height=HEIGHT,
                  controls=unit)  # fmt: skip
    assert seen and all(kwargs["text_embeds"].shape[0] == 1 and kwargs["time_ids"].shape[0] == 1 for kwargs in seen)
    assert seen[0]["time_ids"][0].tolist() == [HEIGHT, WIDTH, 0, 0, HEIGHT, WIDTH]


@pytest.mark.parametrize(("sampler", "strength"), [("DDIM", 0.6), ("Euler", 0.8)])
def test_img2img_matches_diffusers(setup, sampler, strength):
    components, controlnets, folder = setup
    init, control = control_image(7), control_image(0)
    expected = theirs(
        StableDiffusionXLControlNetImg2ImgPipeline, components, controlnets[:1], sampler, [77], prompt=PROMPT,
        image=init, control_image=control, strength=strength, num_inference_steps=10, guidance_scale=5.0,
        controlnet_conditioning_scale=1.0, control_guidance_start=0.1, control_guidance_end=0.9,
    )  # fmt: skip
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(
        pipe, prompt=PROMPT, init_image=init, strength=strength, steps=10, guidance=5.0, sampler=sampler, seed=77,
        controls=units(folder, [1.0], [0.1], [0.9], [control]),
    )  # fmt: skip
    assert_parity(ours_float, ours_uint8, expected)


@pytest.mark.parametrize(("sampler", "strength"), [("DDIM", 1.0), ("UniPC", 0.8)])
def test_inpainting_matches_diffusers(setup, sampler, strength):
    components, controlnets, folder = setup
    init, control = control_image(7), control_image(0)
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[4:12, 8:20] = 255
    mask = Image.fromarray(mask)
    expected = theirs(
        StableDiffusionXLControlNetInpaintPipeline, components, controlnets[:1], sampler, [3], prompt=PROMPT,
        image=init, mask_image=mask, control_image=control, controlnet_conditioning_scale=1.0, strength=strength,
        num_inference_steps=8, guidance_scale=6.0, width=WIDTH, height=HEIGHT,
    )  # fmt: skip
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(
        pipe, prompt=PROMPT, init_image=init, mask_image=mask, mask_blur=0, strength=strength, steps=8, guidance=6.0,
        sampler=sampler, seed=3, controls=units(folder, [1.0], [0.0], [1.0], [control]),
    )  # fmt: skip
    assert_parity(ours_float, ours_uint8, expected)


# ---- a ControlNet of another family is refused by name, before compute ----


def test_sd_controlnet_on_sdxl_model_is_refused_before_compute(setup, tmp_path):
    components, _, _ = setup
    make_tiny_controlnet(1).save_pretrained(tmp_path / "sd15_canny")
    refused_before_compute(
        components, tmp_path / "sd15_canny", r"unit 0: '.*sd15_canny' is a 8-wide-text.*this model is a 16-wide"
    )


def test_sdxl_controlnet_on_sd_model_is_refused_before_compute(setup, tiny_components):
    _, _, folder = setup
    refused_before_compute(tiny_components, folder / "cn1", r"unit 0: '.*cn1' is a 16-wide-text \(text_time added")


def test_a_controlnet_of_another_unet_layout_is_refused_before_compute(tiny_components, tmp_path):
    """Same text width, other block widths (the shipped 128 px model's ControlNet on a scene model, say): refused by
    name with both layouts, not a shape error deep in the UNet."""
    make_tiny_controlnet(1, block_out_channels=(8, 16), norm_num_groups=4).save_pretrained(tmp_path / "other")
    refused_before_compute(
        tiny_components, tmp_path / "other", r"unit 0: '.*other' was made for a UNet of widths \(8, 16\) with 1 "
    )


def refused_before_compute(components, controlnet, match: str) -> None:
    """A generation with `controlnet` on `components` is refused with `match`, and the UNet never runs."""
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    pipe.unet.register_forward_pre_hook(lambda *args: pytest.fail("the UNet ran"))
    unit = ControlUnit(model=str(controlnet), image=control_image())
    with pytest.raises(InvalidRequest, match=match):
        pipe.generate(PROMPT, steps=2, width=WIDTH, height=HEIGHT, controls=[unit])
