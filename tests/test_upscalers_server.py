"""Upscaler models in use: hires fix (Python API, CLI, A1111's txt2img) and A1111's extras and lists, on the tiny
model with a tiny random ESRGAN; results are checked against spandrel's model run directly."""

from __future__ import annotations

import base64
import importlib.util
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from support.esrgan import esrgan_state_dict
from support.tiny import make_tiny_components
from test_upscalers import random_image, spandrel_pass

from ldmkit.cli import main
from ldmkit.params import HiresFix
from ldmkit.pipeline import Pipeline

if importlib.util.find_spec("spandrel") is None:
    pytest.skip("the upscale extra is not installed (spandrel)", allow_module_level=True)
pytest.importorskip("fastapi", reason="server extras not installed (pip install -e .[server])")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("upscalers")
    torch.save(esrgan_state_dict(scale=2, seed=1), folder / "tiny2x.pth")
    return folder


@pytest.fixture(scope="module")
def client(folder):
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    app = create_app(Pipeline(make_tiny_components(), CPU, torch.float32, upscalers_dir=folder), ui=False)
    with TestClient(app, base_url="http://127.0.0.1") as running:
        yield running


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def unb64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


# -- hires fix ---------------------------------------------------------------------------------------


def test_hires_fix_upscales_the_first_pass_image_with_the_model(folder, monkeypatch):
    pipe = Pipeline(make_tiny_components(), CPU, torch.float32, upscalers_dir=folder)
    decoded, encoded = [], []
    to_images, to_latents = pipe.latents_to_images, pipe.images_to_latents
    monkeypatch.setattr(pipe, "latents_to_images", lambda latents: decoded.append(to_images(latents)) or decoded[-1])
    monkeypatch.setattr(pipe, "images_to_latents", lambda images: encoded.append(images) or to_latents(images))
    hires = HiresFix(scale=2.0, strength=0.5, upscaler="TINY2X")  # any case: the folder's spelling is recorded
    result = pipe.generate("a red cube", steps=3, seed=5, width=16, height=16, hires=hires)
    assert result.images[0].size == (32, 32)
    assert same(encoded[0][0], spandrel_pass(folder / "tiny2x.pth", decoded[0][0]))  # the image the 2nd pass starts at
    assert "Hires upscaler: tiny2x" in result.infotexts[0]


def test_a1111_hires_fix_with_a_model_upscaler_matches_the_python_api(client, folder):
    body = {"prompt": "a red cube", "width": 16, "height": 16, "steps": 3, "seed": 5, "sampler_name": "Euler"}
    response = client.post("/sdapi/v1/txt2img", json={**body, "enable_hr": True, "hr_upscaler": "tiny2x"})
    assert response.status_code == 200, response.text
    image = unb64(response.json()["images"][0])
    pipe = Pipeline(make_tiny_components(), CPU, torch.float32, upscalers_dir=folder)
    expected = pipe.generate(
        "a red cube", steps=3, seed=5, width=16, height=16, sampler="Euler", hires=HiresFix(2.0, 0.7, None, "tiny2x")
    ).images[0]
    difference = np.abs(np.asarray(image, dtype=int) - np.asarray(expected, dtype=int))
    assert image.size == (32, 32) and difference.max() <= 3 and difference.mean() < 0.5
    assert "Hires upscaler: tiny2x" in image.info["parameters"]


def test_hires_upscalers_not_present_are_refused_by_name(client):
    body = {"prompt": "a red cube", "width": 16, "height": 16, "steps": 3, "enable_hr": True}
    response = client.post("/sdapi/v1/txt2img", json={**body, "hr_upscaler": "R-ESRGAN 4x+"})
    assert response.status_code == 400
    assert (
        "hr_upscaler 'R-ESRGAN 4x+' is not available; upscalers here: None, Lanczos, Nearest, tiny2x"
        in (response.json()["detail"])
    )


def test_the_cli_refuses_an_unknown_hires_upscaler_before_loading(folder, tmp_path, capsys):
    code = main(
        ["generate", "otter", "--hires-scale", "2", "--hires-upscaler", "nope", "--upscalers-dir", str(folder)]
        + ["-o", str(tmp_path)]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("ldm: error: --hires-upscaler 'nope' is not available; upscalers here: None, Lanczos")


# -- lists --------------------------------------------------------------------------------------------


def test_upscalers_lists_the_resizes_and_the_models_present(client):
    client.post("/sdapi/v1/extra-single-image", json={"image": b64(random_image(8, 8)), "upscaler_1": "tiny2x"})
    listed = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "tiny2x"]
    assert listed[-1] == {
        "name": "tiny2x",
        "model_name": "tiny2x",
        "model_path": "tiny2x.pth",
        "model_url": None,
        "scale": 2.0,
    }
    assert client.get("/sdapi/v1/realesrgan-models").json() == [{"name": "tiny2x", "path": "tiny2x.pth", "scale": 2}]


