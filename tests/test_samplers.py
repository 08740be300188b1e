"""The sampler registry against tests/sampler_table.py, which states independently what each name must be."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler
from sampler_table import EXPECTED, reference_sigmas, training_sigmas
from support.tiny import SCHEDULER_CONFIG

from ldmkit.errors import InvalidRequest
from ldmkit.samplers import REFUSED, SAMPLERS, get_sampler

# Names as clients send them -> the infotext's label.
RESOLVED = [
    ("Euler a", "Karras", "Euler a Karras"),  # Open WebUI's example payload
    ("DDIM", "normal", "DDIM Normal"),  # SillyTavern's default, in lower case as it sends it
    ("DPM++ 2M", "Automatic", "DPM++ 2M Karras"),
    ("DPM++ 2M Karras", None, "DPM++ 2M Karras"),  # pre-1.9 A1111 label
    ("DPM++ 2M Karras", "Karras", "DPM++ 2M Karras"),
    ("dpm++ 2m sde karras", "", "DPM++ 2M SDE Karras"),
    ("Euler", "sgm_uniform", "Euler SGM Uniform"),  # A1111's API name
    ("Euler a", "SGMUniform", "Euler a SGM Uniform"),  # its alias
    ("k_euler", None, "Euler"),
    ("k_euler_a", None, "Euler a"),
    ("k_euler_ancestral", None, "Euler a"),
    ("k_dpmpp_2m", None, "DPM++ 2M Karras"),
    ("k_dpmpp_2m_ka", None, "DPM++ 2M Karras"),
    ("k_lms", None, "LMS"),
    ("k_dpm_2_a", None, "DPM2 a Karras"),
    ("k_dpmpp_3m_sde", None, "DPM++ 3M SDE Exponential"),
    ("k_lcm", None, "LCM"),
    ("DDIM DDIM", None, "DDIM DDIM"),
    ("UniPC", "Beta", "UniPC Beta"),
]


def test_every_name_gets_the_expected_scheduler_and_config():
    covered = {name for name in EXPECTED if name in SAMPLERS}
    assert covered == set(SAMPLERS), "every registered sampler needs an expected row"
    for name, (scheduler_class, config) in EXPECTED.items():
        scheduler = get_sampler(name).make_scheduler(SCHEDULER_CONFIG)
        assert isinstance(scheduler, scheduler_class), name
        for key, value in config.items():
            assert scheduler.config[key] == value, (name, key)


@pytest.mark.parametrize("name,schedule_type,label", RESOLVED)
def test_client_names_resolve(name, schedule_type, label):
    assert get_sampler(name, schedule_type).name == label
    assert get_sampler(label).name == label  # the label round-trips, as the server's queue relies on


@pytest.mark.parametrize("name", [*REFUSED, "k_dpmpp_2s_a", "DPM++ 2S a Karras", "restart", "k_dpm_ad"])
def test_samplers_diffusers_lacks_are_refused_by_name(name):
    with pytest.raises(InvalidRequest, match="is not available: diffusers has no|CFG\\+\\+"):
        get_sampler(name)


@pytest.mark.parametrize(
    "name,schedule_type,message",
    [
        ("PLMS", "Karras", "'PLMS' cannot run the Karras schedule exactly; it takes: Automatic"),
        ("LCM", "SGM Uniform", "'LCM' cannot run the SGM Uniform schedule"),
        ("Heun", "Uniform", "'Heun' cannot run the Uniform schedule exactly; it takes: Automatic, Karras"),
        ("DPM++ 2M", "Simple", "'DPM\\+\\+ 2M' cannot run the Simple schedule"),
        ("Euler", "Karras Exponential", "unknown schedule type 'Karras Exponential'"),
        ("DPM++ 2M Karras", "Exponential", "names the Karras schedule but the schedule type is 'Exponential'"),
        ("Nope", None, "unknown sampler 'Nope'; choose one of: DPM\\+\\+ 2M, "),
        ("", None, "sampler must be a name"),
    ],
)
def test_what_cannot_be_run_exactly_is_refused(name, schedule_type, message):
    with pytest.raises(InvalidRequest, match=message):
        get_sampler(name, schedule_type)


# -- schedule types ---------------------------------------------------------------------------


def distinct_levels(scheduler) -> np.ndarray:
    """A scheduler's sigmas with the repeats of second-order schedulers (Heun, DPM2) folded."""
    sigmas = scheduler.sigmas.double().numpy()
    keep = np.concatenate([[True], np.abs(np.diff(sigmas)) > 1e-6])
    return sigmas[keep]


