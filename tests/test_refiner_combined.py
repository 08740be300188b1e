"""The refiner with inpainting, the hires fix and ControlNets.

A refiner with the base's own weights must hand over seamlessly: with a first-order deterministic sampler the
images equal the base's alone (the hand-over point, the re-noised known region of inpainting and the hires pass's
split are then all checked against the plain run). With a real refiner: diffusers' SDXL ControlNet pipeline to
`denoising_end`, then its refiner, is the reference for ControlNets.
"""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLImg2ImgPipeline
from PIL import Image
from support.controlnet import make_tiny_sdxl_controlnet
from support.sdxl import make_tiny_sdxl_components
from test_parity import assert_parity, ours_as_float, reference_scheduler

from ldmkit import Pipeline
from ldmkit.control_units import ControlUnit
from ldmkit.families import reference_pipeline
from ldmkit.metadata import parse_infotext
from ldmkit.params import HiresFix

WIDTH, HEIGHT = 24, 16


@pytest.fixture(scope="module")
def base():
    return make_tiny_sdxl_components(seed=0)


@pytest.fixture(scope="module")
def twin():
    """The base's weights again, as a separate model: a refiner that must change nothing."""
    return Pipeline(make_tiny_sdxl_components(seed=0), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def refiner():
    return Pipeline(make_tiny_sdxl_components(seed=4, kind="refiner"), torch.device("cpu"), torch.float32)


def pipeline(components) -> Pipeline:
    return Pipeline(components, torch.device("cpu"), torch.float32)


def images(result):
    return np.stack([np.asarray(image, dtype=int) for image in result.images])


def init_and_mask():
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[4:12, 8:20] = 255
    return init, Image.fromarray(mask)


def as_float(pipe, refiner_pipe, **kwargs):
    """The images as floats before quantization, decoded by whichever model finished them."""
    captured = []
    for model in {id(pipe): pipe, id(refiner_pipe): refiner_pipe}.values():
        decode = model.decode_latents
        model.decode_latents = lambda latents, decode=decode: captured.append(decode(latents)) or captured[-1]
    try:
        pipe.generate(**kwargs, refiner=refiner_pipe)
    finally:
        for model in (pipe, refiner_pipe):
            model.__dict__.pop("decode_latents", None)
    return torch.cat(captured).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])
def test_inpainting_hands_over_seamlessly(base, twin, sampler):
    init, mask = init_and_mask()
    kwargs = {"prompt": "a red apple", "init_image": init, "mask_image": mask, "mask_blur": 0, "steps": 8}
    kwargs |= {"guidance": 6.0, "sampler": sampler, "seed": 3}
    pipe = pipeline(base)
    alone, _ = ours_as_float(pipe, **kwargs)
    for strength, switch in ((1.0, 0.6), (0.8, 0.5)):
        handed = as_float(pipe, twin, **kwargs | {"strength": strength}, refiner_switch=switch)
        alone, _ = ours_as_float(pipe, **kwargs | {"strength": strength})
        assert np.abs(handed - alone).max() < 1e-4, (strength, switch)


