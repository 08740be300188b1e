"""`ldm serve`'s AUTOMATIC1111 API for hires fix, inpainting, clip skip, LoRA and embeddings, on the tiny model."""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil

import numpy as np
import pytest
import requests
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="server extras not installed (pip install -e .[server])")

from conftest import make_tiny_components
from e2e.serving import GatedPipeline, serve, serve_tiny
from test_embeddings import save_a1111_pt, vectors
from test_lora import kohya_lora

from ldmkit.params import GenerationParams
from ldmkit.pipeline import Pipeline
from ldmkit.server import cli
from ldmkit.server.a1111 import HR_UPSCALERS, _decode_mask
from ldmkit.server.app import create_app

FAST = {"width": 16, "height": 16, "steps": 3, "seed": 5}  # the tiny model's native size


@pytest.fixture(scope="module")
def url():
    with serve_tiny(ui=False) as (url, _, _):
        yield url


def png_b64(image: Image.Image, data_url: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    text = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{text}" if data_url else text


def png_from_b64(text: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def post(url: str, route: str, **body) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/{route}", json={"prompt": "a red cube", **FAST, **body}, timeout=60)


def reference(pipe: Pipeline | None = None, **params) -> np.ndarray:
    """The pixels ldmkit's Python API makes for the request `post` sends with these parameters (a fresh tiny
    pipeline: the same weights as the server's), to compare the server's answer with."""
    pipe = pipe or Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32)
    request = {"prompt": "a red cube", "width": 16, "height": 16, "steps": 3, "seed": 5, "sampler": "Euler", **params}
    return pixels(pipe.run(GenerationParams(**request)).images[0])


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=int)


def assert_same_image(image: Image.Image, expected: np.ndarray) -> None:
    """Equal but for rounding: the server's worker thread may sum floats in another order, which the tiny random
    model amplifies to a level or two here and there (images that differ in content differ by far more)."""
    difference = np.abs(pixels(image) - expected)
    assert difference.max() <= 3 and difference.mean() < 0.5


def generated(response: requests.Response) -> tuple[Image.Image, dict]:
    """The first image and the info of a successful answer."""
    assert response.status_code == 200, response.text
    body = response.json()
    return png_from_b64(body["images"][0]), json.loads(body["info"])


# -- hires fix --------------------------------------------------------------------------------------


def test_hires_fix_gives_the_upscaled_size_and_says_so_in_the_parameters(url):
    image, info = generated(
        post(url, "txt2img", enable_hr=True, hr_scale=2, hr_second_pass_steps=4, denoising_strength=0.6)
    )
    assert image.size == (32, 32)
    text = image.info["parameters"]
    assert "Hires upscale: 2" in text and "Hires steps: 4" in text and "Hires upscaler: Latent" in text
    assert "Denoising strength: 0.6" in text and "Size: 16x16" in text  # A1111 writes the first pass's size
    assert info["denoising_strength"] == 0.6 and info["infotexts"][0] == text


