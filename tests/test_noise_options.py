"""AUTOMATIC1111's noise options: variation seed, seed resize, eta, the churn options and ENSD (issue 19).

The start noise is checked against torch.randn drawn here and a slerp written here; eta and churn against
diffusers' schedulers run with the same options on the tiny model; the A1111 API and the CLI end to end.
"""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pytest
import requests
import torch
from conftest import make_tiny_components
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from PIL import Image
from test_parity import assert_parity, diffusers_images, ours_as_float

from ldmkit import Pipeline
from ldmkit.cli import main
from ldmkit.errors import InvalidRequest
from ldmkit.loading import save_pretrained
from ldmkit.metadata import parse_infotext, read_infotext
from ldmkit.noise import NoiseRecipe, place_centred
from ldmkit.params import GenerationParams
from ldmkit.samplers import _DDIMOnSigmas as DDIMOnSigmas
from ldmkit.samplers import get_sampler

C = 4  # the tiny model's latent channels; its VAE scales by 2 (16 px -> 8 latent px)
BASE = {"prompt": "an otter", "steps": 4, "guidance": 7.5, "width": 16, "height": 16, "seed": 31}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)


def randn(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))


def start_noise(pipe, seeds, recipe, size=(16, 16)) -> torch.Tensor:
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe.prepare_latents(generators, size[1], size[0], recipe=recipe)


def reference_slerp(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """A1111's slerp restated: for every channel c and column x, the vectors low[c, :, x] and high[c, :, x]."""
    out = np.empty_like(low, dtype=np.float64)
    for c in range(low.shape[0]):
        for x in range(low.shape[2]):
            a, b = low[c, :, x].astype(np.float64), high[c, :, x].astype(np.float64)
            omega = math.acos(float(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b))))
            out[c, :, x] = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    return out


def image(pipe, **params) -> np.ndarray:
    return np.asarray(pipe.run(GenerationParams(**{**BASE, **params})).images[0], dtype=int)


# -- variation seed --------------------------------------------------------------------------------------------


def test_variation_strength_0_is_the_seeds_noise_and_1_the_subseeds(pipe):
    plain = start_noise(pipe, [7], None)
    assert torch.equal(plain[0], randn(7, (C, 8, 8)))
    assert torch.equal(start_noise(pipe, [7], NoiseRecipe((99,), 0.0)), plain)
    assert torch.equal(start_noise(pipe, [7], NoiseRecipe((99,), 1.0))[0], randn(99, (C, 8, 8)))


def test_variation_strength_between_is_a1111s_slerp(pipe):
    ours = start_noise(pipe, [7, 8], NoiseRecipe((99, 100), 0.3))
    for i, (seed, subseed) in enumerate([(7, 99), (8, 100)]):
        expected = reference_slerp(0.3, randn(seed, (C, 8, 8)).numpy(), randn(subseed, (C, 8, 8)).numpy())
        assert np.allclose(ours[i].numpy(), expected, atol=1e-5)


def test_a_variation_keeps_every_images_seed_and_counts_up_the_subseed(pipe):
    result = pipe.run(GenerationParams(**BASE, num_images=2, subseed=500, subseed_strength=1.0, sampler="Euler"))
    assert result.seeds == [31, 31]
    # strength 1: image i is the plain image of seed subseed + i
    plain = pipe.run(GenerationParams(**{**BASE, "seed": (500, 501)}, num_images=2, sampler="Euler"))
    for ours, theirs in zip(result.images, plain.images):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    info = parse_infotext(result.infotexts[1])
    assert info["Seed"] == "31" and info["Variation seed"] == "501" and info["Variation seed strength"] == "1.0"


def test_a_random_subseed_is_drawn_and_reported(pipe):
    p = pipe.prepare(GenerationParams(**BASE, subseed_strength=0.5))
    assert isinstance(p.subseed, int)
    assert "Variation seed" not in parse_infotext(pipe.run(GenerationParams(**BASE)).infotexts[0])


# -- seed resize ------------------------------------------------------------------------------------------------


def test_seed_resize_from_the_same_size_is_the_plain_noise(pipe):
    recipe = NoiseRecipe(resize_from=(8, 8))
    assert torch.equal(start_noise(pipe, [7, 8], recipe), start_noise(pipe, [7, 8], None))


def test_seed_resize_from_a_larger_size_is_the_centre_of_its_noise(pipe):
    ours = start_noise(pipe, [7], NoiseRecipe(resize_from=(12, 16)))  # from 32x24 px to 16x16 px
    assert torch.equal(ours[0], randn(7, (C, 12, 16))[:, 2:10, 4:12])