def test_inpainting_with_a_refiner_keeps_the_known_region_through_its_steps(base, refiner):
    """The refiner's steps put the known region back too: outside the mask its final latents are the init image's,
    as the base's alone are; inside, the refiner changed them."""
    init, mask = init_and_mask()
    kwargs = {"prompt": "a red apple", "init_image": init, "mask_image": mask, "mask_blur": 0, "steps": 8, "seed": 3}
    decoded = []
    pipe = pipeline(base)
    for model in (pipe, refiner):
        model.decode_latents = lambda latents, decode=model.decode_latents: decoded.append(latents) or decode(latents)
    try:
        pipe.generate(**kwargs, sampler="Euler")
        pipe.generate(**kwargs, sampler="Euler", refiner=refiner, refiner_switch=0.5)
    finally:
        del refiner.decode_latents
    alone, refined = decoded
    outside = torch.ones(HEIGHT // 2, WIDTH // 2, dtype=torch.bool)
    outside[2:6, 4:10] = False  # the mask at latent resolution
    assert torch.allclose(refined[..., outside], alone[..., outside], atol=1e-6)
    assert (refined[..., ~outside] - alone[..., ~outside]).abs().max() > 1e-2


@pytest.mark.parametrize("strength", [0.6, 0.2], ids=["split", "refiner-only"])
def test_hires_pass_hands_over_seamlessly(base, twin, strength):
    """The refiner finishes the hires pass (0.2: the pass starts below the switch point: the refiner runs it all)."""
    hires = HiresFix(scale=2, steps=10, strength=strength)
    kwargs = {"prompt": "otter", "steps": 6, "sampler": "Euler", "seed": 1, "width": 16, "height": 16, "hires": hires}
    pipe = pipeline(base)
    alone, _ = ours_as_float(pipe, **kwargs)
    calls = []
    hook = twin.unet.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        handed = as_float(pipe, twin, **kwargs, refiner_switch=0.8)
    finally:
        hook.remove()
    assert len(calls) == 2  # the hires pass's steps below timestep 200 (101 and 1) were the refiner's
    assert handed.shape == alone.shape == (1, 32, 32, 3)
    assert np.abs(handed - alone).max() < 1e-4


def test_hires_refiner_runs_in_the_hires_pass_at_its_size(base, refiner):
    calls = []
    hook = refiner.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["added_cond_kwargs"]["time_ids"][-1].tolist()),
        with_kwargs=True,
    )
    steps = []
    try:
        result = pipeline(base).generate(
            "otter", steps=10, sampler="Euler", seed=1, width=16, height=16, refiner=refiner, refiner_switch=0.8,
            hires=HiresFix(scale=2, steps=10, strength=0.5), callback=steps.append,
        )  # fmt: skip
    finally:
        hook.remove()
    # the hires pass: 10 steps at strength 0.5 -> 401, 301, 201, 101, 1 ("leading"); those below the switch point's
    # timestep 200 are the refiner's, conditioned on the hires size (and its aesthetic score, 6.0 for the prompt)
    assert calls == [[32, 32, 0, 0, 6.0]] * 2
    assert [s.step for s in steps] == list(range(15)) and steps[-1].total == 15
    info = parse_infotext(result.infotexts[0])
    assert info["Refiner"] == refiner.model_name and "Hires upscale" in info


def test_controlnet_with_refiner_matches_diffusers_ensemble(base, refiner, tmp_path):
    """ControlNets guide the base's steps (start/end: fractions of the whole schedule), the refiner runs unguided."""
    controlnet = make_tiny_sdxl_controlnet(base.unet, seed=1)
    controlnet.save_pretrained(tmp_path / "cn")
    control = Image.fromarray(np.random.default_rng(5).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    seeds, switch = [21], 0.7
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    c = base
    first = StableDiffusionXLControlNetPipeline(
        vae=c.vae, text_encoder=c.text_encoder, text_encoder_2=c.text_encoder_2, tokenizer=c.tokenizer,
        tokenizer_2=c.tokenizer_2, unet=c.unet, controlnet=controlnet, scheduler=reference_scheduler(c, "Euler", seeds),
        add_watermarker=False, force_zeros_for_empty_prompt=True,
    )  # fmt: skip
    r = refiner.components
    second = reference_pipeline(r, reference_scheduler(r, "Euler", seeds), StableDiffusionXLImg2ImgPipeline)
    for reference in (first, second):
        reference.set_progress_bar_config(disable=True)
    common = {"negative_prompt": "blurry", "num_inference_steps": 10, "guidance_scale": 6.0}
    latents = first(
        "a lighthouse", image=control, width=WIDTH, height=HEIGHT, control_guidance_start=0.1,
        control_guidance_end=0.5, denoising_end=switch, generator=generators, output_type="latent", **common,
    ).images  # fmt: skip
    theirs = second(
        "a lighthouse", image=latents, denoising_start=switch, generator=generators, output_type="np", **common
    ).images
    unit = ControlUnit(model=str(tmp_path / "cn"), image=control, guidance_start=0.1, guidance_end=0.5)
    ours = as_float(
        pipeline(base), refiner, prompt="a lighthouse", negative_prompt="blurry", steps=10, guidance=6.0,
        sampler="Euler", seed=21, width=WIDTH, height=HEIGHT, controls=[unit], refiner_switch=switch,
    )  # fmt: skip
    assert_parity(ours, (ours * 255).round().astype(np.uint8), theirs)