SCHEDULE_TYPES = ["Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal"]
SCHEDULE_TYPES += ["Align Your Steps", "Simple", "Normal", "DDIM", "Beta"]
# Which samplers run which schedule types (diffusers' flags for these three, or any sigmas).
FLAG_SCHEDULES = ["Karras", "Exponential", "Polyexponential", "Beta"]
TAKES = {
    "Euler": SCHEDULE_TYPES,
    "Euler a": SCHEDULE_TYPES,
    "LMS": SCHEDULE_TYPES,
    "DDIM": SCHEDULE_TYPES,
    "Heun": FLAG_SCHEDULES,
    "DPM2": FLAG_SCHEDULES,
    "DPM2 a": FLAG_SCHEDULES,
    "DPM++ SDE": FLAG_SCHEDULES,
    "DPM++ 2M": FLAG_SCHEDULES,
    "DPM++ 2M SDE": FLAG_SCHEDULES,
    "DPM++ 2M SDE Heun": FLAG_SCHEDULES,
    "DPM++ 3M SDE": FLAG_SCHEDULES,
    "UniPC": FLAG_SCHEDULES,
    "PLMS": [],
    "LCM": [],
}


def test_the_reference_schedules_match_published_numbers():
    """Pins the reference itself: SD's sigma range, and the 10-step AYS list A1111 uses as is for 11 steps."""
    assert training_sigmas()[[0, -1]] == pytest.approx([0.029167, 14.614641], rel=1e-5)
    assert reference_sigmas("Karras", 4) == pytest.approx([14.614641, 3.168610, 0.446920, 0.029167, 0], rel=1e-5)
    assert reference_sigmas("Align Your Steps", 11)[:3] == pytest.approx([14.615, 6.475, 3.861])
    assert len(reference_sigmas("DDIM", 7)) == 9  # A1111's DDIM type: 1000 // 7 spacing gives 8 steps


def test_diffusers_flags_agree_with_the_reference_schedules():
    """diffusers' own use_*_sigmas on a linspace spacing are a second, independent source for three types."""
    for schedule, flag in [("Karras", "use_karras_sigmas"), ("Exponential", "use_exponential_sigmas")]:
        for n in (2, 5, 25):
            scheduler = EulerDiscreteScheduler.from_config(
                SCHEDULER_CONFIG, timestep_spacing="linspace", **{flag: True}
            )
            scheduler.set_timesteps(n)
            np.testing.assert_allclose(scheduler.sigmas.numpy(), reference_sigmas(schedule, n), rtol=1e-4)
    beta = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG, timestep_spacing="linspace", use_beta_sigmas=True)
    beta.set_timesteps(7)
    np.testing.assert_allclose(beta.sigmas.numpy(), reference_sigmas("Beta", 7), rtol=1e-4)


# diffusers' DPM2 schedulers take seconds to build (a 1000-step schedule in __init__): two of their four
# flag schedules here; the same flags are checked on every other FLAGS sampler.
SLOW_TO_BUILD = {"DPM2": ["Karras", "Beta", "Uniform"], "DPM2 a": ["Exponential", "SGM Uniform"]}


