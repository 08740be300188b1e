"""Inpainting's masked content modes and 'only masked' area, and img2img's resize modes, each against a reference
computed here (A1111's inpainting_fill, inpaint_full_res with its padding, resize_mode)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_components
from PIL import Image

from ldmkit import Pipeline
from ldmkit.denoise import Schedule
from ldmkit.errors import InvalidRequest
from ldmkit.inpaint_fill import fill_masked
from ldmkit.metadata import parse_infotext
from ldmkit.resize_modes import fit
from ldmkit.samplers import get_sampler

WIDTH, HEIGHT, SEED, STRENGTH, STEPS = 24, 16, 5, 0.6, 6


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, box)
    return mask


def first_unet_input(pipe: Pipeline, **request) -> torch.Tensor:
    """The latents DDIM's first step gives the UNet (its input is unscaled): the noised start of the request."""
    inputs = []
    unet = pipe.state.unet

    def spy(sample, *args, **kwargs):
        inputs.append(sample)
        return unet(sample, *args, **kwargs)

    pipe.apply(lambda state: state.with_transform("spy", unet_forward=spy))
    pipe.generate("a red apple", sampler="DDIM", steps=STEPS, seed=SEED, strength=STRENGTH, **request)
    return inputs[0][-1:]  # the conditional half


# -- masked content ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ["fill", "original", "latent_noise", "latent_nothing"])
def test_masked_content_sets_the_start_latents(content):
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    init, mask = random_image(WIDTH, HEIGHT), box_mask(WIDTH, HEIGHT, (8, 4, 20, 12))  # on the latents' grid
    started = first_unet_input(
        pipe, init_image=init, mask_image=mask, mask_blur=0, width=WIDTH, height=HEIGHT, masked_content=content
    )
    # The reference: the image (filled unless 'original') encoded with the generator's first draw, the start
    # noise its second; the latent modes put noise or zeros in the mask's box (latent pixels 2:6, 4:10).
    generator = torch.Generator("cpu").manual_seed(SEED)
    pixels = pipe.image_to_tensor(init if content == "original" else fill_masked(init, mask), WIDTH, HEIGHT)
    clean = pipe.encode_samples(pixels, [generator])
    noise = torch.randn(clean.shape, generator=generator)
    if content == "latent_noise":
        clean[..., 2:6, 4:10] = noise[..., 2:6, 4:10]
    elif content == "latent_nothing":
        clean[..., 2:6, 4:10] = 0
    schedule = Schedule.make(get_sampler("DDIM"), pipe.scheduler_config, STEPS, STRENGTH)
    torch.testing.assert_close(started, schedule.add_noise(clean, noise), rtol=0, atol=1e-5)


def test_masked_content_is_in_the_infotext_as_a1111_names_it():
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    init, mask = random_image(WIDTH, HEIGHT), box_mask(WIDTH, HEIGHT, (8, 4, 20, 12))
    request = {"init_image": init, "mask_image": mask, "steps": 3, "seed": 1, "strength": 0.8}
    for content, written in [("fill", "fill"), ("latent_noise", "latent noise"), ("latent_nothing", "latent nothing")]:
        params = parse_infotext(pipe.generate("otter", masked_content=content, **request).infotexts[0])
        assert params["Masked content"] == written
    assert "Masked content" not in pipe.generate("otter", **request).infotexts[0]  # original: not written


# -- only masked ---------------------------------------------------------------------------------------------


def test_only_masked_inpaints_the_padded_box_at_the_size_and_pastes_it_back():
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    init, mask = random_image(64, 40), box_mask(64, 40, (30, 10, 40, 20))
    request = {"steps": 4, "seed": SEED, "strength": 0.8, "width": WIDTH, "height": HEIGHT, "mask_blur": 0}
    result = pipe.generate(
        "otter", init_image=init, mask_image=mask, inpaint_only_masked=True, inpaint_padding=4, **request
    )
    # By hand: the mask's box (30, 10)-(40, 20) padded by 4 is 18 x 18; grown to the 3:2 of 24x16 it is 27 wide,
    # centred: (22, 6)-(49, 24). That crop at 24x16, inpainted, back at 27x18 in the box, through the mask.
    box = (22, 6, 49, 24)
    crop = init.crop(box).resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
    crop_mask = mask.crop(box).resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)
    inpainted = pipe.generate("otter", init_image=crop, mask_image=crop_mask, **request).images[0]
    pasted = init.copy()
    pasted.paste(inpainted.resize((27, 18), Image.Resampling.LANCZOS), box[:2])
    expected = Image.composite(pasted, init, mask)
    assert result.images[0].size == (64, 40)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected))
    outside = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(result.images[0])[outside], np.asarray(init)[outside])  # the init's own
    params = parse_infotext(result.infotexts[0])
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "4"
    assert params["Size"] == f"{WIDTH}x{HEIGHT}"