def test_hires_fix_defaults_and_pixel_upscalers(url):
    image, _ = generated(post(url, "txt2img", enable_hr=True))
    assert image.size == (32, 32) and "Denoising strength: 0.7" in image.info["parameters"]  # A1111's default
    image, _ = generated(post(url, "txt2img", enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos"))
    assert image.size == (24, 24) and "Hires upscaler: Lanczos" in image.info["parameters"]
    refused = post(url, "txt2img", enable_hr=True, hr_upscaler="R-ESRGAN 4x+")  # a model this server does not have
    assert refused.status_code == 400 and "hr_upscaler 'R-ESRGAN 4x+' is not available" in refused.json()["detail"]
    image, _ = generated(post(url, "txt2img", enable_hr=True, hr_upscaler="Latent (bicubic antialiased)"))
    assert "Hires upscaler: Latent" in image.info["parameters"]


def test_hires_fix_is_off_unless_enabled(url):
    image, _ = generated(post(url, "txt2img", hr_scale=2, denoising_strength=0.3))
    assert image.size == (16, 16) and "Hires" not in image.info["parameters"]
    assert "Denoising strength" not in image.info["parameters"]


@pytest.mark.parametrize(
    ("resize", "size"),
    [
        ({"hr_resize_x": 32}, (32, 32)),
        ({"hr_resize_y": 24}, (24, 24)),
        ({"hr_resize_x": 40, "hr_resize_y": 40}, (40, 40)),
    ],
)
def test_hires_resize_sets_the_target_size(url, resize, size):
    image, _ = generated(post(url, "txt2img", enable_hr=True, **resize))
    assert image.size == size


def test_hires_resize_of_another_aspect_ratio_covers_then_cuts_the_middle_as_a1111(url):
    image, _ = generated(post(url, "txt2img", enable_hr=True, hr_resize_x=40, hr_resize_y=24))
    assert image.size == (40, 24)  # 16x16 upscaled to cover it (40x40), then its middle 40x24
    assert "Hires resize: 40x24" in image.info["parameters"] and "Hires upscale:" not in image.info["parameters"]


def test_hires_resize_below_the_base_size_runs_a_smaller_second_pass_as_a1111(url):
    image, _ = generated(post(url, "txt2img", enable_hr=True, width=24, height=16, hr_resize_x=16))
    assert image.size == (16, 8)  # 16 wide keeps 3:2 at 10.7 high, rounded down to a multiple of 8


def test_the_hires_pass_fields_and_tiling_reach_the_pipeline(url):
    from ldmkit.params import HiresFix

    hr = {"hr_prompt": "a blue cube", "hr_negative_prompt": "blurry", "hr_sampler_name": "DDIM"}
    image, _ = generated(post(url, "txt2img", enable_hr=True, hr_scale=1.5, sampler_name="Euler", **hr))
    hires = HiresFix(1.5, 0.7, prompt="a blue cube", negative_prompt="blurry", sampler="DDIM")
    assert_same_image(image, reference(hires=hires))
    assert "Hires prompt: a blue cube" in image.info["parameters"] and "Hires sampler: DDIM" in image.info["parameters"]
    # "Use same sampler" with a schedule type: the first pass's sampler on it
    same = {"hr_sampler_name": "Use same sampler", "hr_scheduler": "Karras"}
    image, _ = generated(post(url, "txt2img", enable_hr=True, hr_scale=1.5, sampler_name="Euler", **same))
    assert_same_image(image, reference(hires=HiresFix(1.5, 0.7, sampler="Euler Karras")))
    image, _ = generated(post(url, "txt2img", tiling=True, sampler_name="Euler"))
    assert_same_image(image, reference(tiling=True))
    assert "Tiling: True" in image.info["parameters"]


@pytest.mark.parametrize(("mode", "name"), [(1, "crop"), (2, "fill"), (3, "latent")])
def test_img2img_resize_modes_reach_the_pipeline(url, mode, name):
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 40, 3), dtype=np.uint8))
    image, _ = generated(post(url, "img2img", init_images=[png_b64(init)], resize_mode=mode, sampler_name="Euler"))
    assert_same_image(image, reference(init_image=init, resize_mode=name))


def test_hires_resize_to_an_odd_size_keeps_the_aspect_ratio(url):
    image, _ = generated(post(url, "txt2img", enable_hr=True, width=24, height=16, hr_resize_y=40))
    assert image.size == (56, 40)  # 24 * 40/16 = 60, rounded down to a multiple of 8, as hr_scale would be


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"hr_upscaler": "Waifu2x"}, "hr_upscaler 'Waifu2x' is not available (no upscalers folder is set"),
        ({"hr_scale": 0}, "hires scale must be above 0 and at most 4"),
        ({"hr_scale": 9}, "hires scale must be above 0 and at most 4"),
        ({"denoising_strength": 0}, "hires strength must be in (0, 1]"),
        ({"denoising_strength": 1.5}, "hires strength must be in (0, 1]"),
        ({"hr_second_pass_steps": -2}, "hr_second_pass_steps must be from 0"),
        ({"hr_second_pass_steps": 1001}, "hr_second_pass_steps must be from 0"),
        ({"hr_second_pass_steps": 500}, "max_steps"),  # the server's limit, below the pipeline's
        ({"hr_second_pass_steps": 1, "denoising_strength": 0.5}, "leave no denoising step"),
        ({"hr_resize_x": 20}, "multiples of 8"),
        ({"hr_resize_x": -16}, "must be from 1 to"),
        ({"hr_resize_y": 10**400}, "must be from 1 to"),
        ({"hr_scale": 4, "width": 1024, "height": 1024}, "max_pixels"),
    ],
)
def test_bad_hires_values_are_refused_with_a_reason(url, fields, reason):
    response = post(url, "txt2img", enable_hr=True, **fields)
    assert response.status_code == 400, response.text
    assert reason in response.json()["detail"]