@pytest.mark.parametrize("sampler", list(TAKES))
def test_every_supported_schedule_is_stepped_exactly(sampler):
    for schedule in SLOW_TO_BUILD.get(sampler, SCHEDULE_TYPES):
        if schedule not in TAKES[sampler]:
            with pytest.raises(InvalidRequest, match=f"cannot run the {schedule} schedule exactly"):
                get_sampler(sampler, schedule)
            continue
        scheduler = get_sampler(sampler, schedule).make_scheduler(SCHEDULER_CONFIG)
        for n in (2, 3, 7, 25):
            scheduler.set_timesteps(n, device="cpu")
            np.testing.assert_allclose(
                distinct_levels(scheduler), reference_sigmas(schedule, n), rtol=1e-4, err_msg=f"{sampler} {schedule}"
            )


def test_one_step_that_diffusers_cannot_space_exactly_is_refused():
    """diffusers' linspace spacing at 1 step is t = 0, so Heun 'Karras' would start at sigma_min: refused."""
    scheduler = get_sampler("Heun", "Karras").make_scheduler(SCHEDULER_CONFIG)
    with pytest.raises(InvalidRequest, match="cannot run the Karras schedule exactly with 1 step"):
        scheduler.set_timesteps(1, device="cpu")
    one_step = get_sampler("Euler a", "SGM Uniform").make_scheduler(SCHEDULER_CONFIG)
    one_step.set_timesteps(1, device="cpu")  # the Turbo setup: one step from sigma_max
    assert one_step.sigmas.tolist() == pytest.approx([14.614642, 0.0], rel=1e-5)
    assert one_step.timesteps.tolist() == [999.0]


@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "LMS", "DDIM", "Heun", "DPM2"])
def test_on_a_schedule_type_the_latents_start_at_noise_times_its_first_sigma(sampler):
    """k-diffusion's and A1111's x_T = noise * sigmas[0], not diffusers' sqrt(sigma^2 + 1) of 'leading'."""
    scheduler = get_sampler(sampler, "Karras").make_scheduler(SCHEDULER_CONFIG)
    scheduler.set_timesteps(5, device="cpu")
    assert float(scheduler.init_noise_sigma) == pytest.approx(reference_sigmas("Karras", 5)[0], rel=1e-5)


def test_euler_a_sgm_uniform_is_the_trailing_spacing_turbo_models_use():
    """SDXL-Turbo's Euler a 'trailing' timesteps (999, 749, 499, 249) are A1111's SGM Uniform to within a step."""
    scheduler = get_sampler("Euler a", "SGM Uniform").make_scheduler(SCHEDULER_CONFIG)
    scheduler.set_timesteps(4, device="cpu")
    assert scheduler.timesteps.tolist() == pytest.approx([999, 749.25, 499.5, 249.75], abs=1e-3)


def test_align_your_steps_takes_the_sdxl_list_for_sdxl_models():
    """NVIDIA's published 10-step lists (as A1111 picks them by model): SDXL's for SDXL, SD 1.5's otherwise."""
    from ldmkit.schedules import FAMILY_KEY

    sdxl = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029, 0.0]
    sd15 = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029, 0.0]
    sampler = get_sampler("Euler", "Align Your Steps")
    for family, expected in (("sdxl", sdxl), ("sd", sd15)):
        scheduler = sampler.make_scheduler({**SCHEDULER_CONFIG, FAMILY_KEY: family})
        scheduler.set_timesteps(11)
        np.testing.assert_allclose(scheduler.sigmas.numpy(), expected, rtol=1e-5)


def test_a_pipeline_tells_its_schedulers_its_family(tiny_components):
    from support.sdxl import make_tiny_sdxl_components

    from ldmkit.pipeline import Pipeline
    from ldmkit.schedules import FAMILY_KEY

    assert Pipeline(tiny_components, torch.device("cpu"), torch.float32).scheduler_config[FAMILY_KEY] == "sd"
    assert (
        Pipeline(make_tiny_sdxl_components(), torch.device("cpu"), torch.float32).scheduler_config[FAMILY_KEY] == "sdxl"
    )
