"""The official `openai` client against a real server over the tiny model: every Images API call it has, /v1/models,
and errors in OpenAI's shape (which the client turns into its own exception classes)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi", reason="server extras not installed")
openai = pytest.importorskip("openai", reason="server test extras not installed")

from e2e.serving import serve_tiny

from ldmkit.server.openai_api import edit_region


@pytest.fixture(scope="module")
def server():
    with serve_tiny(ui=True) as running:  # with the UI mounted at /: /v1's unknown paths must still be OpenAI's
        yield running


@pytest.fixture
def url(server):
    return server[0]


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png_file(image: Image.Image, name: str = "image.png") -> tuple[str, bytes, str]:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return (name, buffer.getvalue(), "image/png")


def test_models_list_the_loaded_model(client):
    names = [m.id for m in client.models.list()]
    assert len(names) == 1
    assert client.models.retrieve(names[0]).id == names[0]
    with pytest.raises(openai.NotFoundError, match="The model 'dall-e-3' does not exist"):
        client.models.retrieve("dall-e-3")


@pytest.mark.parametrize(("output_format", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats(client, output_format, pil_format):
    result = client.images.generate(model="gpt-image-1", prompt="a red cube", size="16x16", output_format=output_format)
    image = decoded(result.data[0].b64_json)
    assert image.format == pil_format and image.size == (16, 16) and result.output_format == output_format
    if output_format == "png":
        assert "Steps: 25" in image.info["parameters"]  # quality auto: ldmkit's default steps


def test_quality_picks_the_steps(client):
    for quality, steps in [("low", 10), ("medium", 20), ("high", 40), ("hd", 40), ("standard", 25)]:
        result = client.images.generate(prompt="a red cube", size="16x16", quality=quality)
        assert f"Steps: {steps}," in decoded(result.data[0].b64_json).info["parameters"]
        assert result.quality == quality


def test_url_format_is_a_data_url_of_the_format(client):
    result = client.images.generate(prompt="a red cube", size="16x16", response_format="url", output_format="jpeg")
    assert result.data[0].url.startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"style": "vivid"}, "style='vivid' is not supported"),
        ({"background": "transparent"}, "background"),
        ({"output_compression": 50}, "output_compression is for output_format jpeg or webp"),
        ({"extra_body": {"guidance": 3}}, "guidance: Extra inputs are not permitted"),
        ({"size": "17x16"}, "width must be a multiple of 8"),
    ],
)
def test_unsupported_parameters_are_refused_by_name(client, kwargs, reason):
    with pytest.raises(openai.BadRequestError, match=reason):
        client.images.generate(prompt="a red cube", **{"size": "16x16", **kwargs})


def test_edit_without_mask_is_img2img_and_with_a_mask_repaints_its_transparent_part(client):
    init = Image.new("RGB", (16, 16), (200, 30, 30))
    whole = client.images.edit(image=png_file(init), prompt="a blue cube")
    assert decoded(whole.data[0].b64_json).size == (16, 16) and whole.size == "16x16"
    assert "Denoising strength: 0.75" in decoded(whole.data[0].b64_json).info["parameters"]

    mask = Image.new("RGBA", (16, 16), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half transparent: repainted
    edited = client.images.edit(image=png_file(init), mask=png_file(mask, "mask.png"), prompt="x")
    parameters = decoded(edited.data[0].b64_json).info["parameters"]
    assert "Denoising strength: 1.0" in parameters and "Mask blur: 0" in parameters
    # the mask's transparent part is the inpainting mask's white (repainted) part
    region = np.asarray(edit_region(init, mask))
    assert (region[:, :8] == 255).all() and (region[:, 8:] == 0).all()
    rgba = init.convert("RGBA")
    rgba.paste((0, 0, 0, 0), (4, 4, 8, 8))  # DALL-E 2's edit: the image's own transparent part, without a mask
    assert np.asarray(edit_region(rgba, None)).sum() == 16 * 255 and edit_region(init, None) is None
    opaque = Image.new("RGBA", (16, 16), (0, 0, 0, 255))
    with pytest.raises(openai.BadRequestError, match="mask has no fully transparent pixel"):
        client.images.edit(image=png_file(init), mask=png_file(opaque, "mask.png"), prompt="x")
    with pytest.raises(openai.BadRequestError, match="image is not a readable image"):
        client.images.edit(image=("image.png", b"not an image", "image/png"), prompt="x")


def test_variations_are_img2img_with_an_empty_prompt(client):
    init = Image.new("RGB", (16, 16), (20, 120, 200))
    result = client.images.create_variation(image=png_file(init), n=2)
    images = [decoded(d.b64_json) for d in result.data]
    assert [i.size for i in images] == [(16, 16)] * 2 and "Denoising strength: 0.6" in images[0].info["parameters"]


def test_unknown_paths_and_methods_answer_in_openais_shape(url):
    for method, path, status in [
        ("GET", "/v1/nothing", 404),
        ("POST", "/v1/chat/completions", 404),
        ("GET", "/v1/images/generations", 405),
        ("DELETE", "/v1/models", 405),
    ]:
        response = requests.request(method, f"{url}{path}", timeout=10)
        error = response.json()["error"]
        assert response.status_code == status and error["type"] == "invalid_request_error" and error["message"]
    assert requests.get(f"{url}/v1/images/generations", timeout=10).headers["Allow"] == "POST"