@pytest.mark.parametrize("scale", ["NaN", "Infinity"])
def test_non_finite_hires_scale_is_refused(url, scale):
    body = f'{{"prompt": "a cube", "width": 16, "height": 16, "steps": 3, "enable_hr": true, "hr_scale": {scale}}}'
    response = requests.post(
        f"{url}/sdapi/v1/txt2img", data=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code in (400, 422), response.text


def test_openapi_schema_describes_the_new_fields(url):
    schemas = requests.get(f"{url}/openapi.json", timeout=10).json()["components"]["schemas"]
    assert {"enable_hr", "hr_scale", "hr_upscaler", "override_settings"} <= set(schemas["Txt2ImgRequest"]["properties"])
    assert {"mask", "mask_blur", "inpainting_mask_invert"} <= set(schemas["Img2ImgRequest"]["properties"])


def test_upscaler_lists_name_what_hr_upscaler_takes(url):
    upscalers = [u["name"] for u in requests.get(f"{url}/sdapi/v1/upscalers", timeout=10).json()]
    latent = [m["name"] for m in requests.get(f"{url}/sdapi/v1/latent-upscale-modes", timeout=10).json()]
    assert upscalers == ["None", "Lanczos", "Nearest"]  # without --upscalers-dir, the resizes alone
    assert sorted(latent) == sorted(name for name, kind in HR_UPSCALERS.items() if kind == "latent")


# -- inpainting -------------------------------------------------------------------------------------


def half_mask(size=(24, 16)) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, (0, 0, size[0] // 2, size[1]))
    return mask


@pytest.mark.parametrize("data_url", [False, True])
def test_inpainting_keeps_the_init_size_and_writes_the_mask_blur(url, data_url):
    init = Image.new("RGB", (24, 16), (200, 30, 30))
    body = {
        "init_images": [png_b64(init)],
        "mask": png_b64(half_mask(), data_url),
        "mask_blur": 2,
        "width": 24,
        "denoising_strength": 1.0,
    }
    image, info = generated(post(url, "img2img", **body))
    assert image.size == (24, 16)
    assert "Mask blur: 2" in image.info["parameters"] and "Denoising strength: 1.0" in image.info["parameters"]
    assert info["denoising_strength"] == 1.0 and info["is_using_inpainting_conditioning"] is False  # a regular UNet


def test_inverted_mask_repaints_the_other_part(url):
    green = Image.new("RGB", (16, 16), (30, 200, 30))
    init, mask = png_b64(green), png_b64(half_mask((16, 16)))
    plain, _ = generated(post(url, "img2img", init_images=[init], mask=mask, sampler_name="Euler"))
    inverted, _ = generated(
        post(url, "img2img", init_images=[init], mask=mask, inpainting_mask_invert=1, sampler_name="Euler")
    )
    other_half = half_mask((16, 16)).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    a1111_defaults = {"inpaint_only_masked": True, "inpaint_padding": 0, "masked_content": "fill"}
    assert_same_image(plain, reference(init_image=green, mask_image=half_mask((16, 16)), **a1111_defaults))
    assert_same_image(inverted, reference(init_image=green, mask_image=other_half, **a1111_defaults))
    assert np.abs(pixels(plain) - pixels(inverted)).max() > 8  # the two references differ: the test can fail
    assert "Mask blur: 4" in plain.info["parameters"]  # A1111's default


def test_a1111_reads_an_rgba_mask_with_transparency_as_its_alpha():
    painted = Image.new("RGBA", (4, 2), (0, 0, 0, 0))
    painted.putpixel((0, 0), (255, 0, 0, 255))  # a red stroke on a transparent layer: repaint there
    mask = _decode_mask(png_b64(painted), invert=False)
    assert mask.mode == "L" and list(mask.tobytes()) == [255, 0, 0, 0, 0, 0, 0, 0]
    assert list(_decode_mask(png_b64(painted), invert=True).tobytes()) == [0, 255, 255, 255, 255, 255, 255, 255]
    opaque_white = Image.new("RGBA", (2, 1), (255, 255, 255, 255))
    assert list(_decode_mask(png_b64(opaque_white), invert=False).tobytes()) == [255, 255]


def huge_png_b64() -> str:
    buffer = io.BytesIO()
    Image.new("1", (5000, 5000)).save(buffer, format="PNG")  # tiny file, 25 million pixels
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"mask": "not base64!"}, "mask is not valid base64"),
        ({"mask": base64.b64encode(b"GIF89a nonsense").decode()}, "mask is not a readable image"),
        ({"mask": "HUGE"}, "mask is 5000x5000, over"),
        ({"mask_blur": -1}, "mask blur must be an integer from 0 to 64"),
        ({"mask_blur": 65}, "mask blur must be an integer from 0 to 64"),
        ({"inpainting_mask_invert": 2}, "inpainting_mask_invert must be 0 or 1"),
        ({"mask_blur": 10**400}, "mask blur must be an integer from 0 to 64"),
    ],
)
def test_bad_inpainting_values_are_refused_with_a_reason(url, fields, reason):
    body = {"init_images": [png_b64(Image.new("RGB", (16, 16)))], "mask": png_b64(half_mask((16, 16))), **fields}
    if body["mask"] == "HUGE":
        body["mask"] = huge_png_b64()
    response = post(url, "img2img", **body)
    assert response.status_code == 400, response.text
    assert reason in response.json()["detail"]