def test_only_masked_blurs_the_mask_at_the_image_size_and_stays_inside_the_image():
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    init, mask = random_image(64, 40), box_mask(64, 40, (56, 30, 64, 40))  # in the corner: the box shifts inside
    result = pipe.generate(
        "otter", init_image=init, mask_image=mask, mask_blur=2, inpaint_only_masked=True, inpaint_padding=8,
        steps=3, seed=1, width=16, height=16,
    )  # fmt: skip
    changed = np.any(np.asarray(result.images[0]) != np.asarray(init), axis=-1)
    rows, cols = np.nonzero(changed)
    assert changed.any() and rows.min() >= 30 - 6 and cols.min() >= 56 - 6  # within the mask blur's reach
    with pytest.raises(InvalidRequest, match="the mask is blank"):
        pipe.generate("otter", init_image=init, mask_image=box_mask(64, 40, (0, 0, 0, 0)), inpaint_only_masked=True)


# -- resize modes --------------------------------------------------------------------------------------------


def test_fit_crops_the_middle_or_stretches_the_edges():
    stripes = Image.fromarray(np.arange(8, dtype=np.uint8).reshape(2, 4) * 30)  # 4 x 2, no resampling needed below
    assert np.array_equal(np.asarray(fit(stripes, 2, 2, "crop")), np.asarray(stripes)[:, 1:3])
    filled = np.asarray(fit(stripes, 4, 4, "fill"))
    assert np.array_equal(filled[1:3], np.asarray(stripes))
    assert np.array_equal(filled[0], np.asarray(stripes)[0]) and np.array_equal(filled[3], np.asarray(stripes)[1])


@pytest.mark.parametrize("mode", ["crop", "fill"])
def test_resize_mode_fits_the_init_image_before_img2img(mode):
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    init = random_image(40, 16)
    request = {"steps": 4, "seed": SEED, "width": 16, "height": 16, "strength": 0.7}
    if mode == "crop":  # scaled to 16 high is 40 wide already: the middle 16 columns
        fitted = init.crop((12, 0, 28, 16))
    else:  # scaled to fit 16 wide: 16 x 6 in the middle, the rows above and below repeat its edge rows
        small = np.asarray(init.resize((16, 6), Image.Resampling.LANCZOS))
        fitted = Image.fromarray(np.concatenate([small[:1].repeat(5, 0), small, small[-1:].repeat(5, 0)]))
    result = pipe.generate("otter", init_image=init, resize_mode=mode, **request)
    expected = pipe.generate("otter", init_image=fitted, **request)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(expected.images[0]))


def test_resize_mode_latent_encodes_at_the_image_size_and_resizes_the_latents():
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    init = random_image(40, 24)
    started = first_unet_input(pipe, init_image=init, width=16, height=16, resize_mode="latent")
    generator = torch.Generator("cpu").manual_seed(SEED)
    clean = pipe.encode_samples(pipe.image_to_tensor(init, 40, 24), [generator])  # (1, 4, 12, 20)
    clean = F.interpolate(clean, size=(8, 8), mode="bilinear", align_corners=False)
    noise = torch.randn(clean.shape, generator=generator)
    schedule = Schedule.make(get_sampler("DDIM"), pipe.scheduler_config, STEPS, STRENGTH)
    torch.testing.assert_close(started, schedule.add_noise(clean, noise), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "request_fields,message",
    [
        ({"resize_mode": "stretch"}, "unknown resize mode"),
        ({"resize_mode": "latent", "mask": True}, "resize mode 'latent' is for img2img without a mask"),
        ({"masked_content": "noise", "mask": True}, "unknown masked content"),
        ({"masked_content": "fill"}, "describe inpainting: give a mask"),
        ({"inpaint_only_masked": True}, "describe inpainting: give a mask"),
        ({"inpaint_padding": -1, "mask": True}, "inpaint padding must be an integer"),
    ],
)
def test_bad_options_are_refused_by_name(request_fields, message):
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    request = dict(request_fields)
    if request.pop("mask", False):
        request["mask_image"] = box_mask(WIDTH, HEIGHT, (0, 0, 8, 8))
    with pytest.raises(InvalidRequest, match=message):
        pipe.generate("otter", steps=2, init_image=random_image(WIDTH, HEIGHT), **request)