def test_seed_resize_from_a_smaller_size_keeps_the_border_of_the_images_own_noise(pipe):
    ours = start_noise(pipe, [7], NoiseRecipe(resize_from=(4, 6)), size=(16, 16))[0]
    own, small = randn(7, (C, 8, 8)), randn(7, (C, 4, 6))
    expected = own.clone()
    expected[:, 2:6, 1:7] = small
    assert torch.equal(ours, expected)


def test_an_odd_difference_rounds_the_offset_down_as_a1111():
    target, noise = torch.zeros(1, 4, 4), torch.arange(25.0).reshape(1, 5, 5)
    placed = place_centred(noise, target)
    assert torch.equal(placed[0, :3, :3], noise[0, 1:4, 1:4])  # offset floor(-1/2) = -1: rows/columns 1..3
    assert placed[0, 3].abs().sum() == 0 and placed[0, :, 3].abs().sum() == 0  # the last row/column: the target's


def test_seed_resize_with_a_variation_slerps_at_the_from_size(pipe):
    ours = start_noise(pipe, [7], NoiseRecipe((99,), 0.4, resize_from=(12, 8)))[0]
    mixed = reference_slerp(0.4, randn(7, (C, 12, 8)).numpy(), randn(99, (C, 12, 8)).numpy())
    assert np.allclose(ours.numpy(), mixed[:, 2:10, :], atol=1e-5)


def test_the_generator_goes_on_as_without_seed_resize(pipe):
    resized, plain = torch.Generator("cpu").manual_seed(7), torch.Generator("cpu").manual_seed(7)
    pipe.prepare_latents([resized], 16, 16, recipe=NoiseRecipe(resize_from=(12, 12)))
    pipe.prepare_latents([plain], 16, 16)
    assert torch.equal(torch.randn(5, generator=resized), torch.randn(5, generator=plain))


def test_seed_resize_in_the_pipeline_and_its_infotext(pipe):
    result = pipe.run(GenerationParams(**BASE, sampler="Euler", seed_resize_from=(24, 24)))
    assert parse_infotext(result.infotexts[0])["Seed resize from"] == "24x24"
    assert not np.array_equal(np.asarray(result.images[0], dtype=int), image(pipe, sampler="Euler"))
    same = pipe.run(GenerationParams(**BASE, sampler="Euler", seed_resize_from=(16, 16))).images[0]
    assert np.array_equal(np.asarray(same, dtype=int), image(pipe, sampler="Euler"))


# -- eta and the churn options ----------------------------------------------------------------------------------


def test_ddim_eta_matches_diffusers_ddim_with_that_eta(tiny_components):
    seeds, common = [5, 6], {"negative_prompt": "blurry", "width": 16, "height": 16}
    theirs = diffusers_images(
        StableDiffusionPipeline,
        tiny_components,
        "DDIM",
        seeds,
        "an otter",
        num_inference_steps=5,
        guidance_scale=7.5,
        num_images_per_prompt=2,
        eta=0.6,
        **common,
    )
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    kwargs = {"prompt": "an otter", "steps": 5, "guidance": 7.5, "sampler": "DDIM", "seed": 5, "num_images": 2}
    ours_float, ours_uint8 = ours_as_float(pipe, **kwargs, **common, eta=0.6)
    assert_parity(ours_float, ours_uint8, theirs)
    plain_float, _ = ours_as_float(pipe, **kwargs, **common)
    assert np.abs(plain_float - theirs).max() > 1e-2  # eta changed the images


def test_ddim_eta_on_a_schedule_type_is_ddims_eta_step_on_those_noise_levels(tiny_components):
    """DDIM with eta on given noise levels (a schedule type) runs the ancestral step: on DDIM's own timesteps
    it must be diffusers' DDIMScheduler with that eta (as at eta 0 it is Euler, test_parity)."""
    config = tiny_components.scheduler_config
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(6)
    alphas_cumprod = ddim.alphas_cumprod[torch.cat([ddim.timesteps, torch.tensor([0])])]  # last step ends at t = 0
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt().tolist()
    args = {"prompt": "an otter", "guidance_scale": 7.5, "width": 16, "height": 16, "eta": 0.6}
    theirs = diffusers_images(StableDiffusionPipeline, tiny_components, ddim, [4], num_inference_steps=6, **args)
    assert isinstance(get_sampler("DDIM", "Karras").make_scheduler(config), DDIMOnSigmas)  # DDIM on schedule types
    ours = diffusers_images(
        StableDiffusionPipeline, tiny_components, DDIMOnSigmas.from_config(config), [4], sigmas=sigmas, **args
    )
    assert np.abs(ours - theirs).max() < 1e-3
    plain = diffusers_images(
        StableDiffusionPipeline, tiny_components, ddim, [4], num_inference_steps=6, **{**args, "eta": 0}
    )
    assert np.abs(plain - theirs).max() > 1e-2


