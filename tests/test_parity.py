"""Our workflow against diffusers' own pipelines on the same tiny random weights, seeds and sampler.

The reference schedulers come from tests/sampler_table.py, which states independently of ldmkit's
registry which diffusers scheduler and config each A1111 sampler name and schedule type means.
"""

import numpy as np
import pytest
import torch
from conftest import make_tiny_components
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image
from sampler_table import EXPECTED, reference_sigmas

from ldmkit import Pipeline
from ldmkit.families import reference_pipeline
from ldmkit.samplers import SAMPLERS

FIRST_PARITY_SAMPLERS = ["DDIM", "Euler", "DPM++ 2M Karras", "UniPC"]  # also at a second size
SCHEDULE_TYPES = ["Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal"]
SCHEDULE_TYPES += ["Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
# On a schedule type, x_T = noise * the first sigma (k-diffusion's and A1111's start); diffusers' Euler
# schedulers start there with a linspace spacing (with "leading" they scale by sqrt(sigma^2 + 1)).
ON_SIGMAS = {"timestep_spacing": "linspace"}


def reference_scheduler(components, sampler_name, seeds):
    """diffusers' scheduler for an A1111 name, from the independent table (not from ldmkit's registry)."""
    scheduler_class, config = EXPECTED[sampler_name]
    # DPM++ SDE: one Brownian tree per image seeded with the image's seed, as A1111 seeds it
    extra = {"noise_sampler_seed": list(seeds)} if scheduler_class is DPMSolverSDEScheduler else {}
    return scheduler_class.from_config(components.scheduler_config, **config, **extra)


class EulerAncestralOnSigmas(EulerAncestralDiscreteScheduler):
    """diffusers' Euler a given custom sigmas the way EulerDiscreteScheduler takes them, for a reference pipeline."""

    def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None):
        super().set_timesteps(len(sigmas) - 1, device=device)
        euler = EulerDiscreteScheduler.from_config(self.config)
        euler.set_timesteps(sigmas=sigmas, device=device)
        self.sigmas, self.timesteps = euler.sigmas, euler.timesteps


def diffusers_images(pipeline_class, components, scheduler, seeds, *args, **kwargs):
    """diffusers' own pipeline on the same components, one CPU generator per image seeded like ours.

    `scheduler` is an A1111 sampler name (looked up in the independent table) or a scheduler.
    """
    if isinstance(scheduler, str):
        scheduler = reference_scheduler(components, scheduler, seeds)
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


@pytest.mark.parametrize(
    "sampler,width,height",
    [(name, 16, 16) for name in FIRST_PARITY_SAMPLERS] + [(name, 24, 16) for name in EXPECTED],
)
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


