"""Tiling (seamless textures): circular padding in the UNet's and VAE decoder's convolutions, for one request."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_components

from ldmkit import Pipeline
from ldmkit.errors import InvalidRequest
from ldmkit.metadata import parse_infotext
from ldmkit.tiling import circular_padding

SIZE = {"width": 24, "height": 16}


def pixels(result):
    return np.asarray(result.images[0])


def test_a_conv_in_the_context_pads_circularly_and_pads_as_before_after():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(1, 3, 6, 7)
    with circular_padding(conv):
        inside = conv(x)
    wrapped = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), conv.weight, conv.bias)
    torch.testing.assert_close(inside, wrapped, rtol=0, atol=1e-6)
    assert conv.padding_mode == "zeros"
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1), rtol=0, atol=1e-6)


def test_tiled_models_are_shift_equivariant_as_a_seamless_texture_needs():
    """With every convolution wrapping around, a circular shift of the input shifts the output the same way:
    the UNet at the latents' size (an even shift, for its one downsampling), the decoder by its factor 2."""
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    latents = torch.randn(1, 4, 8, 12)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim)
    roll = lambda x, k: torch.roll(x, shifts=(k, 2 * k), dims=(-2, -1))  # noqa: E731
    unet = lambda x: pipe.unet(x, 500, encoder_hidden_states=context).sample  # noqa: E731
    decode = lambda z: pipe.vae.decode(z).sample  # noqa: E731
    with torch.no_grad(), pipe.tiling_applied(True):
        torch.testing.assert_close(unet(roll(latents, 2)), roll(unet(latents), 2), rtol=0, atol=1e-5)
        torch.testing.assert_close(decode(roll(latents, 1)), roll(decode(latents), 2), rtol=0, atol=1e-5)
    with torch.no_grad():  # zero padding: the edges are edges
        assert not torch.allclose(unet(roll(latents, 2)), roll(unet(latents), 2), atol=1e-3)


def test_tiling_changes_the_image_for_its_request_only_and_is_recorded():
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    plain = pipe.generate("otter", steps=3, seed=1, **SIZE)
    seen = []
    tiled = pipe.generate(
        "otter", steps=3, seed=1, tiling=True, **SIZE, callback=lambda step: seen.append(pipe.state.transforms)
    )
    again = pipe.generate("otter", steps=3, seed=1, **SIZE)
    assert not np.array_equal(pixels(tiled), pixels(plain))
    assert np.array_equal(pixels(again), pixels(plain))  # the model is exactly as it was
    assert seen and all(transforms == ("tiling",) for transforms in seen) and pipe.state.transforms == ()
    convs = [m for m in [*pipe.unet.modules(), *pipe.vae.modules()] if isinstance(m, torch.nn.Conv2d)]
    assert {conv.padding_mode for conv in convs} == {"zeros"}
    assert parse_infotext(tiled.infotexts[0])["Tiling"] == "True" and "Tiling" not in plain.infotexts[0]


def test_tiling_is_refused_where_the_padding_would_not_reach():
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    pipe.enable_vae_tiling(16)
    with pytest.raises(InvalidRequest, match="tiling is not supported with VAE tiling"):
        pipe.generate("otter", steps=2, tiling=True, **SIZE)
    compiled = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    compiled.apply(lambda state: state.with_transform("compiled:default"))  # what fast.make_fast records
    with pytest.raises(InvalidRequest, match="not supported on the fast path"):
        compiled.generate("otter", steps=2, tiling=True, **SIZE)
    with pytest.raises(InvalidRequest, match="tiling must be true or false"):
        compiled.generate("otter", steps=2, tiling="yes", **SIZE)
