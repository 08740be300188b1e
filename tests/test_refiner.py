"""The SDXL refiner hand-off against diffusers' base + refiner ensemble (`denoising_end` / `denoising_start`)."""

import hashlib

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from PIL import Image
from support.sdxl import make_tiny_sdxl_components
from test_parity import assert_parity, ours_as_float, reference_scheduler

from ldmkit import Pipeline
from ldmkit.cli import main
from ldmkit.errors import InvalidRequest
from ldmkit.families import reference_pipeline
from ldmkit.loading import save_pretrained
from ldmkit.metadata import parse_infotext, read_infotext

WIDTH, HEIGHT = 24, 16


@pytest.fixture(scope="module")
def base():
    return make_tiny_sdxl_components(seed=0)


@pytest.fixture(scope="module")
def refiner():
    return make_tiny_sdxl_components(seed=4, kind="refiner")


def pipeline(components) -> Pipeline:
    return Pipeline(components, torch.device("cpu"), torch.float32)


def refined_as_float(base, refiner, **kwargs):
    """Our images as floats before 8-bit quantization (the refiner's VAE decodes them), plus the 8-bit images."""
    refiner_pipe = pipeline(refiner)
    captured = []
    decode = refiner_pipe.decode_latents

    def capture(latents):
        image = decode(latents)
        captured.append(image.permute(0, 2, 3, 1).numpy())
        return image

    refiner_pipe.decode_latents = capture
    result = pipeline(base).generate(**kwargs, refiner=refiner_pipe)
    return np.concatenate(captured), np.stack([np.asarray(im) for im in result.images])


def ensemble_images(base, refiner, sampler, seeds, prompt, switch, base_class=StableDiffusionXLPipeline, **kwargs):
    """diffusers' ensemble of experts: the base to `denoising_end`, its latents to the refiner from `denoising_start`;
    one CPU generator per image, the refiner drawing on from where the base left them."""
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    first = reference_pipeline(base, reference_scheduler(base, sampler, seeds), base_class)
    second = reference_pipeline(refiner, reference_scheduler(refiner, sampler, seeds), StableDiffusionXLImg2ImgPipeline)
    for reference in (first, second):
        reference.set_progress_bar_config(disable=True)
    latents = first(prompt, **kwargs, denoising_end=switch, generator=generators, output_type="latent").images
    kwargs = {k: v for k, v in kwargs.items() if k not in ("width", "height", "image", "strength")}
    return second(
        prompt, image=latents, **kwargs, denoising_start=switch, generator=generators, output_type="np"
    ).images


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "Euler a", "Heun"])
@pytest.mark.parametrize("switch", [0.8, 0.5])
def test_refiner_matches_diffusers_ensemble(base, refiner, sampler, switch):
    seed, n = 21, 2
    theirs = ensemble_images(
        base, refiner, sampler, [seed, seed + 1], "a lighthouse at dusk", switch, negative_prompt="blurry",
        num_inference_steps=10, guidance_scale=6.0, width=WIDTH, height=HEIGHT, num_images_per_prompt=n,
    )  # fmt: skip
    ours_float, ours_uint8 = refined_as_float(
        base, refiner, prompt="a lighthouse at dusk", negative_prompt="blurry", steps=10, guidance=6.0,
        sampler=sampler, seed=seed, width=WIDTH, height=HEIGHT, num_images=n, refiner_switch=switch,
    )  # fmt: skip
    assert_parity(ours_float, ours_uint8, theirs)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_img2img_refiner_matches_diffusers_ensemble(base, refiner, sampler):
    """img2img: the base's strength-tail down to the switch point, then the refiner's steps below it."""
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    theirs = ensemble_images(
        base, refiner, sampler, [8], "a red apple", 0.8, base_class=StableDiffusionXLImg2ImgPipeline, image=init,
        strength=0.7, num_inference_steps=10, guidance_scale=5.0,
    )  # fmt: skip
    ours_float, ours_uint8 = refined_as_float(
        base, refiner, prompt="a red apple", init_image=init, strength=0.7, steps=10, guidance=5.0, sampler=sampler,
        seed=8, refiner_switch=0.8,
    )  # fmt: skip
    assert_parity(ours_float, ours_uint8, theirs)


def test_the_refiner_changes_the_image_and_the_tolerance_sees_it(base, refiner):
    """Without the hand-over (the base alone, all steps) the images differ by far more than the tolerance."""
    plain, _ = ours_as_float(pipeline(base), prompt="otter", steps=10, sampler="Euler", seed=3, width=16, height=16)
    refined, _ = refined_as_float(base, refiner, prompt="otter", steps=10, sampler="Euler", seed=3, width=16, height=16)
    assert np.abs(plain - refined).max() > 1e-2


