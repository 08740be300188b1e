"""The hires fix's second pass with its own prompt, negative prompt and sampler (A1111's hr_prompt,
hr_negative_prompt, hr_sampler_name/hr_scheduler), against the second pass rebuilt by hand."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_components

from ldmkit import Pipeline
from ldmkit.denoise import Denoiser, Schedule, sample
from ldmkit.errors import InvalidRequest
from ldmkit.metadata import parse_infotext
from ldmkit.params import GenerationParams, HiresFix
from ldmkit.samplers import get_sampler

WIDTH, HEIGHT, STEPS, SEED = 24, 16, 5, 11


def test_second_pass_runs_its_own_prompt_negative_prompt_and_sampler():
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    hires = HiresFix(2, 0.6, 4, "latent", prompt="a blue cube", negative_prompt="blurry", sampler="DDIM")
    base_steps = []
    result = pipe.generate(
        "a red cube",
        negative_prompt="dark",
        steps=STEPS,
        sampler="Euler",
        seed=SEED,
        width=WIDTH,
        height=HEIGHT,
        guidance=6.0,
        hires=hires,
        callback=lambda step: base_steps.append(step.latents) if step.step < STEPS else None,
    )
    base_latents = base_steps[STEPS - 1]  # the first pass's result, as it was upscaled

    # The second pass by hand: the latents upscaled, noised with the image's generator's next draw (after the
    # first pass's start noise), denoised by DDIM with the second prompts' conditioning.
    generator = torch.Generator("cpu").manual_seed(SEED)
    torch.randn((1, 4, HEIGHT // 2, WIDTH // 2), generator=generator)  # the first pass's start noise
    upscaled = F.interpolate(base_latents, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)
    noise = torch.randn(upscaled.shape, generator=generator)
    schedule = Schedule.make(get_sampler("DDIM"), pipe.scheduler_config, 4, 0.6)
    second = GenerationParams(prompt="a blue cube", negative_prompt="blurry", guidance=6.0)
    conditioning = pipe.encode_prompt(second, (2 * WIDTH, 2 * HEIGHT))
    denoiser = Denoiser(pipe.state.run_unet, conditioning.context, 6.0, "epsilon", conditioning.unet_kwargs)
    expected = pipe.latents_to_images(sample(denoiser, schedule, schedule.add_noise(upscaled, noise)).latents)[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))

    params = parse_infotext(result.infotexts[0])
    assert params["Hires prompt"] == "a blue cube" and params["Hires negative prompt"] == "blurry"
    assert params["Hires sampler"] == "DDIM" and params["Hires schedule type"] == "Automatic"


def test_empty_or_equal_second_pass_options_are_the_first_pass_and_are_not_written():
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    request = {"steps": 4, "seed": SEED, "width": WIDTH, "height": HEIGHT, "sampler": "Euler"}
    plain = pipe.generate("a red cube", hires=HiresFix(2, 0.5), **request)
    same = pipe.generate("a red cube", hires=HiresFix(2, 0.5, prompt="a red cube", sampler="euler"), **request)
    other = pipe.generate("a red cube", hires=HiresFix(2, 0.5, prompt="a green cube"), **request)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(same.images[0]))
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(other.images[0]))
    for text in (plain.infotexts[0], same.infotexts[0]):
        assert "Hires prompt" not in text and "Hires sampler" not in text and "Hires negative" not in text
    several = pipe.generate(["a red cube", "a cat"], hires=HiresFix(2, 0.5), **request)  # each its own prompt
    assert not any("Hires prompt" in text for text in several.infotexts)
    karras = pipe.generate("a red cube", hires=HiresFix(2, 0.5, sampler="Euler Karras"), **request)
    params = parse_infotext(karras.infotexts[0])
    assert params["Hires sampler"] == "Euler" and params["Hires schedule type"] == "Karras"


@pytest.mark.parametrize(
    "hires,message",
    [
        (HiresFix(sampler="no such sampler"), "no such sampler"),
        (HiresFix(prompt="[a:b:0.5]"), "hires prompt"),
        (HiresFix(prompt="a cube <lora:style:1>"), "hires prompt's <lora:...> tags must be the prompt's"),
    ],
)
def test_second_pass_options_are_checked_before_any_compute(hires, message):
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    with pytest.raises(InvalidRequest, match=message):
        pipe.generate("a cube", steps=2, width=WIDTH, height=HEIGHT, hires=hires)


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({}, None),
        ({"hr_sampler_name": "Use same sampler", "hr_scheduler": "Use same scheduler"}, None),
        ({"hr_sampler_name": "Use same sampler", "hr_scheduler": "Karras"}, "Euler Karras"),
        ({"sampler_name": "DPM++ 2M Karras", "hr_sampler_name": "Euler a"}, "Euler a Karras"),  # same schedule type
        ({"sampler_name": "Euler", "scheduler": "karras", "hr_sampler_name": "DDIM"}, "DDIM Karras"),
        ({"sampler_name": "DPM++ 2M", "scheduler": "Exponential", "hr_sampler_name": "Euler Karras"}, "Euler Karras"),
        ({"sampler_name": "DDIM", "hr_sampler_name": "Euler"}, "Euler"),  # Automatic stays each sampler's own
    ],
)
def test_a1111_hires_sampler_fields_name_the_second_pass_sampler(fields, expected):
    from types import SimpleNamespace

    from ldmkit.server.a1111_fields import hires_sampler

    request = {"sampler_name": None, "sampler_index": "Euler", "scheduler": None, "hr_sampler_name": None}
    assert hires_sampler(SimpleNamespace(**{**request, "hr_scheduler": None, **fields})) == expected
