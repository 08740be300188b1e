"""Inpainting (regular and 9-channel models, against diffusers) and the hires fix."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_components
from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel
from PIL import Image
from test_parity import assert_parity, diffusers_images, ours_as_float

from ldmkit import Pipeline
from ldmkit.errors import InvalidRequest
from ldmkit.hires import HiresFix
from ldmkit.metadata import parse_infotext

WIDTH, HEIGHT = 24, 16


def init_and_mask():
    rng = np.random.default_rng(0)
    init = Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8))
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[4:12, 8:20] = 255
    return init, Image.fromarray(mask)


def inpainting_components():
    """Tiny components whose UNet takes latents + mask + masked-image latents (4 + 1 + 4 channels)."""
    components = make_tiny_components()
    torch.manual_seed(1)
    components.unet = UNet2DConditionModel(**{**components.unet.config, "in_channels": 9}).eval()
    return components


@pytest.mark.parametrize("make_components", [make_tiny_components, inpainting_components], ids=["regular", "9-channel"])
@pytest.mark.parametrize("sampler,strength", [("DDIM", 1.0), ("Euler", 0.7), ("DPM++ 2M Karras", 1.0), ("UniPC", 0.8)])
def test_inpainting_matches_diffusers(make_components, sampler, strength):
    components = make_components()
    init, mask = init_and_mask()
    theirs = diffusers_images(
        StableDiffusionInpaintPipeline,
        components,
        sampler,
        [3],
        "a red apple",
        image=init,
        mask_image=mask,
        strength=strength,
        num_inference_steps=8,
        guidance_scale=6.0,
        width=WIDTH,
        height=HEIGHT,
    )
    pipe = Pipeline(components, torch.device("cpu"), torch.float32)
    ours_float, ours_uint8 = ours_as_float(
        pipe,
        prompt="a red apple",
        init_image=init,
        mask_image=mask,
        mask_blur=0,
        strength=strength,
        steps=8,
        guidance=6.0,
        sampler=sampler,
        seed=3,
    )
    assert_parity(ours_float, ours_uint8, theirs)


def test_regular_model_ends_with_the_original_latents_outside_the_mask():
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    init, mask = init_and_mask()
    final = {}
    keep_last = lambda step: final.update(latents=step.latents)  # noqa: E731
    pipe.generate(
        "otter", init_image=init, mask_image=mask, mask_blur=0, strength=1.0, steps=6, seed=0, callback=keep_last
    )
    inpainted = final["latents"]
    pipe.generate("otter", init_image=init, strength=1.0, steps=6, seed=0, callback=keep_last)
    img2img = final["latents"]
    # the init image's posterior sample is the first draw of image 0's generator
    original = pipe.encode_samples(pipe.image_to_tensor(init, WIDTH, HEIGHT), [torch.Generator("cpu").manual_seed(0)])
    known = torch.ones_like(original, dtype=torch.bool)
    known[..., 2:6, 4:10] = False  # the mask's 8x12 px box at the tiny VAE's factor 2
    assert torch.allclose(inpainted[known], original[known], atol=1e-6)
    assert not torch.allclose(img2img[known], original[known], atol=1e-2)
    assert not torch.allclose(inpainted[~known], original[~known], atol=1e-2)


def test_inpainting_records_mask_blur_and_refuses_bad_input():
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    init, mask = init_and_mask()
    result = pipe.generate("otter", init_image=init, mask_image=mask, mask_blur=2, strength=0.8, steps=4, seed=0)
    params = parse_infotext(result.infotexts[0])
    assert params["Mask blur"] == "2" and params["Denoising strength"] == "0.8"
    with pytest.raises(InvalidRequest, match="needs an init image"):
        pipe.generate("otter", mask_image=mask, steps=2)
    with pytest.raises(InvalidRequest, match="mask blur"):
        pipe.generate("otter", init_image=init, mask_image=mask, mask_blur=-1, steps=2)
    with pytest.raises(InvalidRequest, match="inpainting model"):
        Pipeline(inpainting_components(), torch.device("cpu"), torch.float32).generate("otter", steps=2)


@pytest.mark.parametrize("upscaler", ["latent", "pixel"])
def test_hires_fix_upscales_and_records_parameters(upscaler):
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    hires = HiresFix(scale=2, strength=0.5, steps=4, upscaler=upscaler)
    first = pipe.generate("otter", steps=6, seed=9, width=24, height=16, hires=hires)
    again = pipe.generate("otter", steps=6, seed=9, width=24, height=16, hires=hires)
    assert first.images[0].size == (48, 32)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    params = parse_infotext(first.infotexts[0])
    assert params["Size"] == "24x16" and params["Hires upscale"] == "2" and params["Hires steps"] == "4"
    assert params["Denoising strength"] == "0.5" and params["Hires upscaler"] == (
        "Latent" if upscaler == "latent" else "Lanczos"
    )


@pytest.mark.parametrize(
    "hires,message",
    [
        (HiresFix(scale=0), "hires scale must be above 0 and at most"),
        (HiresFix(strength=0.0), "hires strength"),
        (HiresFix(upscaler="esrgan"), r"hires upscaler 'esrgan' is not available \(no upscalers folder is set"),
        (HiresFix(scale=4.0), "width must be a multiple of 8 from 8 to"),
    ],
)
def test_hires_fix_validation(hires, message):
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    with pytest.raises(InvalidRequest, match=message):
        pipe.generate("otter", steps=2, width=4096, height=16, hires=hires) if hires.scale == 4.0 else pipe.generate(
            "otter", steps=2, hires=hires
        )