class ChurningEuler(EulerDiscreteScheduler):
    """diffusers' Euler with the churn options given to every step (its pipeline passes none)."""

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):  # the pipeline reads these
        churn = {"s_churn": 3.0, "s_tmin": 0.5, "s_tmax": 20.0, "s_noise": 1.01}
        return super().step(model_output, timestep, sample, **churn, generator=generator, return_dict=return_dict)


def test_euler_churn_matches_diffusers_euler_with_those_options(tiny_components):
    reference = ChurningEuler.from_config(tiny_components.scheduler_config)
    theirs = diffusers_images(
        StableDiffusionPipeline,
        tiny_components,
        reference,
        [5],
        "an otter",
        num_inference_steps=5,
        guidance_scale=7.5,
        width=16,
        height=16,
    )
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    kwargs = {"prompt": "an otter", "steps": 5, "guidance": 7.5, "sampler": "Euler", "seed": 5, "width": 16}
    churn = {"s_churn": 3.0, "s_tmin": 0.5, "s_tmax": 20.0, "s_noise": 1.01}
    ours_float, ours_uint8 = ours_as_float(pipe, **kwargs, height=16, **churn)
    assert_parity(ours_float, ours_uint8, theirs)
    plain_float, _ = ours_as_float(pipe, **kwargs, height=16)
    assert np.abs(plain_float - theirs).max() > 1e-2


def test_euler_a_eta_0_is_euler_and_eta_scales_the_ancestral_noise(pipe):
    euler = image(pipe, sampler="Euler")
    assert np.abs(image(pipe, sampler="Euler a", eta=0.0) - euler).max() <= 1
    half, full = image(pipe, sampler="Euler a", eta=0.5), image(pipe, sampler="Euler a")
    assert not np.array_equal(half, full) and not np.array_equal(half, euler)