def test_a_mask_without_an_init_image_is_refused(url):
    response = post(url, "img2img", mask=png_b64(half_mask()))
    assert response.status_code == 400 and "init_images" in response.json()["detail"]


# -- clip skip --------------------------------------------------------------------------------------


def test_clip_skip_comes_from_a1111s_override_setting(url):
    image, info = generated(
        post(url, "txt2img", override_settings={"CLIP_stop_at_last_layers": 2}, sampler_name="Euler")
    )
    assert "Clip skip: 2" in image.info["parameters"] and info["clip_skip"] == 2
    plain, info = generated(post(url, "txt2img", sampler_name="Euler"))
    assert "Clip skip" not in plain.info["parameters"] and info["clip_skip"] == 1
    assert_same_image(image, reference(clip_skip=2))
    assert_same_image(plain, reference())
    assert np.abs(pixels(image) - pixels(plain)).max() > 8  # and the two references differ: the test can fail
    init = png_b64(Image.new("RGB", (16, 16)))
    image, _ = generated(post(url, "img2img", init_images=[init], override_settings={"CLIP_stop_at_last_layers": 2}))
    assert "Clip skip: 2" in image.info["parameters"]


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"CLIP_stop_at_last_layers": 3}, "clip_skip must be an integer from 1 to 2"),  # the tiny CLIP has 2 layers
        ({"CLIP_stop_at_last_layers": 0}, "clip_skip must be an integer from 1 to 2"),
        ({"CLIP_stop_at_last_layers": "2"}, "CLIP_stop_at_last_layers must be an integer"),
        ({"CLIP_stop_at_last_layers": 1.5}, "CLIP_stop_at_last_layers must be an integer"),
        ({"CLIP_stop_at_last_layers": 10**400}, "clip_skip must be an integer from 1 to 2"),
        ({"sd_model_checkpoint": "v1-5-pruned.safetensors"}, "is not loaded"),
    ],
)
def test_bad_override_settings_are_refused_with_a_reason(url, settings, reason):
    response = post(url, "txt2img", override_settings=settings)
    assert response.status_code == 400, response.text
    assert reason in response.json()["detail"]


def test_override_settings_at_their_default_pass_and_others_are_refused_by_name(url):
    generated(post(url, "txt2img", override_settings={"sd_model_checkpoint": "tiny", "eta_noise_seed_delta": 0}))
    refused = post(url, "txt2img", override_settings={"eta_noise_seed_delta": "31337"})
    assert refused.status_code == 400 and "eta_noise_seed_delta must be an integer" in refused.json()["detail"]
    refused = post(url, "txt2img", override_settings={"sd_vae": "kl-f8.pt"})
    assert refused.status_code == 400 and "unknown VAE 'kl-f8.pt'" in refused.json()["detail"]
    refused = post(url, "txt2img", override_settings={"samples_format": "jpg"})
    assert refused.status_code == 400 and "samples_format not supported" in refused.json()["detail"]


# -- LoRA and embeddings ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    """A server with a LoRA folder (one kohya LoRA, 'tiny-style') and an embeddings folder (one, 'StyleThree')."""
    lora_dir = tmp_path_factory.mktemp("loras")
    components = make_tiny_components()
    (lora_dir / "styles").mkdir()
    kohya_lora(lora_dir / "styles" / "tiny-style.safetensors", components, seed=3, alpha=2.0)
    embeddings_dir = tmp_path_factory.mktemp("embeddings")
    save_a1111_pt(embeddings_dir / "StyleThree.pt", vectors(3, seed=1))
    pipe = GatedPipeline(
        components, torch.device("cpu"), torch.float32, lora_dir=lora_dir, embeddings_dir=embeddings_dir
    )
    with serve(create_app(pipe, ui=False)) as url:
        yield url, lora_dir


