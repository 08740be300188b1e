"""The ControlNet extension's API over HTTP, with `webuiapi` as the real client: units in alwayson_scripts, the
/controlnet/* routes, and refusals naming the field."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="server extras not installed (pip install -e .[server])")
webuiapi = pytest.importorskip("webuiapi", reason="test extras not installed")

from e2e.serving import serve  # noqa: E402
from support.controlnet import make_tiny_controlnet  # noqa: E402
from support.tiny import make_tiny_components  # noqa: E402

from ldmkit import Pipeline  # noqa: E402
from ldmkit.metadata import parse_infotext, read_infotext  # noqa: E402
from ldmkit.server.app import create_app  # noqa: E402

FAST = {"width": 24, "height": 16, "steps": 3}


def sketch() -> Image.Image:
    pixels = np.full((16, 24, 3), 255, np.uint8)
    pixels[6:10, 4:20] = 0
    return Image.fromarray(pixels)


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    make_tiny_controlnet(1).save_pretrained(folder / "control_sketch")
    pipe = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32, controlnet_dir=folder)
    with serve(create_app(pipe, ui=False)) as url:
        yield url


@pytest.fixture
def api(server):
    host, port = server.removeprefix("http://").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port))


def test_lists_version_models_and_modules(api):
    assert api.controlnet_version() == 2
    (title,) = api.controlnet_model_list()
    assert title.startswith("control_sketch [") and title.endswith("]")
    assert api.controlnet_module_list() == ["none", "canny", "invert", "threshold", "scribble_xdog", "lineart_standard"]


def test_module_detail_describes_the_sliders(server):
    detail = requests.get(f"{server}/controlnet/module_list", timeout=10).json()["module_detail"]
    assert detail["canny"]["sliders"][1] == {
        "name": "Canny Low Threshold",
        "value": 100,
        "min": 1,
        "max": 255,
        "step": 1,
    }
    assert detail["none"] == {"model_free": True, "sliders": []}


def test_txt2img_with_webuiapi_controlnet_units(api, tmp_path):
    title = api.controlnet_model_list()[0]
    unit = webuiapi.ControlNetUnit(image=sketch(), module="invert", model=title, weight=0.8, guidance_end=0.7)
    result = api.txt2img(prompt="otter", seed=5, controlnet_units=[unit], alwayson_scripts={}, **FAST)
    assert len(result.images) == 2  # the image, then the unit's control map (save_detected_map defaults to true)
    control_map = np.asarray(result.images[1].convert("RGB"))
    assert np.array_equal(control_map, 255 - np.asarray(sketch()))  # "invert", fitted by "Resize and Fill" at 1:1
    result.images[0].save(tmp_path / "out.png", pnginfo=_pnginfo(result.info["infotexts"][0]))
    info = parse_infotext(read_infotext(tmp_path / "out.png"))
    assert info["ControlNet 0"].startswith(f"Module: invert, Model: {title}, Weight: 0.8, Resize Mode: Resize and Fill")
    # webuiapi's txt2img mutates its default alwayson_scripts={}: a fresh dict keeps the last call's units out
    plain = api.txt2img(prompt="otter", seed=5, alwayson_scripts={}, **FAST)
    assert not np.array_equal(np.asarray(plain.image), np.asarray(result.image))


def _pnginfo(text):
    from ldmkit.metadata import png_info

    return png_info(text)


def test_img2img_unit_without_image_uses_the_init_image(server):
    body = {
        "prompt": "otter",
        "init_images": [b64(sketch())],
        "denoising_strength": 0.6,
        "seed": 2,
        **FAST,
        "alwayson_scripts": {"controlnet": {"args": [{"model": "control_sketch", "save_detected_map": False}]}},
    }
    response = requests.post(f"{server}/sdapi/v1/img2img", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["images"]) == 1


def test_detect_runs_a_preprocessor(api):
    # webuiapi sends the images as "controlnet_images" (the extension reads "controlnet_input_images"; both work)
    result = api.controlnet_detect([sketch()], module="canny", processor_res=64, threshold_a=50, threshold_b=150)
    assert result.info == "Success"
    control_map = np.asarray(result.image)
    assert control_map.shape[:2] == (
        64,
        128,
    )  # short side 64; 96 rounds to a multiple of 64 and set(np.unique(control_map)) == {0, 255}


@pytest.mark.parametrize(
    ("scripts", "message"),
    [
        ({"controlnet": {"args": [{"model": "missing"}]}}, "args[0]: ControlNet 'missing' not found"),
        ({"controlnet": {"args": [{"model": "/etc/passwd"}]}}, "not found"),
        ({"controlnet": {"args": [{"model": "control_sketch", "weight": 9}]}}, "args[0]: weight"),
        ({"controlnet": {"args": [{"model": "control_sketch", "low_vram": True}]}}, "low_vram"),
        ({"controlnet": {"args": [{"model": "control_sketch", "module": "openpose"}]}}, "needs a preprocessor model"),
        ({"controlnet": {"args": [{"model": "control_sketch", "image": b64(sketch()), "oops": 1}]}}, "'oops'"),
        ({"controlnet": {"args": [{"model": "control_sketch"}]}}, "unit 0 has no image"),
        ({"ADetailer": {"args": [True]}}, "alwayson_scripts.ADetailer is not supported"),
        ({"controlnet": [1, 2]}, "{'args': [unit, ...]}"),
    ],
)
def test_bad_units_are_refused_with_400(server, scripts, message):
    body = {"prompt": "otter", **FAST, "alwayson_scripts": scripts}
    response = requests.post(f"{server}/sdapi/v1/txt2img", json=body, timeout=60)
    assert response.status_code == 400, response.text
    assert message in response.text


def test_detect_refuses_what_it_cannot_do(server):
    post = lambda body: requests.post(f"{server}/controlnet/detect", json=body, timeout=30)  # noqa: E731
    assert "controlnet_input_images is empty" in post({"controlnet_module": "canny"}).text
    assert (
        "needs a preprocessor model"
        in post({"controlnet_module": "depth_midas", "controlnet_input_images": [b64(sketch())]}).text
    )
    assert (
        post(
            {"controlnet_module": "canny", "controlnet_input_images": [b64(sketch())], "controlnet_masks": ["x"]}
        ).status_code
        == 400
    )
    assert (
        post({"controlnet_module": "canny", "controlnet_input_images": [b64(sketch())], "colour": 1}).status_code == 422
    )
