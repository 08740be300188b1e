"""A1111's refiner_checkpoint / refiner_switch_at, and /sdapi/v1/sd-models listing the server's SDXL models."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="server extras not installed (pip install -e .[server])")

from e2e.serving import serve  # noqa: E402
from support.sdxl import make_tiny_sdxl_components  # noqa: E402

from ldmkit.metadata import parse_infotext  # noqa: E402
from ldmkit.pipeline import Pipeline  # noqa: E402
from ldmkit.server.app import create_app  # noqa: E402

BODY = {"prompt": "a lighthouse", "steps": 6, "width": 16, "height": 16, "seed": 5, "sampler_name": "Euler"}


def pipeline(components) -> Pipeline:
    return Pipeline(components, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def models():
    return pipeline(make_tiny_sdxl_components(seed=0)), pipeline(make_tiny_sdxl_components(seed=4, kind="refiner"))


@pytest.fixture(scope="module")
def url(models):
    base, refiner = models
    with serve(create_app(base, ui=False, refiners=(refiner,))) as url:
        yield url


def txt2img(url, **body):
    return requests.post(f"{url}/sdapi/v1/txt2img", json={**BODY, **body}, timeout=120)


def test_sd_models_lists_the_served_model_and_its_refiners(url):
    models = requests.get(f"{url}/sdapi/v1/sd-models", timeout=10).json()
    assert [(m["model_name"], m["filename"]) for m in models] == [
        ("tiny-sdxl-base", "tiny-sdxl-base"),
        ("tiny-sdxl-refiner", "tiny-sdxl-refiner"),
    ]


@pytest.mark.parametrize("name", ["tiny-sdxl-refiner", "tiny-sdxl-refiner [0123456789]"])
def test_refiner_checkpoint_runs_the_refiner_as_the_python_api_does(url, models, name):
    base, refiner = models
    response = txt2img(url, refiner_checkpoint=name, refiner_switch_at=0.7)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    params = parse_infotext(info["infotexts"][0])
    assert params["Refiner"] == "tiny-sdxl-refiner" and params["Refiner switch at"] == "0.7"
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    expected = base.generate(
        "a lighthouse", steps=6, sampler="Euler", seed=5, width=16, height=16, guidance=7.0, refiner=refiner,
        refiner_switch=0.7,
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(expected))


def test_no_refiner_is_the_plain_model(url):
    for checkpoint in (None, "", "None"):
        response = txt2img(url, refiner_checkpoint=checkpoint, refiner_switch_at=0.8)
        assert response.status_code == 200
        assert "Refiner" not in parse_infotext(json.loads(response.json()["info"])["infotexts"][0])


@pytest.mark.parametrize(
    "body,message",
    [
        ({"refiner_checkpoint": "sd_xl_refiner_1.0"}, "refiner_checkpoint 'sd_xl_refiner_1.0' is not a model of"),
        ({"refiner_checkpoint": "tiny-sdxl-refiner", "refiner_switch_at": 1.2}, "refiner switch must be between"),
        ({"refiner_checkpoint": "tiny-sdxl-base"}, "the refiner is the base model itself"),
    ],
)
def test_bad_refiner_fields_are_400(url, body, message):
    response = txt2img(url, **body)
    assert response.status_code == 400 and message in response.text


@pytest.mark.parametrize("kind", ["base", "refiner"])
def test_the_ui_follows_the_sdxl_model_served_a_refiner_alone_included(kind):
    """The size sliders start at the model's size (1024 for SDXL; the tiny model's 16) and clip skip ranges over
    the layers every text encoder has (the refiner has bigG alone, no CLIP ViT-L)."""
    pytest.importorskip("gradio")
    from ldmkit.server.queue import GenerationQueue
    from ldmkit.server.ui import build_ui

    pipe = pipeline(make_tiny_sdxl_components(seed=0, kind=kind))
    components = {c["props"].get("elem_id"): c["props"] for c in build_ui(GenerationQueue(pipe)).config["components"]}
    assert components["txt2img-width"]["value"] == components["txt2img-height"]["value"] == pipe.default_size == 16
    assert components["txt2img-clip-skip"]["maximum"] == pipe.max_clip_skip == 3
