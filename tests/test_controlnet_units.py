"""ControlUnit: validation, the A1111 extension's unit JSON as real clients send it, and the infotext line."""

import base64
import io

import pytest
import webuiapi
from PIL import Image

from ldmkit.control_units import ControlUnit, strip_model_hash
from ldmkit.errors import InvalidRequest


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(text: str, what: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


SKETCH = Image.new("RGB", (40, 24), (255, 255, 255))


def test_webuiapi_unit_parses_to_the_same_values():
    unit = webuiapi.ControlNetUnit(
        image=SKETCH,
        module="canny",
        model="control_v11p_sd15_canny [d14c016b]",
        weight=0.8,
        guidance_start=0.1,
        guidance_end=0.9,
        control_mode=2,
        pixel_perfect=True,
        threshold_a=50,
        threshold_b=150,
    )
    parsed = ControlUnit.from_a1111(unit.to_dict(), decode)
    assert parsed.model_name == "control_v11p_sd15_canny"
    assert parsed.module == "canny" and parsed.weight == 0.8
    assert (parsed.guidance_start, parsed.guidance_end) == (0.1, 0.9)
    assert parsed.control_mode == "ControlNet is more important"
    assert parsed.resize_mode == "Resize and Fill"  # webuiapi's default
    assert (parsed.threshold_a, parsed.threshold_b, parsed.processor_res) == (50, 150, 512)
    assert parsed.pixel_perfect is True and parsed.hr_option == "Both"
    assert parsed.image.size == SKETCH.size and parsed.image.getpixel((0, 0)) == (255, 255, 255)


def test_webuiapi_defaults_parse():
    parsed = ControlUnit.from_a1111(webuiapi.ControlNetUnit(image=SKETCH, model="cn").to_dict(), decode)
    assert parsed.module == "none" and parsed.control_mode == "Balanced" and parsed.weight == 1.0


def test_disabled_units_are_skipped_and_enabled_defaults_to_true():
    assert ControlUnit.from_a1111({"enabled": False, "model": "None"}, decode) is None
    assert ControlUnit.from_a1111({"model": "cn"}, decode).model == "cn"


def test_the_extensions_raw_json_with_legacy_names_and_minus_one_defaults():
    parsed = ControlUnit.from_a1111(
        {
            "input_image": png_base64(SKETCH),
            "module": "canny",
            "model": "cn",
            "lowvram": False,
            "guidance": 0.5,
            "threshold_a": -1,
            "threshold_b": -1,
            "processor_res": -1,
            "resize_mode": 0,
            "control_mode": "My prompt is more important",
        },
        decode,
    )
    assert parsed.image.size == SKETCH.size and parsed.guidance_end == 0.5
    assert (parsed.threshold_a, parsed.threshold_b, parsed.processor_res) == (None, None, None)
    assert parsed.resize_mode == "Just Resize" and parsed.control_mode == "My prompt is more important"


@pytest.mark.parametrize(
    ("resize_mode", "expected"),
    [(1, "Crop and Resize"), (2, "Resize and Fill"), (3, "Just Resize"),
     ("Inner Fit (Scale to Fit)", "Crop and Resize"), ("Envelope (Outer Fit)", "Resize and Fill"),
     ("just resize", "Just Resize")],
)  # fmt: skip
def test_resize_mode_forms(resize_mode, expected):
    assert ControlUnit.from_a1111({"model": "cn", "resize_mode": resize_mode}, decode).resize_mode == expected


@pytest.mark.parametrize(
    ("unit", "field"),
    [
        ({"model": "cn", "colour": 1}, "colour"),
        ({"model": "cn", "low_vram": True}, "low_vram"),
        ({"model": "cn", "guessmode": True}, "guess_mode"),
        ({"model": "cn", "advanced_weighting": [1.0] * 13}, "advanced_weighting"),
        ({"model": "cn", "mask": png_base64(SKETCH)}, "mask"),
        ({"model": "cn", "image": {"image": png_base64(SKETCH), "mask": png_base64(SKETCH)}}, "mask"),
        ({"model": "cn", "weight": 2.5}, "weight"),
        ({"model": "cn", "weight": True}, "weight"),
        ({"model": "cn", "guidance_start": 0.6, "guidance_end": 0.4}, "guidance_start"),
        ({"model": "cn", "guidance_end": 1.5}, "guidance_end"),
        ({"model": "cn", "control_mode": 3}, "control_mode"),
        ({"model": "cn", "resize_mode": "Stretch"}, "resize_mode"),
        ({"model": "cn", "hr_option": "Sometimes"}, "hr_option"),
        ({"model": "cn", "module": "canny", "threshold_a": 0}, "threshold_a"),
        ({"model": "cn", "module": "canny", "processor_res": 4096}, "processor_res"),
        ({"model": "cn", "module": "openpose"}, "openpose"),
        ({"model": "None"}, "model"),
        ({"model": "cn", "pixel_perfect": "yes"}, "pixel_perfect"),
        ({"model": "cn", "enabled": "yes"}, "enabled"),
        ({"model": "cn", "input_image": "x", "image": "y"}, "input_image"),
    ],
)
def test_unsupported_or_bad_values_are_refused_naming_the_field(unit, field):
    with pytest.raises(InvalidRequest, match=field):
        ControlUnit.from_a1111(unit, decode)


def test_threshold_fields_of_a_module_without_them_are_not_applicable():
    # webuiapi sends threshold_a/b = 64 with every unit; the extension ignores them for modules without sliders.
    unit = ControlUnit.from_a1111({"model": "cn", "module": "invert", "threshold_a": 64, "threshold_b": 64}, decode)
    assert "Threshold A: -1, Threshold B: -1" in unit.infotext("cn")


def test_infotext_is_the_extensions_unit_line():
    unit = ControlUnit(model="cn", module="canny", threshold_a=50, guidance_end=0.75)
    assert unit.infotext("control_v11p_sd15_canny [d14c016b]") == (
        "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0, Resize Mode: Crop and Resize, "
        "Processor Res: 512, Threshold A: 50, Threshold B: 200, Guidance Start: 0.0, Guidance End: 0.75, "
        "Pixel Perfect: False, Control Mode: Balanced"
    )


def test_model_titles_lose_their_hash():
    assert strip_model_hash("control_v11p_sd15_canny [d14c016b]") == "control_v11p_sd15_canny"
    assert strip_model_hash("my [model]") == "my [model]"