@pytest.mark.parametrize("sampler", list(EXPECTED))
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

    def run(seed):
        return np.stack(
            [np.asarray(im) for im in pipe.generate("otter", steps=4, sampler=sampler, seed=seed, num_images=2).images]
        )

    first, again, other = run(3), run(3), run(4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE", "LCM"])
def test_image_i_is_independent_of_batch(tiny_components, sampler):
    """Image i uses seed + i, so asking for image 1 alone with seed + 1 gives the same picture."""
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    batch = pipe.generate("otter", steps=4, sampler=sampler, seed=10, num_images=2)
    single = pipe.generate("otter", steps=4, sampler=sampler, seed=11, num_images=1)
    assert batch.seeds == [10, 11]
    diff = np.abs(np.asarray(batch.images[1], dtype=int) - np.asarray(single.images[0], dtype=int)).max()
    assert diff <= 1


def test_parity_tolerance_detects_a_small_guidance_change(tiny_components):
    """The 1e-3 bound is tight enough to catch a wrong guidance scale on these tiny weights."""
    theirs = diffusers_images(
        StableDiffusionPipeline, tiny_components, "DDIM", [1], "otter", num_inference_steps=6, guidance_scale=6.5
    )
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    ours_float, _ = ours_as_float(pipe, prompt="otter", steps=6, guidance=7.5, sampler="DDIM", seed=1)
    assert np.abs(ours_float - theirs).max() > 1e-3


# -- schedule types ---------------------------------------------------------------------------


def txt2img_pair(components, sampler, schedule_type, reference_scheduler_, sigmas, steps=6, seed=21):
    """(ours, diffusers') float images for one sampler on one schedule; diffusers gets the sigmas directly."""
    theirs = diffusers_images(
        StableDiffusionPipeline,
        components,
        reference_scheduler_,
        [seed, seed + 1],
        "an otter in a river",
        num_inference_steps=None,
        sigmas=list(sigmas),
        guidance_scale=7.5,
        width=24,
        height=16,
        num_images_per_prompt=2,
    )
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(
        pipe,
        prompt="an otter in a river",
        steps=steps,
        guidance=7.5,
        sampler=f"{sampler} {schedule_type}",
        seed=seed,
        width=24,
        height=16,
        num_images=2,
    )
    return ours_float, ours_uint8, theirs


@pytest.mark.parametrize("schedule_type", SCHEDULE_TYPES)
def test_every_schedule_type_matches_diffusers_given_its_sigmas(tiny_components, schedule_type):
    """Euler takes every schedule type; diffusers' Euler is handed A1111's sigmas for it (the independent table)."""
    reference = EulerDiscreteScheduler.from_config(tiny_components.scheduler_config, **ON_SIGMAS)
    sigmas = reference_sigmas(schedule_type, 6)
    assert_parity(*txt2img_pair(tiny_components, "Euler", schedule_type, reference, sigmas))


def test_open_webui_euler_a_karras_matches_diffusers(tiny_components):
    reference = EulerAncestralOnSigmas.from_config(tiny_components.scheduler_config, **ON_SIGMAS)
    assert_parity(*txt2img_pair(tiny_components, "Euler a", "Karras", reference, reference_sigmas("Karras", 6)))


def test_sillytavern_ddim_normal_is_euler_on_the_normal_sigmas(tiny_components):
    """DDIM (eta 0) on a schedule is Euler's method on it; the next test checks that with diffusers alone."""
    reference = EulerDiscreteScheduler.from_config(tiny_components.scheduler_config, **ON_SIGMAS)
    assert_parity(*txt2img_pair(tiny_components, "DDIM", "Normal", reference, reference_sigmas("Normal", 6)))


def test_ddim_on_its_timesteps_is_euler_on_their_sigmas_in_diffusers(tiny_components):
    """The equivalence 'DDIM (eta 0) = Euler on the same noise levels' (Karras et al. 2022), diffusers vs diffusers."""
    config = tiny_components.scheduler_config
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(6)
    alphas_cumprod = ddim.alphas_cumprod[torch.cat([ddim.timesteps, torch.tensor([0])])]  # last step ends at t = 0
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().tolist()
    args = dict(prompt="an otter", guidance_scale=7.5, width=24, height=16)
    as_ddim = diffusers_images(StableDiffusionPipeline, tiny_components, ddim, [4], num_inference_steps=6, **args)
    as_euler = diffusers_images(
        StableDiffusionPipeline, tiny_components, EulerDiscreteScheduler.from_config(config), [4], sigmas=sigmas, **args
    )
    assert np.abs(as_ddim - as_euler).max() < 1e-3


@pytest.mark.parametrize(
    "sampler,schedule_type,scheduler_class,flags",
    [
        ("DPM++ 2M", "Beta", DPMSolverMultistepScheduler, {"use_beta_sigmas": True}),
        ("UniPC", "Exponential", UniPCMultistepScheduler, {"use_exponential_sigmas": True}),
        ("Heun", "Karras", HeunDiscreteScheduler, {"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
    ],
)
def test_flag_schedules_match_diffusers(tiny_components, sampler, schedule_type, scheduler_class, flags):
    seed, steps = 8, 5
    config = {**EXPECTED[sampler][1], "use_karras_sigmas": False, **flags}  # the table's config, schedule swapped
    theirs = diffusers_images(
        StableDiffusionPipeline,
        tiny_components,
        scheduler_class.from_config(tiny_components.scheduler_config, **config),
        [seed],
        "an otter",
        num_inference_steps=steps,
        width=24,
        height=16,
    )
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    sampler_name = f"{sampler} {schedule_type}"
    ours = ours_as_float(pipe, prompt="an otter", steps=steps, sampler=sampler_name, seed=seed, width=24, height=16)
    assert_parity(*ours, theirs)


def test_plms_on_a_v_prediction_model_is_plms_on_the_equivalent_eps_model():
    """diffusers' PNDM extrapolates raw v outputs; PLMS extrapolates eps, each converted where it was predicted.

    The reference is diffusers' own PLMS (epsilon) driving the same v-model wrapped to output
    eps = sqrt(a_t) v + sqrt(1 - a_t) x_t: PLMS as its paper defines it, for this model.
    """
    components = make_tiny_components(prediction_type="v_prediction")
    eps_components = make_tiny_components(prediction_type="epsilon")
    eps_components.unet.load_state_dict(components.unet.state_dict())
    alphas_cumprod = PNDMScheduler.from_config(components.scheduler_config).alphas_cumprod
    v_forward = eps_components.unet.forward

    def eps_forward(sample, timestep, *args, **kwargs):
        v = v_forward(sample, timestep, *args, **{**kwargs, "return_dict": False})[0]
        a = alphas_cumprod[int(timestep)]
        return (a.sqrt() * v + (1 - a).sqrt() * sample,)

    eps_components.unet.forward = eps_forward
    args = dict(prompt="an otter", guidance_scale=7.5, width=24, height=16, num_inference_steps=8)
    theirs = diffusers_images(StableDiffusionPipeline, eps_components, "PLMS", [3], **args)
    plain = diffusers_images(StableDiffusionPipeline, components, "PLMS", [3], **args)  # raw v extrapolated
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    ours = ours_as_float(pipe, prompt="an otter", steps=8, sampler="PLMS", seed=3, width=24, height=16)
    assert_parity(*ours, theirs)
    assert np.abs(plain - theirs).max() > 1e-3  # the difference the conversion makes is visible here
