"""`ldm serve --oversize`: requests far over the model's native size run at the native size and are upscaled (or are
refused naming it), on both APIs; checked against the native-size generation upscaled by hand."""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image
from support.esrgan import esrgan_state_dict
from support.tiny import make_tiny_components

from ldmkit.errors import InvalidRequest
from ldmkit.metadata import parse_infotext
from ldmkit.params import GenerationParams
from ldmkit.pipeline import Pipeline
from ldmkit.upscalers import UpscalerLibrary

pytest.importorskip("fastapi", reason="server extras not installed (pip install -e .[server])")

from ldmkit.server.cli import oversize_policy  # noqa: E402
from ldmkit.server.native_size import OversizePolicy, native_side  # noqa: E402

CPU = torch.device("cpu")
NATIVE = 16  # the tiny model's: UNet sample_size 8 x VAE scale factor 2
HAS_SPANDREL = importlib.util.find_spec("spandrel") is not None


def tiny_pipe(upscalers_dir=None) -> Pipeline:
    return Pipeline(make_tiny_components(), CPU, torch.float32, upscalers_dir=upscalers_dir)


@pytest.fixture
def serve(tmp_path):
    """A test client of a server over the tiny model with the given policy (and tiny2x among its upscalers)."""
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    torch.save(esrgan_state_dict(scale=2, seed=1), tmp_path / "tiny2x.pth")
    clients = []

    def start(policy: OversizePolicy) -> TestClient:
        app = create_app(tiny_pipe(tmp_path), ui=False, oversize=policy)
        clients.append(TestClient(app, base_url="http://127.0.0.1").__enter__())
        return clients[-1]

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def decoded(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def assert_close(image: Image.Image, expected: Image.Image) -> None:
    """Equal but for rounding: the server's worker thread may sum floats in another order."""
    assert image.size == expected.size
    difference = np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int))
    assert difference.max() <= 3 and difference.mean() < 0.5


@pytest.mark.parametrize(
    ("size", "native_size"),
    [((512, 512), (128, 128)), ((1024, 1024), (128, 128)), ((512, 768), (104, 160)), ((2048, 256), (360, 48))],
)
def test_the_native_pixel_count_at_the_requests_aspect_ratio(size, native_size):
    assert (native_side(*size, 128), native_side(*size[::-1], 128)) == native_size


def test_only_sides_over_twice_the_native_size_change():
    policy = OversizePolicy("native")
    at_limit = GenerationParams("otter", width=32, height=24)
    assert policy.fit(at_limit, NATIVE) == (at_limit, None)
    run, size = policy.fit(GenerationParams("otter", width=40, height=16), NATIVE)
    assert (run.width, run.height, size) == (24, 8, (40, 16))  # 16x16 pixels at 5:2 is 25.3x10.1: multiples of 8
    with pytest.raises(InvalidRequest, match=r"size 40x16 is over this model's native size 16x16: .* at most 32"):
        OversizePolicy("refuse").fit(GenerationParams("otter", width=40, height=16), NATIVE)
    assert OversizePolicy("as-is").fit(GenerationParams("otter", width=400, height=400), NATIVE)[1] is None


def test_openai_1024_request_gets_the_native_generation_upscaled(serve):
    """The OpenAI client's default size, scaled to the tiny model: 4x its native side."""
    client = serve(OversizePolicy("native"))
    response = client.post("/v1/images/generations", json={"prompt": "a red cube", "size": "64x64", "quality": "low"})
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "64x64"
    image = decoded(response.json()["data"][0]["b64_json"])
    params = parse_infotext(image.info["parameters"])
    assert params["Size"] == "16x16" and params["Postprocess upscale to"] == "64x64"
    assert params["Postprocess upscaler"] == "Lanczos"
    native = tiny_pipe().generate("a red cube", steps=10, seed=int(params["Seed"]), width=16, height=16).images[0]
    assert_close(image, native.resize((64, 64), Image.Resampling.LANCZOS))


