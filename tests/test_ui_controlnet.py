"""The web UI's ControlNet panel through Gradio's HTTP API: a unit generates and is named in the infotext, the
preview shows the preprocessor's map, and the panel takes only files uploaded here, within max_input_pixels."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

pytest.importorskip("gradio", reason="server extras not installed (pip install -e .[server])")
sys.path.insert(0, str(Path(__file__).parent / "e2e"))

from serving import GatedPipeline, serve, serve_tiny
from support.controlnet import make_tiny_controlnet
from support.tiny import make_tiny_components
from test_ui_security import call, file_data, secret_png, upload

from ldmkit.metadata import parse_infotext
from ldmkit.server.app import create_app
from ldmkit.server.limits import ServerLimits
from ldmkit.server.ui_controlnet import NO_MODELS

MAX_PIXELS = 64 * 64


@pytest.fixture(scope="module")
def controlnet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("controlnets")
    make_tiny_controlnet(1).save_pretrained(folder / "control_sketch")
    return folder


@pytest.fixture(scope="module")
def server(controlnet_folder):
    folder = controlnet_folder
    pipe = GatedPipeline(make_tiny_components(), torch.device("cpu"), torch.float32, controlnet_dir=folder)
    with serve(create_app(pipe, limits=ServerLimits(max_input_pixels=MAX_PIXELS))) as url:
        yield url


def sketch() -> Image.Image:
    """A black bar drawn on a transparent canvas, as the pad sends a drawing."""
    pixels = np.zeros((16, 24, 4), np.uint8)
    pixels[6:10, 4:20, 3] = 255
    return Image.fromarray(pixels, "RGBA")


def editor_value(path: str | None) -> dict:
    """The ImageEditor's value as the page sends it: only the composite matters to the panel."""
    return {"background": None, "layers": [], "composite": None if path is None else file_data(path), "id": None}


def endpoint_values(url: str, endpoint: str, **by_label) -> list:
    """Every parameter's default, with those named by label (the first of each label) replaced."""
    parameters = requests.get(f"{url}/gradio_api/info", timeout=30).json()["named_endpoints"][endpoint]["parameters"]
    values = [p.get("parameter_default") for p in parameters]
    labels = [p["label"] for p in parameters]
    for label, value in {"Negative prompt": "", **by_label}.items():
        values[labels.index(label)] = value
    return values, labels


def served(file: dict) -> Image.Image:
    """An image the UI returned, fetched as the page fetches it."""
    response = requests.get(file["url"], timeout=30)
    response.raise_for_status()
    return Image.open(io.BytesIO(response.content))


def unit_inputs(values: list, labels: list, unit: int, **by_label) -> None:
    """Set unit `unit`'s fields: the panel's fields repeat per unit in the same order, so take the unit-th match."""
    for label, value in by_label.items():
        values[[i for i, name in enumerate(labels) if name == label][unit]] = value


def test_txt2img_with_a_sketched_unit_names_it_in_the_infotext_and_shows_its_map(server):
    title = requests.get(f"{server}/controlnet/model_list", timeout=30).json()["model_list"][0]
    path = upload(server, sketch())
    values, labels = endpoint_values(server, "/run", Prompt="otter", Steps=3, Width=24, Height=16)
    unit_inputs(
        values,
        labels,
        1,  # the second unit, so the values reach the unit they are given to
        **{
            "Enable": True,
            "Control image: draw (brush tool), or upload and draw over it": editor_value(path),
            "Model": title,
            "Preprocessor": "invert",
            "Control weight": 0.8,
            "Ending control step": 0.7,
            "Control mode": "My prompt is more important",
            "Resize mode": "Resize and Fill",
        },
    )
    values[labels.index("Seed (-1: random)")] = 5
    event, payload = call(server, "run", values)
    assert event == "complete", payload
    _preview, status, gallery, parameters, _texts = payload
    assert status.startswith("Done: 1 image(s)")
    info = parse_infotext(parameters)
    assert info["ControlNet 0"] == (
        f"Module: invert, Model: {title}, Weight: 0.8, Resize Mode: Resize and Fill, Processor Res: -1, "
        "Threshold A: -1, Threshold B: -1, Guidance Start: 0.0, Guidance End: 0.7, Pixel Perfect: False, "
        "Control Mode: My prompt is more important"
    )
    assert [item["caption"] for item in gallery] == ["seed 5", "ControlNet map 0"]
    control_map = np.asarray(served(gallery[1]["image"]).convert("RGB"))
    expected = np.zeros((16, 24, 3), np.uint8)  # the black bar on white, inverted: a white bar on black
    expected[6:10, 4:20] = 255
    assert np.array_equal(control_map, expected)


def test_preview_shows_the_preprocessors_map(server):
    drawing = Image.new("RGB", (24, 16), "white")
    drawing.paste((0, 0, 0), (4, 6, 20, 10))
    path = upload(server, drawing)
    event, payload = call(server, "txt2img_controlnet_0_preview", [editor_value(path), "threshold", 512, 100, 0])
    assert event == "complete", payload
    control_map = np.asarray(served(payload[0]))
    assert control_map.shape[:2] == (512, 768)  # processor_res is the short side
    assert set(np.unique(control_map)) == {0, 255}
    assert control_map[0, 0].tolist() == [255, 255, 255] and control_map[256, 384].tolist() == [0, 0, 0]


