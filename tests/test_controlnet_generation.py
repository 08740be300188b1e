"""ControlNet in generation beyond diffusers' pipelines: A1111's control modes, hires fix, img2img's init image as the
control image, the infotext, and what is refused."""

import numpy as np
import pytest
import torch
from support.controlnet import control_image, make_tiny_controlnet
from support.tiny import make_tiny_components

from ldmkit import Pipeline
from ldmkit.control_units import ControlUnit
from ldmkit.controlnet import SOFT_INJECTION, ControlledUNet, prepare_controls
from ldmkit.errors import InvalidRequest
from ldmkit.metadata import parse_infotext
from ldmkit.params import HiresFix

WIDTH, HEIGHT = 24, 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    make_tiny_controlnet(1).save_pretrained(folder / "cn0")
    make_tiny_controlnet(1, cross_attention_dim=16).save_pretrained(folder / "wide_text")
    return folder


@pytest.fixture
def pipe(folder):
    return Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32, controlnet_dir=folder)


def unet_inputs(pipe, guided: bool):
    torch.manual_seed(0)
    batch = 4 if guided else 2
    sample = torch.randn(batch, 4, HEIGHT // 2, WIDTH // 2)
    context = torch.randn(batch, 77, 8)
    return sample, torch.tensor(500), context


def reference_output(pipe, controlnet, image, sample, t, context, scales, cond_only):
    """The UNet output with the ControlNet's residuals, each scaled, computed from the definition."""
    inputs, texts = (sample[2:], context[2:]) if cond_only else (sample, context)
    cond = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    down, mid = controlnet(inputs, t, texts, cond.expand(len(inputs), -1, -1, -1), return_dict=False)
    residuals = [r * s for r, s in zip([*down, mid], scales)]
    if cond_only:
        residuals = [torch.cat([torch.zeros_like(r), r]) for r in residuals]
    kwargs = {"down_block_additional_residuals": residuals[:-1], "mid_block_additional_residual": residuals[-1]}
    return pipe.unet(sample, t, encoder_hidden_states=context, return_dict=False, **kwargs)[0]


@pytest.mark.parametrize(
    ("mode", "guided", "cond_only", "soft"),
    [
        ("Balanced", True, False, False),
        ("My prompt is more important", True, False, True),
        ("ControlNet is more important", True, True, True),
        ("ControlNet is more important", False, False, True),  # no unconditional half to leave out
    ],
)
@torch.inference_mode()
def test_control_modes_are_the_extensions(pipe, folder, mode, guided, cond_only, soft):
    image = control_image()
    unit = ControlUnit(model="cn0", image=image, weight=0.7, control_mode=mode)
    controls = prepare_controls([unit], pipe.controlnets, pipe.unet, [(WIDTH, HEIGHT)], None, pipe.device, pipe.dtype)
    model = controls.prepared[0].model
    sample, t, context = unet_inputs(pipe, guided)
    unet = ControlledUNet(pipe.unet, controls.prepared, steps=1, guided=guided, size=(WIDTH, HEIGHT), hires=False)
    ours = unet(sample, t, encoder_hidden_states=context, return_dict=False)[0]
    count = 5  # the tiny ControlNet's residuals: 4 down-block ones and the mid block's (SD's have 12 + 1)
    scales = [0.7 * SOFT_INJECTION ** (count - 1 - i) for i in range(count)] if soft else [0.7] * count
    expected = reference_output(pipe, model, image, sample, t, context, scales, cond_only)
    assert torch.allclose(ours, expected, atol=1e-6)
    plain = pipe.unet(sample, t, encoder_hidden_states=context, return_dict=False)[0]
    assert (ours - plain).abs().max() > 1e-3
    if cond_only:
        assert torch.equal(ours[:2], plain[:2])  # the unconditional half is left alone


def test_soft_injection_weights_match_the_extensions_13_for_sd():
    weights = [SOFT_INJECTION ** float(12 - i) for i in range(13)]
    assert weights[-1] == 1.0 and round(weights[0], 4) == round(0.825**12, 4)


def generate(pipe, **kwargs):
    base = {"prompt": "otter", "steps": 4, "sampler": "DDIM", "seed": 3, "width": WIDTH, "height": HEIGHT}
    return pipe.generate(**{**base, **kwargs})


def as_array(result):
    return np.stack([np.asarray(im, dtype=np.int16) for im in result.images])


def test_img2img_uses_the_init_image_when_a_unit_has_none(pipe):
    init = control_image(5)
    implicit = generate(pipe, init_image=init, strength=0.7, controls=[ControlUnit(model="cn0")])
    explicit = generate(pipe, init_image=init, strength=0.7, controls=[ControlUnit(model="cn0", image=init)])
    without = generate(pipe, init_image=init, strength=0.7)
    assert np.array_equal(as_array(implicit), as_array(explicit))
    assert not np.array_equal(as_array(implicit), as_array(without))


@pytest.mark.parametrize(("hr_option", "guides"), [("Both", (True, True)), ("Low res only", (True, False)),
                                                   ("High res only", (False, True))])  # fmt: skip
def test_hires_fix_passes_follow_hr_option(pipe, monkeypatch, hr_option, guides):
    calls = []
    original = ControlledUNet.__call__
    monkeypatch.setattr(
        ControlledUNet, "__call__", lambda self, *a, **k: calls.append(self.size) or original(self, *a, **k)
    )
    unit = ControlUnit(model="cn0", image=control_image(), hr_option=hr_option)
    generate(pipe, hires=HiresFix(scale=2.0, strength=0.5, steps=4), controls=[unit])
    sizes = set(calls)
    assert ((WIDTH, HEIGHT) in sizes, (2 * WIDTH, 2 * HEIGHT) in sizes) == guides


def test_infotext_records_each_unit(pipe, folder):
    units = [
        ControlUnit(model="cn0", image=control_image(), module="canny", weight=0.5, guidance_end=0.8),
        ControlUnit(model=str(folder / "cn0"), image=control_image(1), control_mode="ControlNet is more important"),
    ]
    info = parse_infotext(generate(pipe, controls=units).infotexts[0])
    assert info["ControlNet 0"].startswith("Module: canny, Model: cn0 [")
    assert (
        "Weight: 0.5, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200"
        in (info["ControlNet 0"])
    )
    assert (
        "Guidance Start: 0.0, Guidance End: 0.8, Pixel Perfect: False, Control Mode: Balanced" in info["ControlNet 0"]
    )
    assert "Control Mode: ControlNet is more important" in info["ControlNet 1"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"controls": [ControlUnit(model="cn0")]}, "unit 0 has no image"),
        ({"controls": [ControlUnit(model="missing", image=control_image())]}, "unit 0: ControlNet 'missing' not found"),
        ({"controls": [ControlUnit(model="wide_text", image=control_image())]}, "'wide_text' is a 16-wide-text"),
        ({"controls": [ControlUnit(model="cn0", image=control_image(), weight=3)]}, "unit 0: weight"),
        ({"controls": ["cn0"]}, "must be a ControlUnit"),
    ],
)
def test_bad_units_are_refused_before_sampling(pipe, kwargs, message):
    with pytest.raises(InvalidRequest, match=message):
        generate(pipe, **kwargs)


def test_fast_path_compiled_unet_is_refused(pipe):
    pipe.apply(lambda state: state.with_transform("compiled:test", unet_forward=state.unet))
    with pytest.raises(InvalidRequest, match="fast path"):
        generate(pipe, controls=[ControlUnit(model="cn0", image=control_image())])
