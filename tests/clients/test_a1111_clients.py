"""Real AUTOMATIC1111 clients' calls replayed against a real server over the tiny model.

The payloads are the shapes these clients send, written down as data after reading their source (Open WebUI's
AUTOMATIC1111 image backend, SillyTavern's Stable Diffusion extension, the AIYA Discord bot's stablecog.py);
`webuiapi` runs as itself. Each field is implemented, accepted at a value that changes nothing (the image is
bit-identical to the plain request's), or refused with a 400 that names it.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
import requests
from PIL import Image

pytest.importorskip("fastapi", reason="server extras not installed")
webuiapi = pytest.importorskip("webuiapi", reason="server test extras not installed")

from e2e.serving import serve_tiny

from ldmkit.inpaint_fill import fill_masked

FAST = {"width": 16, "height": 16, "steps": 3}  # the tiny model's native size


@pytest.fixture(scope="module")
def server():
    with serve_tiny(ui=False) as running:
        yield running


@pytest.fixture
def url(server):
    return server[0]


def post(url: str, route: str, body: dict) -> requests.Response:
    return requests.post(f"{url}/sdapi/v1/{route}", json=body, timeout=60)


def image_of(response: requests.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    image.load()
    return image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


BASE = {"prompt": "a red cube", "seed": 7, **FAST}

# -- the field table: accepted at their default (no effect), refused otherwise ----------------------------------

# Fields sent at A1111's default or at a value that changes nothing: the image must be the plain request's.
NO_EFFECT = [
    {"styles": []},
    {"styles": ["None"]},  # AIYA's "no style"
    {"subseed": 1234, "subseed_strength": 0},
    {"seed_resize_from_h": -1, "seed_resize_from_w": -1},
    {"seed_resize_from_h": 0, "seed_resize_from_w": 0},
    {"seed_resize_from_h": 16, "seed_resize_from_w": 16},  # the size itself
    {"seed_resize_from_h": 64},  # one side only: off, as in A1111
    {"restore_faces": False, "tiling": False},
    {"do_not_save_samples": True, "do_not_save_grid": True, "save_images": True},
    {"sampler_name": "Euler a", "eta": 1.0},  # the ancestral samplers' default eta
    {"sampler_name": "DDIM", "eta": 0},
    {"sampler_name": "Euler", "eta": 0.4},  # Euler takes no eta: in A1111 too it changes nothing
    {"s_churn": 0, "s_tmin": 0, "s_tmax": 0, "s_noise": 1, "s_min_uncond": 0},
    {"s_noise": 1.003},  # scales the churn noise only: none without s_churn
    {"sampler_name": "DPM++ 2M", "s_churn": 0.5, "eta": 0.3},  # neither has a meaning for DPM++ 2M, in A1111 too
    {"override_settings": {"sd_vae": "Automatic", "eta_noise_seed_delta": 0}},
    {"override_settings": {"sd_vae": "None"}},
    {"refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False},
    {"refiner_checkpoint": "None", "refiner_switch_at": 0.8},  # a switch without a refiner: none, as in A1111
    {"script_name": None, "script_args": [], "comments": {"a": 1}, "force_task_id": "task(x)"},
    {"firstphase_width": 0, "firstphase_height": 0},
    {"enable_hr": False, "hr_prompt": "something else", "hr_sampler_name": "DDIM"},  # no second pass: no effect
]


@pytest.mark.parametrize("fields", NO_EFFECT, ids=lambda f: ",".join(f))
def test_fields_at_their_default_change_nothing(url, fields):
    plain = pixels(image_of(post(url, "txt2img", {**BASE, "sampler_name": fields.get("sampler_name", "Euler")})))
    assert np.array_equal(pixels(image_of(post(url, "txt2img", {**BASE, "sampler_name": "Euler", **fields}))), plain)


REFUSED = [
    ({"styles": ["cinematic"]}, "unknown style(s) 'cinematic'"),
    ({"restore_faces": True}, "restore_faces=True is not supported"),
    ({"sampler_name": "DPM2 a", "eta": 0.5}, "eta=0.5 is not supported: DPM2 a runs at A1111's default eta 1"),
    ({"sampler_name": "Heun", "s_churn": 0.5}, "s_churn=0.5 is not supported: Heun runs without churn"),
    ({"s_min_uncond": 0.2}, "s_min_uncond=0.2 is not supported"),
    ({"refiner_checkpoint": "sd_xl_refiner"}, "refiner_checkpoint 'sd_xl_refiner' is not a model of this server"),
    ({"disable_extra_networks": True}, "disable_extra_networks=True is not supported"),
    ({"script_name": "prompt matrix"}, "script_name='prompt matrix' is not supported"),
    ({"infotext": "a cat\nSteps: 20"}, "infotext='...' is not supported"),
    ({"alwayson_scripts": {"ADetailer": {"args": []}}}, "alwayson_scripts.ADetailer is not supported"),
    ({"override_settings": {"sd_vae": "vae-ft-mse.safetensors"}}, "unknown VAE 'vae-ft-mse.safetensors'"),
    ({"override_settings": {"eta_noise_seed_delta": -1}}, "eta_noise_seed_delta must be an integer from 0"),
    ({"override_settings": {"face_restoration_model": "CodeFormer"}}, "face_restoration_model not supported"),
    ({"enable_hr": True, "hr_sampler_name": "no such sampler"}, "unknown sampler 'no such sampler'"),
    ({"enable_hr": True, "hr_scheduler": "Karras", "hr_sampler_name": "PLMS"}, "'PLMS' cannot run the Karras"),
    ({"enable_hr": True, "hr_checkpoint_name": "other.safetensors"}, "hr_checkpoint_name='other.safetensors'"),
    ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hr_upscaler 'R-ESRGAN 4x+' is not available"),
]


@pytest.mark.parametrize(("fields", "reason"), REFUSED, ids=lambda v: ",".join(v) if isinstance(v, dict) else "")
def test_fields_ldmkit_does_not_implement_are_refused_by_name(url, fields, reason):
    response = post(url, "txt2img", {**BASE, **fields})
    assert response.status_code == 400 and reason in response.json()["detail"], response.text


def test_hires_at_scale_1_runs_a_second_pass_at_the_same_size_and_truncates_fractional_steps(url):
    body = {**BASE, "enable_hr": True, "hr_scale": 1, "hr_second_pass_steps": 2.5, "denoising_strength": 0.7}
    image = image_of(post(url, "txt2img", body))
    assert image.size == (16, 16)
    assert "Hires upscale: 1" in image.info["parameters"] and "Hires steps: 2," in image.info["parameters"]


def test_img2img_inpainting_fields_reach_the_pipeline_with_a1111s_defaults(url):
    init = Image.new("RGB", (16, 16), (200, 30, 30))
    init.paste((30, 30, 220), (6, 6, 10, 10))  # under the mask: what 'fill' replaces
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (4, 4, 12, 12))
    body = {**BASE, "init_images": [png_b64(init)], "mask": png_b64(mask), "denoising_strength": 0.8}
    plain = image_of(post(url, "img2img", body))
    # omitted: A1111's defaults, 'only masked' with no padding and 'fill'
    defaults = {"inpaint_full_res": True, "inpaint_full_res_padding": 0, "inpainting_fill": 0, "mask_round": True}
    assert np.array_equal(pixels(image_of(post(url, "img2img", {**body, **defaults}))), pixels(plain))
    assert "Inpaint area: Only masked, Masked area padding: 0" in plain.info["parameters"]
    assert "Masked content: fill" in plain.info["parameters"]
    for fields, reason in [
        ({"inpainting_fill": 4}, "inpainting_fill=4 is not supported"),
        ({"mask_blur_x": 4, "mask_blur_y": 8}, "mask_blur_y=8 is not supported"),
        ({"resize_mode": 5}, "resize_mode=5 is not supported"),
        ({"resize_mode": 3, "inpaint_full_res": False}, "resize_mode=3 is not supported"),
        ({"inpaint_full_res_padding": -1}, "inpaint padding must be an integer from 0"),
        ({"initial_noise_multiplier": 1.1}, "initial_noise_multiplier=1.1 is not supported"),
    ]:
        response = post(url, "img2img", {**body, **fields})
        assert response.status_code == 400 and reason in response.json()["detail"], response.text
    # whole picture: 'fill' is 'original' on the init image whose masked part is filled from around it
    whole = {**body, "inpaint_full_res": False}
    filled = post(url, "img2img", {**whole, "inpainting_fill": 0})
    prefilled = {**whole, "init_images": [png_b64(fill_masked(init, mask))], "inpainting_fill": 1}
    assert np.array_equal(pixels(image_of(filled)), pixels(image_of(post(url, "img2img", prefilled))))
    assert not np.array_equal(
        pixels(image_of(filled)), pixels(image_of(post(url, "img2img", {**whole, "inpainting_fill": 1})))
    )
    for fill, written in [(2, "latent noise"), (3, "latent nothing")]:
        text = image_of(post(url, "img2img", {**whole, "inpainting_fill": fill})).info["parameters"]
        assert f"Masked content: {written}" in text and "Inpaint area" not in text
    # Without a mask the inpainting fields describe nothing: A1111's defaults pass.
    no_mask = {k: v for k, v in body.items() if k != "mask"}
    image_of(post(url, "img2img", {**no_mask, "inpaint_full_res": True, "inpainting_fill": 0}))


# -- options that persist ----------------------------------------------------------------------------------


def test_clip_skip_option_persists_and_unknown_options_are_refused_by_name():
    with serve_tiny(ui=False) as (url, _, _):  # its own server: the option stays for the server's life
        assert requests.get(f"{url}/sdapi/v1/options", timeout=10).json()["CLIP_stop_at_last_layers"] == 1
        refused = requests.post(f"{url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "sd_vae": "x.pt"})
        assert refused.status_code == 400 and "unknown VAE 'x.pt'" in refused.json()["detail"]
        assert requests.get(f"{url}/sdapi/v1/options", timeout=10).json()["CLIP_stop_at_last_layers"] == 1  # nothing
        refused = requests.post(f"{url}/sdapi/v1/options", json={"samples_format": "jpg"}, timeout=10)
        assert refused.status_code == 400 and "samples_format not supported" in refused.json()["detail"]
        refused = requests.post(f"{url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 5}, timeout=10)
        assert refused.status_code == 400 and "clip_skip must be an integer from 1 to 2" in refused.json()["detail"]

        assert requests.post(f"{url}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
        assert "Clip skip: 2" in image_of(post(url, "txt2img", BASE)).info["parameters"]
        overridden = post(url, "txt2img", {**BASE, "override_settings": {"CLIP_stop_at_last_layers": 1}})
        assert "Clip skip" not in image_of(overridden).info["parameters"]  # a request's override wins, once
        assert "Clip skip: 2" in image_of(post(url, "txt2img", BASE)).info["parameters"]
        # override_settings_restore_afterwards false keeps the request's settings, as in A1111
        kept = {"override_settings": {"CLIP_stop_at_last_layers": 1}, "override_settings_restore_afterwards": False}
        image_of(post(url, "txt2img", {**BASE, **kept}))
        assert requests.get(f"{url}/sdapi/v1/options", timeout=10).json()["CLIP_stop_at_last_layers"] == 1


# -- the clients' own calls --------------------------------------------------------------------------------

STARTUP_LISTS = [
    "sd-models", "samplers", "schedulers", "upscalers", "latent-upscale-modes", "sd-vae", "prompt-styles",
    "face-restorers", "hypernetworks", "realesrgan-models", "loras", "script-info",
]  # fmt: skip


def test_fill_takes_the_colours_around_the_mask():
    image = Image.new("RGB", (33, 31), (200, 0, 0))
    image.paste((0, 0, 200), (16, 0, 33, 31))
    image.paste((255, 255, 255), (12, 12, 20, 20))  # replaced: none of its white may remain
    mask = Image.new("L", (33, 31), 0)
    mask.paste(255, (12, 12, 20, 20))
    filled = np.asarray(fill_masked(image, mask)).astype(int)
    assert np.array_equal(filled[mask_pixels := np.asarray(mask) == 0], np.asarray(image)[mask_pixels])
    assert filled[16, 12, 0] > 150 and filled[16, 12, 2] < 50  # the left edge of the hole: red as its left side
    assert filled[16, 19, 2] > 150 and filled[16, 19, 0] < 50  # the right edge: blue


@pytest.mark.parametrize("route", STARTUP_LISTS)
def test_startup_lists_answer_lists(url, route):
    response = requests.get(f"{url}/sdapi/v1/{route}", timeout=10)
    assert response.status_code == 200 and isinstance(response.json(), list)


def test_startup_objects(url):
    flags = requests.get(f"{url}/sdapi/v1/cmd-flags", timeout=10).json()
    assert flags["api"] is True
    scripts = requests.get(f"{url}/sdapi/v1/scripts", timeout=10).json()
    assert scripts == {"txt2img": ["x/y/z plot"], "img2img": ["x/y/z plot"]}
    memory = requests.get(f"{url}/sdapi/v1/memory", timeout=10).json()
    assert memory["ram"]["total"] >= memory["ram"]["free"] > 0 and "error" in memory["cuda"]  # a CPU server
    assert requests.get(f"{url}/sdapi/v1/upscalers", timeout=10).json()[1]["name"] == "Lanczos"
    for route in ("refresh-checkpoints", "refresh-loras", "refresh-vae"):
        assert requests.post(f"{url}/sdapi/v1/{route}", timeout=10).status_code == 200


def test_open_webui_calls(url):
    """Open WebUI's AUTOMATIC1111 backend: options for the model, then txt2img with its few fields."""
    model = requests.get(f"{url}/sdapi/v1/options", timeout=10).json()["sd_model_checkpoint"]
    assert requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": model}, timeout=10).status_code == 200
    body = {"prompt": "a lighthouse", "batch_size": 1, "width": 16, "height": 16, "steps": 3, "cfg_scale": 7,
            "sampler_name": "Euler a", "scheduler": "Karras", "negative_prompt": "blurry"}  # fmt: skip
    response = post(url, "txt2img", body)
    assert (
        image_of(response).size == (16, 16) and "Euler a Karras" in json.loads(response.json()["info"])["sampler_name"]
    )