def test_lora_tags_apply_the_servers_loras_and_are_named_in_the_parameters(lora_server):
    url, lora_dir = lora_server
    plain, _ = generated(post(url, "txt2img", prompt="a red cube", sampler_name="Euler"))
    styled, info = generated(post(url, "txt2img", prompt="a red cube <lora:tiny-style:1.5>", sampler_name="Euler"))
    ours = Pipeline(make_tiny_components(), torch.device("cpu"), torch.float32, lora_dir=lora_dir)
    assert_same_image(styled, reference(ours, prompt="a red cube <lora:tiny-style:1.5>"))
    assert_same_image(plain, reference(ours))
    assert np.abs(pixels(styled) - pixels(plain)).max() > 8  # the two references differ: the test can fail
    assert 'Lora hashes: "tiny-style: ' in styled.info["parameters"]
    assert info["prompt"] == "a red cube <lora:tiny-style:1.5>"  # A1111 keeps the tag in the prompt it reports
    again, _ = generated(post(url, "txt2img", prompt="a red cube", sampler_name="Euler"))
    assert again.tobytes() == plain.tobytes()  # the LoRA was removed after its request


def test_unknown_lora_and_bad_tags_are_refused(lora_server, url):
    lora_url, _ = lora_server
    for base, prompt, reason in [
        (lora_url, "a cube <lora:missing:1>", "LoRA 'missing' not found"),
        (lora_url, "a cube <lora:tiny-style:heavy>", "is not a number"),
        (lora_url, "a cube <lora:../secret:1>", "without folders"),
        (url, "a cube <lora:tiny-style:1>", "no LoRA folder is set (--lora-dir)"),
    ]:
        response = post(base, "txt2img", prompt=prompt)
        assert response.status_code == 400, response.text
        assert reason in response.json()["detail"]


def test_lora_errors_do_not_name_the_servers_folders(lora_server):
    url, lora_dir = lora_server
    (lora_dir / "other").mkdir()
    shutil.copy(lora_dir / "styles" / "tiny-style.safetensors", lora_dir / "other")
    try:
        for prompt, reason in [
            ("a cube <lora:missing:1>", "LoRA 'missing' not found: no missing.safetensors in the LoRA folder"),
            ("a cube <lora:tiny-style:1>", "ambiguous: other/tiny-style.safetensors, styles/tiny-style.safetensors"),
        ]:
            response = post(url, "txt2img", prompt=prompt)
            assert response.status_code == 400 and reason in response.json()["detail"], response.text
            assert str(lora_dir) not in response.text
    finally:
        shutil.rmtree(lora_dir / "other")


def test_loras_and_embeddings_are_listed_as_a1111_lists_them(lora_server, url):
    lora_url, lora_dir = lora_server
    loras = requests.get(f"{lora_url}/sdapi/v1/loras", timeout=10).json()
    assert loras == [
        {
            "name": "tiny-style",
            "alias": "tiny-style",
            "path": "styles/tiny-style.safetensors",  # within the LoRA folder: the server's disk layout stays private
            "metadata": {},
        }
    ]
    assert str(lora_dir) not in requests.get(f"{lora_url}/sdapi/v1/loras", timeout=10).text
    assert requests.post(f"{lora_url}/sdapi/v1/refresh-loras", timeout=10).status_code == 200
    embeddings = requests.get(f"{lora_url}/sdapi/v1/embeddings", timeout=10).json()
    assert embeddings["loaded"]["StyleThree"]["vectors"] == 3 and embeddings["loaded"]["StyleThree"]["shape"] == 8
    assert requests.get(f"{url}/sdapi/v1/loras", timeout=10).json() == []
    assert requests.get(f"{url}/sdapi/v1/embeddings", timeout=10).json() == {"loaded": {}, "skipped": {}}


def test_embedding_names_in_prompts_are_named_in_the_parameters(lora_server):
    url, _ = lora_server
    image, _ = generated(post(url, "txt2img", prompt="a cube, StyleThree"))
    assert 'TI hashes: "StyleThree: ' in image.info["parameters"]


def test_serve_passes_its_lora_and_embeddings_folders_to_the_pipeline(monkeypatch, tmp_path):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    args = parser.parse_args(
        [
            "serve",
            "--port",
            "0",
            "--lora-dir",
            str(tmp_path / "loras"),
            "--embeddings-dir",
            str(tmp_path / "embeddings"),
        ]
    )
    loaded = {}

    class Stop(Exception):
        pass

    def from_pretrained(source, **kwargs):
        loaded.update(kwargs)
        raise Stop

    monkeypatch.setattr("ldmkit.pipeline.Pipeline.from_pretrained", from_pretrained)
    with pytest.raises(Stop):
        args.func(args)
    assert (loaded["lora_dir"], loaded["embeddings_dir"]) == (tmp_path / "loras", tmp_path / "embeddings")


def test_serve_refuses_a_missing_folder_before_loading(tmp_path):
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--lora-dir", str(tmp_path / "nope")])
    with pytest.raises(Exception, match="--lora-dir: folder not found"):
        args.func(args)