def test_the_panel_refuses_a_path_that_was_not_uploaded(server, tmp_path):
    event, payload = call(
        server, "txt2img_controlnet_0_preview", [editor_value(str(secret_png(tmp_path))), "none", 512, 0, 0]
    )
    assert event == "error" and "not uploaded by a user" in payload["error"]


def test_the_panel_applies_the_servers_input_pixel_limit(server):
    path = upload(server, Image.new("RGB", (65, 64), "white"))
    event, payload = call(server, "txt2img_controlnet_0_preview", [editor_value(path), "none", 512, 0, 0])
    assert event == "error" and f"max_input_pixels = {MAX_PIXELS}" in payload["error"]
    values, labels = endpoint_values(server, "/run", Prompt="otter", Steps=1, Width=16, Height=16)
    unit_inputs(
        values,
        labels,
        0,
        Enable=True,
        **{"Control image: draw (brush tool), or upload and draw over it": editor_value(path)},
    )
    event, payload = call(server, "run", values)
    assert event == "error" and f"max_input_pixels = {MAX_PIXELS}" in payload["error"]


def test_a_unit_is_validated_as_the_apis_units_are(server):
    path = upload(server, sketch())
    values, labels = endpoint_values(server, "/run", Prompt="otter", Steps=1, Width=16, Height=16)
    image = {"Control image: draw (brush tool), or upload and draw over it": editor_value(path)}
    unit_inputs(values, labels, 0, Enable=True, **image, **{"Starting control step": 0.8, "Ending control step": 0.2})
    event, payload = call(server, "run", values)
    assert event == "error"
    assert "ControlNet unit 0: guidance_start (0.8) must not be after guidance_end (0.2)" in payload["error"]


def test_an_empty_pad_in_txt2img_is_refused(server):
    values, labels = endpoint_values(server, "/run", Prompt="otter", Steps=1, Width=16, Height=16)
    unit_inputs(values, labels, 0, Enable=True)
    event, payload = call(server, "run", values)
    assert event == "error" and "ControlNet unit 0 has no image" in payload["error"]


def test_img2img_unit_with_an_empty_pad_uses_the_init_image(server):
    init = Image.new("RGB", (24, 16), "white")
    init.paste((0, 0, 0), (4, 6, 20, 10))
    values, labels = endpoint_values(
        server,
        "/run_1",
        Prompt="otter",
        Steps=2,
        Width=24,
        Height=16,
        **{"Init image": file_data(upload(server, init)), "Resize mode": "Just Resize"},
    )
    unit_inputs(values, labels, 0, Enable=True)  # the pad left as it is
    event, payload = call(server, "run_1", values)
    assert event == "complete", payload
    _preview, _status, gallery, parameters, _texts = payload
    assert 'ControlNet 0: "Module: invert, Model: control_sketch [' in parameters
    expected = np.zeros((16, 24, 3), np.uint8)  # the init image, inverted
    expected[6:10, 4:20] = 255
    assert np.array_equal(np.asarray(served(gallery[1]["image"]).convert("RGB")), expected)


def test_inpaint_unit_with_an_empty_pad_uses_the_init_image(server):
    init = Image.new("RGB", (24, 16), "white")
    init.paste((0, 0, 0), (4, 6, 20, 10))
    mask = Image.new("L", (24, 16), 0)
    mask.paste(255, (8, 4, 16, 12))
    values, labels = endpoint_values(
        server,
        "/run_2",
        Prompt="otter",
        Steps=2,
        Width=24,
        Height=16,
        **{
            "Init image": file_data(upload(server, init)),
            "Mask (white = repaint)": file_data(upload(server, mask.convert("RGB"))),
            "Resize mode": "Just Resize",
        },
    )
    unit_inputs(values, labels, 0, Enable=True)
    event, payload = call(server, "run_2", values)
    assert event == "complete", payload
    _preview, _status, gallery, parameters, _texts = payload
    assert 'ControlNet 0: "Module: invert, Model: control_sketch [' in parameters and "Mask blur: 4" in parameters
    expected = np.zeros((16, 24, 3), np.uint8)  # the init image, inverted
    expected[6:10, 4:20] = 255
    assert np.array_equal(np.asarray(served(gallery[1]["image"]).convert("RGB")), expected)


def test_refresh_lists_controlnets_added_since_start_up(server, controlnet_folder):
    make_tiny_controlnet(2).save_pretrained(controlnet_folder / "control_added")
    try:
        titles = requests.get(f"{server}/controlnet/model_list?update=true", timeout=30).json()["model_list"]
        assert [title.split(" [")[0] for title in titles] == ["control_added", "control_sketch"]
        event, payload = call(server, "inpaint_controlnet_1_refresh", [titles[1]])  # the one listed at start-up
        assert event == "complete", payload
        assert [choice[0] for choice in payload[0]["choices"]] == titles
        assert payload[0]["value"] == titles[1]  # the chosen one stays chosen
    finally:
        shutil.rmtree(controlnet_folder / "control_added")


def test_without_controlnets_the_panel_says_how_to_add_them():
    with serve_tiny() as (url, _pipe, _app):
        config = requests.get(f"{url}/config", timeout=30).text
    assert NO_MODELS in config
    assert "Preview map" not in config