def test_sillytavern_calls(url):
    """SillyTavern's Stable Diffusion extension: its defaults (DDIM + normal, hires at 1.0) and its flags."""
    body = {"prompt": "a tavern", "negative_prompt": "", "sampler_name": "DDIM", "scheduler": "normal", "steps": 3,
            "cfg_scale": 7, "width": 16, "height": 16, "restore_faces": False, "enable_hr": True,
            "hr_upscaler": "Latent", "hr_scale": 1.0, "hr_additional_modules": [], "denoising_strength": 0.7,
            "hr_second_pass_steps": 0, "override_settings": {"CLIP_stop_at_last_layers": 1},
            "override_settings_restore_afterwards": True, "clip_skip": 1, "save_images": True, "send_images": True,
            "do_not_save_grid": False, "do_not_save_samples": False}  # fmt: skip
    image = image_of(post(url, "txt2img", body))
    assert image.size == (16, 16) and "Hires upscale: 1" in image.info["parameters"]
    assert requests.get(f"{url}/sdapi/v1/sd-vae", timeout=10).json() == []
    assert requests.post(f"{url}/sdapi/v1/options", json={"sd_vae": "Automatic"}, timeout=10).status_code == 200


def test_aiya_calls(url):
    """The AIYA Discord bot: startup lists it parses, then its txt2img payload with hires and clip skip."""
    assert requests.get(f"{url}/sdapi/v1/cmd-flags", timeout=10).status_code == 200
    assert requests.get(f"{url}/sdapi/v1/prompt-styles", timeout=10).json() == []
    assert requests.get(f"{url}/sdapi/v1/face-restorers", timeout=10).json() == []
    body = {"prompt": "a dragon", "negative_prompt": "", "steps": 4, "width": 16, "height": 16, "cfg_scale": 7,
            "sampler_index": "Euler a", "seed": 11, "seed_resize_from_h": 0, "seed_resize_from_w": 0,
            "denoising_strength": None, "n_iter": 1, "batch_size": 1, "styles": ["None"],
            "override_settings": {"CLIP_stop_at_last_layers": 2}}  # fmt: skip
    assert "Clip skip: 2" in image_of(post(url, "txt2img", body)).info["parameters"]
    hires = {**body, "enable_hr": True, "hr_upscaler": "Latent", "hr_scale": 1, "hr_second_pass_steps": 4 / 2,
             "denoising_strength": 0.75}  # fmt: skip
    assert "Hires upscale: 1" in image_of(post(url, "txt2img", hires)).info["parameters"]