def test_euler_a_step_with_eta_is_the_ancestral_step_of_k_diffusion(tiny_components):
    """One step at eta 0.5 against the formula restated here (Karras et al. 2022's ancestral Euler step)."""
    scheduler = get_sampler("Euler a").make_scheduler(tiny_components.scheduler_config)
    scheduler.set_timesteps(5)
    sample, output = randn(1, (1, C, 8, 8)) * 14, randn(2, (1, C, 8, 8))
    t = scheduler.timesteps[0]
    ours = scheduler.step(output, t, sample, generator=[torch.Generator().manual_seed(3)], eta=0.5)[0]
    sigma, sigma_next = float(scheduler.sigmas[0]), float(scheduler.sigmas[1])
    sigma_up = min(sigma_next, 0.5 * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    x0 = sample - sigma * output
    expected = sample + (sample - x0) / sigma * (sigma_down - sigma) + randn(3, (1, C, 8, 8)) * sigma_up
    assert torch.allclose(ours, expected, atol=1e-4)


@pytest.mark.parametrize(
    "params,message",
    [
        ({"sampler": "DPM2 a", "eta": 0.5}, "eta=0.5 is not supported: DPM2 a runs at A1111's default eta 1"),
        ({"sampler": "DPM++ 2M SDE", "eta": 0.2}, "eta=0.2 is not supported: DPM++ 2M SDE"),
        ({"sampler": "Heun", "s_churn": 1.0}, "s_churn=1.0 is not supported: Heun runs without churn"),
        ({"eta": 1.5}, "eta must be a number from 0 to 1"),
        ({"s_noise": -1}, "s_noise must be a number from 0 to 2"),
        ({"s_tmin": 5.0, "s_tmax": 1.0}, "s_tmax must be a number >= s_tmin"),
        ({"subseed_strength": 2}, "subseed_strength must be a number from 0 to 1"),
        ({"subseed_strength": 0.5, "subseed": -3}, "subseed must be an integer from 0"),
        ({"seed_resize_from": (20, 16)}, "seed resize from width must be a multiple of 8"),
        ({"eta_noise_seed_delta": -1}, "eta_noise_seed_delta must be an integer from 0"),
    ],
)
def test_options_a_sampler_cannot_run_are_refused_by_name(params, message):
    with pytest.raises(InvalidRequest, match=message.replace("+", r"\+").replace("(", r"\(")):
        GenerationParams(**{**BASE, **params}).validate()


def test_options_without_meaning_for_a_sampler_change_nothing(pipe):
    plain = image(pipe, sampler="DPM++ 2M")
    assert np.array_equal(image(pipe, sampler="DPM++ 2M", eta=0.3, s_churn=2.0, s_noise=0.5), plain)
    assert np.array_equal(image(pipe, sampler="Heun"), image(pipe, sampler="Heun", s_noise=0.5, s_tmin=1.0))


def test_eta_and_churn_are_written_as_a1111_names_them(pipe):
    churned = pipe.run(GenerationParams(**BASE, sampler="Euler", s_churn=1.5, s_noise=0.9)).infotexts[0]
    info = parse_infotext(churned)
    assert info["Sigma churn"] == "1.5" and info["Sigma noise"] == "0.9" and "Sigma tmax" not in info
    assert parse_infotext(pipe.run(GenerationParams(**BASE, sampler="DDIM", eta=0.3)).infotexts[0])["Eta DDIM"] == "0.3"
    assert parse_infotext(pipe.run(GenerationParams(**BASE, sampler="Euler a", eta=0.3)).infotexts[0])["Eta"] == "0.3"
    assert "Eta" not in parse_infotext(pipe.run(GenerationParams(**BASE, sampler="Euler a", eta=1.0)).infotexts[0])


# -- ENSD -------------------------------------------------------------------------------------------------------


def test_ensd_seeds_the_ancestral_noise_with_seed_plus_delta(pipe, monkeypatch):
    """Euler a's per-step noise comes from generators seeded seed + ENSD; the start noise stays the seed's."""
    from ldmkit import pipeline as pipeline_module

    seen = []
    real_sample = pipeline_module.sample

    def recording_sample(denoiser, schedule, latents, generators=None, *args, **kwargs):
        seen.append(([g.initial_seed() for g in generators], latents.clone()))
        return real_sample(denoiser, schedule, latents, generators, *args, **kwargs)

    monkeypatch.setattr(pipeline_module, "sample", recording_sample)
    result = pipe.run(GenerationParams(**BASE, sampler="Euler a", num_images=2, eta_noise_seed_delta=31337))
    plain = pipe.run(GenerationParams(**BASE, sampler="Euler a", num_images=2))
    (ensd_seeds, ensd_start), (plain_seeds, plain_start) = seen
    assert ensd_seeds == [31 + 31337, 32 + 31337] and plain_seeds == [31, 32]
    assert torch.equal(ensd_start, plain_start)
    assert parse_infotext(result.infotexts[0])["ENSD"] == "31337"
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(plain.images[0]))


def test_ensd_changes_nothing_for_a_sampler_without_step_noise(pipe):
    result = pipe.run(GenerationParams(**BASE, sampler="Euler", eta_noise_seed_delta=31337))
    assert np.array_equal(np.asarray(result.images[0], dtype=int), image(pipe, sampler="Euler"))
    assert "ENSD" not in parse_infotext(result.infotexts[0])


# -- front ends -------------------------------------------------------------------------------------------------


def test_default_options_keep_seed_plus_i(pipe):
    assert GenerationParams(**{**BASE, "num_images": 3}).image_seeds() == [31, 32, 33]
    assert GenerationParams(**{**BASE, "num_images": 3, "subseed_strength": 0.1}).image_seeds() == [31, 31, 31]


# -- the A1111 API ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    pytest.importorskip("fastapi", reason="server extras not installed")
    from e2e.serving import serve_tiny

    with serve_tiny(ui=False) as (url, _, _):
        yield url


def a1111(url: str, **fields) -> tuple[np.ndarray, dict, dict]:
    """The first image's pixels, its infotext's fields and the answer's info."""

    body = {"prompt": "an otter", "steps": 4, "cfg_scale": 7.5, "width": 16, "height": 16, "seed": 31, **fields}
    response = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    png = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    png.load()
    return np.asarray(png.convert("RGB"), dtype=int), parse_infotext(png.info["parameters"]), json.loads(answer["info"])