def test_steps_are_counted_over_both_models(base, refiner):
    seen = []
    pipeline(base).generate(
        "otter", steps=10, sampler="Euler", seed=1, width=16, height=16, refiner=refiner, refiner_switch=0.8,
        callback=lambda step: seen.append((step.step, step.total)),
    )  # fmt: skip
    assert seen == [(i, 10) for i in range(10)]


def test_infotext_names_the_refiner_as_a1111_does(base, refiner):
    result = pipeline(base).generate(
        "otter", steps=4, sampler="Euler", seed=1, width=16, height=16, refiner=refiner, refiner_switch=0.75
    )
    info = parse_infotext(result.infotexts[0])
    assert info["Model"] == "tiny-sdxl-base"
    assert info["Refiner"] == "tiny-sdxl-refiner" and info["Refiner switch at"] == "0.75"


def test_a_single_file_model_and_refiner_are_named_with_their_short_hash(tmp_path):
    from ldmkit.refiner import refiner_infotext

    file = tmp_path / "my_refiner.safetensors"
    file.write_bytes(b"refiner bytes")

    class Loaded:
        model_name, source = "my_refiner", str(file)
        model_hash = Pipeline.model_hash

    expected = hashlib.sha256(b"refiner bytes").hexdigest()[:10]  # A1111's short checkpoint hash
    assert refiner_infotext(Loaded(), 0.8) == {"Refiner": f"my_refiner [{expected}]", "Refiner switch at": 0.8}


def test_interrupted_before_the_refiner_gives_the_base_image_described_without_it(base, refiner):
    pipe = pipeline(base)
    steps_seen = []

    def should_stop():
        return len(steps_seen) == 8  # the base's 8 steps of 10 at switch 0.8 are done

    result = pipe.generate(
        "otter", steps=10, sampler="Euler", seed=1, width=16, height=16, refiner=refiner, refiner_switch=0.8,
        callback=lambda step: steps_seen.append(step.step), should_stop=should_stop,
    )  # fmt: skip
    assert result.interrupted and len(result.images) == 1 and steps_seen == list(range(8))
    assert "Refiner" not in parse_infotext(result.infotexts[0])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"refiner_switch": 1.0}, "between 0 and 1"),
        ({"refiner_switch": 0.0}, "between 0 and 1"),
        ({"refiner_switch": 0.999}, "leaves the refiner no step"),
        ({"refiner_switch": 0.01}, "leaves the model no step"),
        ({"refiner": "not a model"}, "refiner must be a loaded Pipeline"),
    ],
)
def test_bad_refiner_requests_are_refused_before_compute(base, refiner, kwargs, message):
    args = {"refiner": pipeline(refiner)} | kwargs
    with pytest.raises(InvalidRequest, match=message):
        pipeline(base).generate("otter", steps=10, sampler="Euler", seed=1, width=16, height=16, **args)


def test_refiner_with_an_inpainting_model_is_refused(refiner):
    init = Image.new("RGB", (16, 16))
    inpainting = make_tiny_sdxl_components(seed=2, kind="inpainting")
    with pytest.raises(InvalidRequest, match=r"not supported with an inpainting model \(9-channel UNet\)"):
        pipeline(inpainting).generate("otter", init_image=init, mask_image=init, refiner=pipeline(refiner))


# ---- the command line ----


@pytest.fixture(scope="module")
def model_folders(base, refiner, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return save_pretrained(base, folder / "tiny-base"), save_pretrained(refiner, folder / "tiny-refiner")


def test_generate_with_a_refiner_from_the_command_line(base, refiner, model_folders, tmp_path, capsys):
    base_folder, refiner_folder = model_folders
    args = ["generate", "a lighthouse", "--steps", "6", "--sampler", "DPM++ 2M", "--seed", "11", "--size", "16x16"]
    args += ["--model", str(base_folder), "--refiner", str(refiner_folder), "--refiner-switch", "0.7"]
    assert main([*args, "-q", "-o", str(tmp_path)]) == 0
    [written] = capsys.readouterr().out.split()
    info = parse_infotext(read_infotext(written))
    assert info["Model"] == "tiny-base" and info["Refiner"] == "tiny-refiner" and info["Refiner switch at"] == "0.7"
    expected = pipeline(base).generate(
        "a lighthouse", steps=6, sampler="DPM++ 2M", seed=11, width=16, height=16, refiner=refiner, refiner_switch=0.7
    )
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(expected.images[0]))
    assert main(["info", written]) == 0  # `ldm info` names the model and the refiner
    assert "Model: tiny-base, Refiner: tiny-refiner, Refiner switch at: 0.7" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--refiner-switch", "1.5"], "refiner switch must be between 0 and 1 (exclusive), got 1.5"),
    ],
)
def test_refiner_options_are_checked_before_loading(tmp_path, capsys, args, message):
    missing = str(tmp_path / "no-such-model")
    code = main(["generate", "otter", "--model", missing, "--refiner", missing, *args, "-o", str(tmp_path / "o")])
    assert code == 2 and capsys.readouterr().err.strip() == f"ldm: error: {message}"