def test_webuiapi_as_a_client(url):
    host, port = url.removeprefix("http://").split(":")
    api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a", steps=3)
    result = api.txt2img(prompt="a red cube", width=16, height=16, seed=5)  # eta=1, s_noise=1... as it sends
    assert result.image.size == (16, 16) and result.info["all_seeds"] == [5]
    init = Image.new("RGB", (16, 16), (20, 120, 200))
    assert api.img2img(images=[init], prompt="a blue cube", width=16, height=16, denoising_strength=0.7).image
    mask = Image.new("L", (16, 16), 255)
    default = api.img2img(images=[init], mask_image=mask, width=16, height=16)  # its defaults: only masked, fill
    assert "Inpaint area: Only masked" in default.info["infotexts"][0] and default.image.size == (16, 16)
    inpainted = api.img2img(images=[init], mask_image=mask, width=16, height=16, inpaint_full_res=False)  # fill
    assert inpainted.image.size == (16, 16)
    upscaled = api.extra_single_image(image=init, upscaler_1="Lanczos", upscaling_resize=2)
    assert upscaled.image.size == (32, 32)
    with pytest.raises(RuntimeError, match=r"upscaler_1 .*R-ESRGAN 4x\+.* is not available"):
        api.extra_single_image(image=init, upscaler_1="R-ESRGAN 4x+")
    batch = api.extra_batch_images(images=[init, init], upscaler_1="Nearest", upscaling_resize=1.5)
    assert [image.size for image in batch.images] == [(24, 24), (24, 24)]
    unchanged = api.extra_single_image(image=init, upscaling_resize=2)  # its default upscaler_1 'None'
    assert unchanged.image.size == (16, 16)  # as in A1111: no upscaler, nothing done
    assert api.get_prompt_styles() == [] and api.get_face_restorers() == [] and api.get_hypernetworks() == []
    assert api.get_cmd_flags()["api"] is True
    assert api.get_scripts() == {"txt2img": ["x/y/z plot"], "img2img": ["x/y/z plot"]}
    assert api.util_get_model_names() == [api.util_get_current_model()]
    assert "Euler a" in api.util_get_sampler_names()
    interrogated = requests.post(f"{url}/sdapi/v1/interrogate", json={"image": png_b64(init)}, timeout=10)
    assert interrogated.status_code == 400 and "interrogate model 'clip' is not available" in interrogated.text
    skipped = requests.post(f"{url}/sdapi/v1/skip", timeout=10)
    assert skipped.status_code == 200 and skipped.json() == {}  # nothing running: no effect, as in A1111