@pytest.mark.skipif(not HAS_SPANDREL, reason="the upscale extra is not installed (spandrel)")
def test_a1111_request_is_upscaled_by_the_policys_model(serve, tmp_path):
    from test_upscalers import spandrel_pass

    client = serve(OversizePolicy("native", "tiny2x"))
    body = {"prompt": "a red cube", "width": 64, "height": 48, "steps": 3, "seed": 5, "sampler_name": "Euler"}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    image = decoded(response.json()["images"][0])
    assert "Size: 16x16," in image.info["parameters"]
    assert image.info["parameters"].endswith("Postprocess upscale to: 64x48, Postprocess upscaler: tiny2x")
    native = tiny_pipe().generate("a red cube", steps=3, seed=5, width=16, height=16, sampler="Euler").images[0]
    twice = spandrel_pass(tmp_path / "tiny2x.pth", spandrel_pass(tmp_path / "tiny2x.pth", native))  # 16 -> 64
    assert_close(image, twice.resize((64, 48), Image.Resampling.LANCZOS))


def test_refuse_names_the_native_size_on_both_apis(serve):
    client = serve(OversizePolicy("refuse"))
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "otter", "width": 64, "height": 64, "steps": 2})
    assert response.status_code == 400 and "native size 16x16" in response.json()["detail"]
    response = client.post("/v1/images/generations", json={"prompt": "otter", "size": "1024x1024"})
    assert response.status_code == 400 and "native size 16x16" in response.json()["error"]["message"]


def test_as_is_runs_the_size_asked(serve):
    client = serve(OversizePolicy("as-is"))
    body = {"prompt": "otter", "width": 64, "height": 64, "steps": 2}
    image = decoded(client.post("/sdapi/v1/txt2img", json=body).json()["images"][0])
    assert image.size == (64, 64) and "Size: 64x64" in image.info["parameters"]
    assert "Postprocess" not in image.info["parameters"]


def test_serve_runs_the_shipped_model_natively_and_others_as_asked(tmp_path):
    class Loaded:
        upscalers = UpscalerLibrary()

    args = argparse.Namespace(model=None, oversize=None, oversize_upscaler=None)
    assert oversize_policy(args, Loaded) == OversizePolicy("native", "Lanczos")
    args.model = "sd15.safetensors"
    assert oversize_policy(args, Loaded).mode == "as-is"
    args.oversize, args.oversize_upscaler = "native", "nearest"
    assert oversize_policy(args, Loaded) == OversizePolicy("native", "Nearest")
    args.oversize_upscaler = "R-ESRGAN 4x+"
    with pytest.raises(InvalidRequest, match=r"--oversize-upscaler 'R-ESRGAN 4x\+' is not available"):
        oversize_policy(args, Loaded)


@pytest.mark.slow  # 47 s on the shared 2-core CPU
def test_the_shipped_model_answers_openais_default_1024_from_its_native_size():
    """What the `openai` client gets from `ldm serve` with no options: a 1024x1024 picture drawn at the shipped
    model's native size (from its config, whatever it is) and upscaled."""
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    pipe = Pipeline.from_pretrained(device="cpu")
    native = pipe.default_size
    policy = oversize_policy(argparse.Namespace(model=None, oversize=None, oversize_upscaler=None), pipe)
    with TestClient(create_app(pipe, ui=False, oversize=policy), base_url="http://127.0.0.1") as client:
        body = {"prompt": "a red apple", "size": "1024x1024", "quality": "low"}
        response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    image = decoded(response.json()["data"][0]["b64_json"])
    params = parse_infotext(image.info["parameters"])
    assert image.size == (1024, 1024) and params["Size"] == f"{native}x{native}"
    expected = pipe.generate("a red apple", steps=10, seed=int(params["Seed"]), width=native, height=native).images[0]
    assert_close(image, expected.resize((1024, 1024), Image.Resampling.LANCZOS))