# -- extras ------------------------------------------------------------------------------------------


def test_extras_upscale_with_the_model(client, folder):
    image = random_image(20, 12)
    response = client.post(
        "/sdapi/v1/extra-single-image", json={"image": b64(image), "upscaler_1": "tiny2x", "upscaling_resize": 2}
    )
    assert response.status_code == 200, response.text
    assert same(unb64(response.json()["image"]), spandrel_pass(folder / "tiny2x.pth", image))
    assert response.json()["html_info"] == "<p>Postprocess upscaler: tiny2x</p>"


def test_extras_blend_a_second_upscaler_by_its_visibility(client, folder):
    image = random_image(20, 12)
    body = {"image": b64(image), "upscaler_1": "tiny2x", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.3}
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 200, response.text
    nearest = image.resize((40, 24), Image.Resampling.NEAREST)
    assert same(unb64(response.json()["image"]), Image.blend(spandrel_pass(folder / "tiny2x.pth", image), nearest, 0.3))


def test_extras_to_a_size_cover_it_then_crop_the_centre(client, folder):
    image = random_image(20, 12)
    body = {"image": b64(image), "upscaler_1": "tiny2x", "resize_mode": 1}
    response = client.post(
        "/sdapi/v1/extra-single-image", json={**body, "upscaling_resize_w": 30, "upscaling_resize_h": 30}
    )
    assert response.status_code == 200, response.text
    # 30x30 from 20x12: the model covers 50x30 (two 2x passes, then Lanczos), whose centre is cut
    twice = spandrel_pass(folder / "tiny2x.pth", spandrel_pass(folder / "tiny2x.pth", image))
    expected = twice.resize((50, 30), Image.Resampling.LANCZOS).crop((10, 0, 40, 30))
    assert same(unb64(response.json()["image"]), expected)


def test_extras_batch_upscales_every_image(client, folder):
    images = [random_image(10, 6, seed) for seed in (1, 2)]
    body = {"imageList": [{"data": b64(i), "name": f"{n}.png"} for n, i in enumerate(images)], "upscaler_1": "tiny2x"}
    response = client.post("/sdapi/v1/extra-batch-images", json=body)
    assert response.status_code == 200, response.text
    results = [unb64(text) for text in response.json()["images"]]
    assert all(same(r, spandrel_pass(folder / "tiny2x.pth", i)) for r, i in zip(results, images))


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1 'R-ESRGAN 4x+' is not available; upscalers here: None,"),
        (
            {"upscaler_2": "SwinIR 4x", "extras_upscaler_2_visibility": 0.5},
            "upscaler_2 'SwinIR 4x' is not available; upscalers here:",
        ),
        ({"extras_upscaler_2_visibility": 1.5}, "extras_upscaler_2_visibility must be from 0 to 1, got 1.5"),
    ],
)
def test_extras_refusals_name_the_field(client, fields, reason):
    response = client.post("/sdapi/v1/extra-single-image", json={"image": b64(random_image(20, 12)), **fields})
    assert response.status_code == 400, response.text
    assert reason in json.loads(response.text)["detail"]


def test_ldm_generate_runs_hires_fix_with_a_model_of_the_folder(folder, tmp_path):
    from ldmkit.loading import save_pretrained
    from ldmkit.metadata import read_infotext

    save_pretrained(make_tiny_components(), tmp_path / "tiny")
    argv = ["generate", "a red cube", "--model", str(tmp_path / "tiny"), "--device", "cpu", "--steps", "3"]
    argv += ["--seed", "5", "--hires-scale", "2", "--hires-upscaler", "tiny2x", "--upscalers-dir", str(folder)]
    assert main([*argv, "-o", str(tmp_path / "out")]) == 0
    (written,) = (tmp_path / "out").glob("*.png")
    assert Image.open(written).size == (32, 32) and "Hires upscaler: tiny2x" in read_infotext(written)