def test_a1111_api_runs_variation_seed_resize_eta_and_ensd(server, pipe):
    fields = {"subseed": 77, "subseed_strength": 0.5, "seed_resize_from_w": 24, "seed_resize_from_h": 24}
    noisy = {"sampler_name": "Euler a", "eta": 0.5, "override_settings": {"eta_noise_seed_delta": 100}}
    ours, infotext, info = a1111(server, **fields, **noisy)
    default, _, _ = a1111(server, sampler_name="Euler a")
    assert np.abs(ours - default).max() > 10
    expected = image(
        pipe,
        sampler="Euler a",
        subseed=77,
        subseed_strength=0.5,
        seed_resize_from=(24, 24),
        eta=0.5,
        eta_noise_seed_delta=100,
    )
    assert np.abs(ours - expected).max() <= 3  # the worker thread may sum floats in another order
    assert infotext["Variation seed"] == "77" and infotext["Variation seed strength"] == "0.5"
    assert infotext["Seed resize from"] == "24x24" and infotext["Eta"] == "0.5" and infotext["ENSD"] == "100"
    assert info["subseed"] == 77 and info["all_subseeds"] == [77] and info["subseed_strength"] == 0.5
    assert (info["seed_resize_from_w"], info["seed_resize_from_h"]) == (24, 24)


def test_a1111_api_runs_eulers_churn_and_ddims_eta(server, pipe):
    churned, infotext, _ = a1111(server, sampler_name="Euler", s_churn=2.0, s_tmin=0.1, s_tmax=0, s_noise=1.0)
    assert np.abs(churned - image(pipe, sampler="Euler", s_churn=2.0, s_tmin=0.1)).max() <= 3
    assert np.abs(churned - a1111(server, sampler_name="Euler")[0]).max() > 10
    assert infotext["Sigma churn"] == "2.0" and infotext["Sigma tmin"] == "0.1" and "Sigma tmax" not in infotext
    ddim, infotext, _ = a1111(server, sampler_name="DDIM", eta=1.0)  # webuiapi's default eta
    assert np.abs(ddim - a1111(server, sampler_name="DDIM")[0]).max() > 10 and infotext["Eta DDIM"] == "1.0"


def test_ensd_set_through_the_options_is_kept(server):
    options = f"{server}/sdapi/v1/options"
    assert requests.post(options, json={"eta_noise_seed_delta": 31337}, timeout=30).status_code == 200
    try:
        assert requests.get(options, timeout=30).json()["eta_noise_seed_delta"] == 31337
        assert a1111(server, sampler_name="Euler a")[1]["ENSD"] == "31337"
    finally:
        requests.post(options, json={"eta_noise_seed_delta": 0}, timeout=30)


# -- the CLI ----------------------------------------------------------------------------------------------------


def test_cli_generate_takes_the_noise_options(tmp_path, pipe):
    save_pretrained(make_tiny_components(), tmp_path / "model")
    args = ["generate", "an otter", "-n", "2", "--steps", "4", "--guidance", "7.5", "--seed", "31", "--size", "16x16"]
    args += ["--sampler", "Euler a", "--subseed", "77", "--subseed-strength", "0.5", "--seed-resize-from", "24x24"]
    args += ["--eta", "0.5", "--ensd", "100", "--model", str(tmp_path / "model"), "-o", str(tmp_path / "out"), "-q"]
    assert main(args) == 0
    second = tmp_path / "out" / "00002-31.png"  # a variation keeps the seed
    info = parse_infotext(read_infotext(second))
    assert info["Variation seed"] == "78" and info["Seed resize from"] == "24x24"
    assert info["Eta"] == "0.5" and info["ENSD"] == "100"
    options = {"subseed": 77, "subseed_strength": 0.5, "seed_resize_from": (24, 24), "eta": 0.5}
    expected = pipe.run(GenerationParams(**BASE, num_images=2, sampler="Euler a", eta_noise_seed_delta=100, **options))
    with Image.open(second) as png:
        assert np.abs(np.asarray(png, dtype=int) - np.asarray(expected.images[1], dtype=int)).max() <= 1


@pytest.mark.parametrize(
    "args,message",
    [
        (["--subseed-strength", "2"], "subseed_strength must be a number from 0 to 1, got 2.0"),
        (["--seed-resize-from", "20x16"], "seed resize from width must be a multiple of 8 from 8 to 8192, got 20"),
        (["--sampler", "Heun", "--s-churn", "1"], "s_churn=1.0 is not supported: Heun runs without churn"),
    ],
)
def test_cli_refuses_bad_noise_options_in_one_line_before_loading(tmp_path, capsys, args, message):
    code = main(["generate", "otter", *args, "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"ldm: error: {message}"), err
