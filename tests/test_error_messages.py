"""Each user-facing error message is reached once, and says what it should (issue 21: messages no test reached)."""

import base64
import dataclasses
import datetime
import io
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from support.tiny import make_tiny_components

from ldmkit import cli, loading
from ldmkit.cli import main
from ldmkit.embeddings import read_embedding
from ldmkit.errors import InvalidRequest, LdmError, ModelLoadError
from ldmkit.loading import load_components, save_pretrained
from ldmkit.lora import applied_loras, check_lora_file, prompt_loras
from ldmkit.params import GenerationParams, HiresFix
from ldmkit.pipeline import Pipeline, resolve_device, resolve_dtype

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline(make_tiny_components(), CPU, torch.float32)


def image(size=(16, 16)) -> Image.Image:
    return Image.new("RGB", size, (128, 64, 32))


def lora_file(path):
    safetensors.torch.save_file({"lora_unet_x.lora_up.weight": torch.zeros(1)}, path)
    return path


# ---- pipeline.py ----


def test_unknown_device_is_named():
    with pytest.raises(InvalidRequest, match=r"unknown device 'gpu0'; use auto, cpu, cuda or mps"):
        resolve_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(InvalidRequest, match=r"device 'cuda' requested but no CUDA GPU is available"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_mps_without_mps_is_refused():
    with pytest.raises(InvalidRequest, match=r"device 'mps' requested but MPS is not available"):
        resolve_device("mps")


def test_unknown_dtype_is_named():
    with pytest.raises(InvalidRequest, match=r"unknown dtype 'fp8'; use auto, fp32, fp16, bf16"):
        resolve_dtype("fp8", CPU)


def test_an_sd_embedding_is_refused_for_sdxl(tmp_path):
    """SDXL embeddings hold clip_l and clip_g vectors; a one-tensor SD file in an SDXL model's folder is named."""
    from safetensors.torch import save_file
    from support.sdxl import make_tiny_sdxl_components

    save_file({"emb_params": torch.zeros(1, 8)}, tmp_path / "sd15style.safetensors")
    with pytest.raises(LdmError, match=r"^embedding sd15style.safetensors is not an SDXL embedding \(it has no clip_l"):
        Pipeline(make_tiny_sdxl_components(), CPU, torch.float32, embeddings_dir=tmp_path)


def test_an_inpainting_model_needs_a_mask():
    components = make_tiny_components()
    unet = UNet2DConditionModel.from_config({**components.unet.config, "in_channels": 9})
    inpainting = Pipeline(dataclasses.replace(components, unet=unet), CPU, torch.float32)
    with pytest.raises(InvalidRequest, match=r"this is an inpainting model: give an init image and a mask"):
        inpainting.prepare(GenerationParams("otter", steps=2, width=16, height=16))


def test_a_refiner_must_be_a_pipeline(pipe):
    with pytest.raises(InvalidRequest, match=r"refiner must be a loaded Pipeline, not str"):
        pipe.prepare(GenerationParams("otter", steps=2, width=16, height=16, refiner="refiner.safetensors"))


def test_loras_are_refused_with_offload(tmp_path):
    offloaded = Pipeline(make_tiny_components(), CPU, torch.float32)
    offloaded._state = offloaded._state.with_transform("offload")
    request = GenerationParams(
        "otter", steps=2, width=16, height=16, loras=((lora_file(tmp_path / "a.safetensors"), 1.0),)
    )
    with pytest.raises(InvalidRequest, match=r"LoRAs are not supported with --offload yet"):
        offloaded.prepare(request)


def test_lora_tags_need_a_lora_folder(pipe):
    with pytest.raises(
        InvalidRequest, match=r"the prompt has <lora:\.\.\.> tags but no LoRA folder is set \(--lora-dir\)"
    ):
        pipe.prepare(GenerationParams("otter <lora:style:0.5>", steps=2, width=16, height=16))


def test_loras_are_refused_on_the_fast_path(tmp_path):
    fast = Pipeline(make_tiny_components(), CPU, torch.float32)
    fast._state = fast._state.with_transform("fused_qkv")
    request = GenerationParams(
        "otter", steps=2, width=16, height=16, loras=((lora_file(tmp_path / "a.safetensors"), 1.0),)
    )
    with pytest.raises(InvalidRequest, match=r"LoRAs are not supported on the fast path \(fused QKV\)"):
        fast.prepare(request)


# ---- params.py ----


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hires": HiresFix(strength=0)}, r"hires strength must be in \(0, 1\], got 0"),
        ({"prompt": 3}, r"prompt must be text or a list of texts, not int"),
        ({"prompt": "a \ud800 b"}, r"prompt is not valid Unicode text \(it has a lone surrogate code point\)"),
        (
            {"negative_prompt": "[cat:dog:0.5]"},
            r"negative prompt: '\[cat:dog:0\.5\]' is AUTOMATIC1111's prompt editing \(\[from:to:when\]\)",
        ),
        ({"steps": 0}, r"steps must be an integer from 1 to 1000, got 0"),
        ({"num_images": 0}, r"batch size must be a positive integer \(the number of images of a prompt\), got 0"),
        ({"batch_count": 1.5}, r"batch count must be a positive integer, got 1\.5"),
        ({"init_image": "otter.png"}, r"init image must be a PIL image, not str"),
        ({"init_image": image(), "strength": 1.5}, r"strength must be between 0 and 1, got 1\.5"),
        ({"init_image": image(), "mask_image": "mask.png"}, r"mask must be a PIL image, not str"),
        ({"mask_image": image()}, r"inpainting needs an init image as well as the mask"),
        ({"hires": 2.0}, r"hires must be a HiresFix, not float"),
        ({"hires": HiresFix(), "init_image": image()}, r"hires fix is for text-to-image; with an init image"),
        ({"loras": (("a.safetensors",),)}, r"loras must be \(file, weight\) pairs, got \('a\.safetensors',\)"),
        ({"loras": (("a.safetensors", "x"),)}, r"LoRA 'a\.safetensors' weight must be a finite number, got 'x'"),
    ],
)
def test_request_values_are_refused_with_their_name(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        GenerationParams(**{"prompt": "otter", **fields}).validate()


# ---- loading.py ----


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_pretrained(make_tiny_components(), folder)
    return folder


def copy_folder(folder, tmp_path):
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def checkpoint(path, tensors=None):
    safetensors.torch.save_file(tensors or {"foo": torch.zeros(2)}, path)
    return path


def test_an_unknown_prediction_type_is_named():
    with pytest.raises(ModelLoadError, match=r"prediction_type must be one of epsilon, v_prediction, not 'sample'"):
        load_components(prediction_type="sample")


def test_config_is_refused_for_a_folder(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config= only applies to single-file checkpoints; '.*' is not a file"):
        load_components(tmp_path, config=tmp_path)


def test_a_missing_default_model_says_to_pass_one(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match=r"no default model is shipped with this install"):
        load_components()


def test_a_repo_id_not_in_the_cache_is_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(
        ModelLoadError, match=r"'owner/model' is neither a path nor a Hub repo in the local Hugging Face"
    ):
        load_components("owner/model")


def test_a_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match=r"is not a diffusers model folder: it has no model_index\.json"):
        load_components(tmp_path)


def test_a_truncated_weights_file_is_reported_as_such(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=r"cannot load the model in .*\(is a file truncated or corrupted\?\)"):
        load_components(folder)


def test_a_missing_weight_is_refused_not_filled_randomly(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    del tensors["conv_in.weight"]
    safetensors.torch.save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match=r"unet has 1 missing and 0 mis-shaped weights \(e\.g\. conv_in\.weight\)"):
        load_components(folder)


def test_a_config_that_is_not_json_is_named(tiny_folder, tmp_path):
    folder = copy_folder(tiny_folder, tmp_path)
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"scheduler_config\.json is not valid JSON"):
        load_components(folder)


def test_config_must_be_a_folder_for_a_single_file(tmp_path):
    with pytest.raises(ModelLoadError, match=r"config= .*nowhere is not a folder of diffusers configs"):
        load_components(checkpoint(tmp_path / "m.safetensors"), config=tmp_path / "nowhere")


def test_a_damaged_safetensors_file_is_reported(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(
        ModelLoadError, match=r"m\.safetensors is not a readable safetensors file .* truncated or corrupted"
    ):
        load_components(tmp_path / "m.safetensors")


def test_a_file_of_another_kind_is_not_a_model(tmp_path):
    (tmp_path / "m.bin").write_bytes(b"weights")
    with pytest.raises(
        ModelLoadError, match=r"m\.bin is not a model: expected a folder, a \.safetensors or a \.ckpt file"
    ):
        load_components(tmp_path / "m.bin")


def test_a_ckpt_without_tensors_is_refused(tmp_path):
    torch.save({"state_dict": {"global_step": 3}}, tmp_path / "m.ckpt")
    with pytest.raises(ModelLoadError, match=r"m\.ckpt is not a checkpoint: it holds no tensors"):
        load_components(tmp_path / "m.ckpt")


def test_an_unknown_architecture_asks_for_config(tmp_path):
    with pytest.raises(ModelLoadError, match=r"m\.safetensors is not an SD 1\.x/2\.x or SDXL checkpoint"):
        load_components(checkpoint(tmp_path / "m.safetensors"))


def test_a_single_file_without_text_encoder_weights_is_refused(tiny_folder, tmp_path):
    with pytest.raises(
        ModelLoadError, match=r"m\.safetensors has no CLIP text encoder weights \(cond_stage_model\.\*\)"
    ):
        load_components(checkpoint(tmp_path / "m.safetensors"), config=tiny_folder)


def test_single_file_weights_that_do_not_fit_the_config_are_refused(tiny_folder, tmp_path):
    path = checkpoint(tmp_path / "m.safetensors", {loading.SD1_TEXT_KEY: torch.zeros(77, 8)})
    with pytest.raises(
        ModelLoadError, match=r"m\.safetensors: the text_encoder weights do not fit its config \(\d+ missing"
    ):
        load_components(path, config=tiny_folder)


def test_sdxl_config_must_be_a_folder(tmp_path):
    path = checkpoint(
        tmp_path / "r.safetensors", {loading.SDXL_REFINER_BIGG_PREFIX + "positional_embedding": torch.zeros(2)}
    )
    with pytest.raises(ModelLoadError, match=r"config= .*nowhere is not a folder of diffusers configs"):
        load_components(path, config=tmp_path / "nowhere")


def test_an_sdxl_file_with_a_unet_of_another_size_asks_for_config(tmp_path):
    path = checkpoint(
        tmp_path / "r.safetensors", {loading.SDXL_REFINER_BIGG_PREFIX + "positional_embedding": torch.zeros(2)}
    )
    with pytest.raises(
        ModelLoadError, match=r"r\.safetensors has SDXL refiner text encoders but a UNet of another size"
    ):
        load_components(path)


# ---- lora.py ----


def test_a_lora_tag_takes_one_weight():
    with pytest.raises(InvalidRequest, match=r"<lora:a:1:2>: only one weight is supported, as in <lora:a:0\.8>"):
        prompt_loras(["otter <lora:a:1:2>"])


def test_a_lora_tag_weight_must_be_finite():
    with pytest.raises(InvalidRequest, match=r"<lora:a:inf>: the weight must be a finite number"):
        prompt_loras(["otter <lora:a:inf>"])


class _NoLoraHost:
    """A pipeline host that no LoRA reaches: applied_loras refuses the file before loading it."""

    def unload_lora_weights(self):
        pass


def test_applying_a_file_that_is_not_safetensors_is_refused(tmp_path):
    (tmp_path / "style.pt").write_bytes(b"x")
    with pytest.raises(LdmError, match=r"LoRA file not found or not \.safetensors: style\.pt"):
        with applied_loras(_NoLoraHost(), [(tmp_path / "style.pt", 1.0)]):
            pass


# ---- embeddings.py ----


def test_a_file_of_two_tensors_is_not_an_embedding(tmp_path):
    path = checkpoint(tmp_path / "ink.safetensors", {"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)})
    with pytest.raises(LdmError, match=r"ink\.safetensors is not a textual inversion embedding \(expected one tensor"):
        read_embedding(path)


# ---- cli.py: one line on stderr, exit code 2 ----


def cli_error(capsys, *argv) -> str:
    code = main([*argv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("ldm: error: ")
    return err.strip()


def test_cli_every_must_be_positive(tmp_path, capsys):
    err = cli_error(capsys, "generate", "otter", "--every", "0", "-o", str(tmp_path))
    assert err == "ldm: error: --every must be >= 1, got 0"


def test_cli_needs_a_prompt_or_a_prompts_file(tmp_path, capsys):
    err = cli_error(capsys, "generate", "-o", str(tmp_path))
    assert err == "ldm: error: give either a prompt or --prompts FILE"


def test_cli_names_an_unreadable_prompts_file(tmp_path, capsys):
    err = cli_error(capsys, "generate", "--prompts", str(tmp_path / "none.txt"), "-o", str(tmp_path))
    assert err == f"ldm: error: cannot read prompts file {tmp_path / 'none.txt'}: No such file or directory"


def test_cli_refuses_a_prompts_file_without_prompts(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_text("\n  \n")
    err = cli_error(capsys, "generate", "--prompts", str(tmp_path / "prompts.txt"), "-o", str(tmp_path))
    assert err == f"ldm: error: prompts file {tmp_path / 'prompts.txt'} has no prompts"


def test_cli_info_on_an_image_without_parameters(tmp_path, capsys):
    image().save(tmp_path / "plain.png")
    err = cli_error(capsys, "info", str(tmp_path / "plain.png"))
    assert err == f"ldm: error: {tmp_path / 'plain.png'} carries no generation parameters"


# ---- messages found unreached by the fast subset's coverage run ----


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"seed": (1, 2)}, r"seeds must be 1 integers from 0 to 4294967295, one per image"),
        ({"init_image": image(), "steps": 2, "strength": 0.4}, r"strength 0\.4 with 2 steps leaves no denoising step"),
        ({"init_image": image(), "mask_image": image(), "mask_blur": 65}, r"mask blur must be an integer from 0 to 64"),
        ({"hires": HiresFix(steps=1, strength=0.5)}, r"hires steps 1 at strength 0\.5 leave no denoising step"),
        ({"hires": HiresFix(upscaler="")}, r"hires upscaler must be latent or pixel or an upscaler's name"),
        (
            {"refiner": object(), "refiner_switch": 1.0},
            r"refiner switch must be between 0 and 1 \(exclusive\), got 1\.0",
        ),
    ],
)
def test_more_request_values_are_refused_with_their_name(fields, message):
    with pytest.raises(InvalidRequest, match=message):
        GenerationParams(**{"prompt": "otter", **fields}).validate()


def test_a_folder_missing_a_component_names_it(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"is missing the unet component \(unet/config\.json\)"):
        load_components(tmp_path)


def test_a_ckpt_that_cannot_be_unpickled_safely_is_refused(tmp_path):
    (tmp_path / "m.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match=r"m\.ckpt cannot be loaded safely \(\w+\); convert it to \.safetensors"):
        load_components(tmp_path / "m.ckpt")


def test_a_ckpt_holding_a_list_is_not_a_checkpoint(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "m.ckpt")
    with pytest.raises(
        ModelLoadError, match=r"m\.ckpt is not a checkpoint: it holds a value of type list, not a state"
    ):
        load_components(tmp_path / "m.ckpt")


def test_a_ckpt_whose_state_dict_holds_itself_is_refused(tmp_path):
    looped = {}
    looped["state_dict"] = looped
    torch.save(looped, tmp_path / "m.ckpt")
    with pytest.raises(ModelLoadError, match=r"m\.ckpt is not a checkpoint: its state_dict holds itself"):
        load_components(tmp_path / "m.ckpt")


def test_a_lora_file_must_be_safetensors(tmp_path):
    with pytest.raises(InvalidRequest, match=r"LoRA file style\.pt is not a \.safetensors file"):
        check_lora_file(tmp_path / "style.pt")


def test_a_damaged_lora_file_is_refused(tmp_path):
    (tmp_path / "style.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(InvalidRequest, match=r"LoRA file style\.safetensors is not a readable safetensors file"):
        check_lora_file(tmp_path / "style.safetensors")


def test_a_safetensors_file_without_lora_layers_is_not_a_lora(tmp_path):
    path = checkpoint(tmp_path / "style.safetensors")
    with pytest.raises(InvalidRequest, match=r"style\.safetensors holds no LoRA layers \(1 tensors, none named lora\)"):
        check_lora_file(path)


def test_an_embedding_pickle_with_other_objects_is_never_loaded(tmp_path):
    torch.save({"when": datetime.date(2024, 1, 1)}, tmp_path / "ink.pt")
    with pytest.raises(LdmError, match=r"ink\.pt: it is not a PyTorch file of tensors only"):
        read_embedding(tmp_path / "ink.pt")


def test_an_embedding_of_another_family_names_both_sizes(tmp_path):
    path = checkpoint(tmp_path / "ink.safetensors", {"emb_params": torch.zeros(1, 4)})
    with pytest.raises(LdmError, match=r"ink\.safetensors has vectors of size 4, but this model's text encoder uses 8"):
        read_embedding(path, expected_size=8)


def test_an_sdxl_embedding_is_refused_for_sd(tmp_path):
    path = checkpoint(tmp_path / "ink.safetensors", {"clip_g": torch.zeros(1, 8), "clip_l": torch.zeros(1, 8)})
    with pytest.raises(LdmError, match=r"ink\.safetensors is an SDXL embedding \(clip_l and clip_g\); it needs"):
        read_embedding(path)


# ---- server: a 4xx whose body gives the reason, before any compute ----


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("fastapi", reason="server extras not installed (pip install -e .[server])")
    from fastapi.testclient import TestClient

    from ldmkit.server.app import create_app

    app = create_app(Pipeline(make_tiny_components(), CPU, torch.float32), ui=False)
    with TestClient(app, base_url="http://127.0.0.1") as running:  # the server admits local host names only
        yield running


def png_b64(keep: int | None = None) -> str:
    """A PNG in base64; `keep` bytes of it only: a header that opens, then data that fails to decode."""
    buffer = io.BytesIO()
    image().save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()[:keep]).decode()


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/sdapi/v1/img2img", {"prompt": "otter"}, "img2img needs init_images: one base64 image"),
        ("/sdapi/v1/img2img", {"prompt": "otter", "init_images": ["a", "b"]}, "img2img takes one init image, got 2"),
        (
            "/sdapi/v1/img2img",
            {"prompt": "otter", "init_images": ["a"], "inpainting_mask_invert": 2},
            "inpainting_mask_invert must be 0 or 1, got 2",
        ),
        (
            "/sdapi/v1/extra-single-image",
            {"image": "a", "resize_mode": 2},
            "resize_mode must be 0 (scale) or 1 (to a size), got 2",
        ),
        (
            "/sdapi/v1/extra-single-image",
            {"image": "a", "upscaler_2": "R-ESRGAN 4x+", "extras_upscaler_2_visibility": 0.5},
            "upscaler_2 'R-ESRGAN 4x+' is not available (no upscalers folder is set: --upscalers-dir)",
        ),
        (
            "/sdapi/v1/extra-single-image",
            {"image": "a", "gfpgan_visibility": 0.5},
            "gfpgan_visibility=0.5 is not supported: this server has no face restorer",
        ),
        ("/sdapi/v1/extra-batch-images", {"imageList": []}, "imageList must hold 1 to"),
        (
            "/v1/images/generations",
            {"prompt": "otter", "style": "vivid"},
            "style='vivid' is not supported: it is DALL-E 3's",
        ),
        (
            "/v1/images/generations",
            {"prompt": "otter", "size": "big"},
            "size must be 'auto' or WIDTHxHEIGHT such as 512x512",
        ),
        (
            "/v1/images/generations",
            {"prompt": "otter", "output_compression": 50},
            "output_compression is for output_format jpeg or webp; png is lossless",
        ),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "otter", "enable_hr": True, "hr_second_pass_steps": 1001},
            "hr_second_pass_steps must be from 0 (as steps) to 1000, got 1001",
        ),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "otter", "enable_hr": True, "hr_resize_x": 9000},
            "hr_resize_x/y and the size must be from 1 to 8192, got 9000x0",
        ),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "otter", "override_settings": {"sd_model_checkpoint": "other"}},
            "model 'other' is not loaded; this server serves",
        ),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "otter", "override_settings": {"CLIP_stop_at_last_layers": "2"}},
            "override_settings.CLIP_stop_at_last_layers must be an integer, got '2'",
        ),
        (
            "/sdapi/v1/txt2img",
            {"prompt": "otter", "alwayson_scripts": {"controlnet": {"args": "unit"}}},
            "alwayson_scripts.controlnet must be {'args': [unit, ...]}",
        ),
        ("/controlnet/detect", {"controlnet_input_images": []}, "controlnet_input_images is empty: send at least one"),
        (
            "/controlnet/detect",
            {"controlnet_input_images": ["a"], "low_vram": True},
            "low_vram is not supported by ldmkit",
        ),
        (
            "/controlnet/detect",
            {"controlnet_input_images": ["a"], "controlnet_masks": ["a"]},
            "controlnet_masks are not supported",
        ),
    ],
)
def test_server_refusals_give_their_reason(client, path, body, reason):
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert reason in response.text


def test_server_refuses_a_damaged_image(client):
    response = client.post("/sdapi/v1/img2img", json={"prompt": "otter", "init_images": [png_b64(keep=60)]})
    assert response.status_code == 400 and "init_images[0] is a damaged image" in response.text


def test_server_refuses_an_upscaled_size_of_nothing(client):
    body = {"image": png_b64(), "resize_mode": 1, "upscaling_resize_w": 0, "upscaling_resize_h": 16}
    response = client.post("/sdapi/v1/extra-single-image", json=body)
    assert response.status_code == 400
    assert "the upscaled size 0x16 must be at least 1x1 and at most" in response.text


def png_bytes(mode="RGB", size=(16, 16), color=(128, 64, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def edit(client, files, data=None):
    return client.post("/v1/images/edits", files=files, data={"prompt": "otter", **(data or {})})


def test_openai_edits_take_multipart_only(client):
    response = client.post("/v1/images/edits", json={"prompt": "otter"})
    assert response.status_code == 400
    assert "this endpoint takes multipart/form-data (image files and fields)" in response.text


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ([("mask", ("m.png", png_bytes("RGBA")))], "image is required: one image file"),
        ([("image", ("a.png", png_bytes())), ("image", ("b.png", png_bytes()))], "image: send one image, got 2"),
        (
            [("image", ("a.png", png_bytes())), ("mask", ("m.png", png_bytes("RGBA", (8, 8))))],
            "mask is 8x8; it must have the image's size 16x16",
        ),
        (
            [("image", ("a.png", png_bytes())), ("mask", ("m.png", png_bytes()))],
            "mask must have an alpha channel: its fully transparent part is what is repainted",
        ),
        (
            [("image", ("a.png", png_bytes())), ("mask", ("m.png", png_bytes("RGBA", color=(0, 0, 0, 255))))],
            "mask has no fully transparent pixel: nothing to repaint",
        ),
    ],
)
def test_openai_edit_uploads_are_refused_with_their_reason(client, files, reason):
    response = edit(client, files)
    assert response.status_code == 400, response.text
    assert reason in response.text


def test_serve_refuses_a_negative_queue_size(capsys):
    err = cli_error(capsys, "serve", "--queue-size", "-1")
    assert err == "ldm: error: --queue-size must be >= 0, got -1"


def test_serve_refuses_an_origin_that_is_no_origin(capsys):
    err = cli_error(capsys, "serve", "--allowed-origin", "example.com")
    assert err == "ldm: error: --allowed-origin must look like https://host or http://host:port, got 'example.com'"


def test_cli_size_must_look_like_width_x_height(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["generate", "otter", "--size", "big", "-o", str(tmp_path)])
    assert exited.value.code == 2
    assert "error: argument --size: size must look like 512x768, got 'big'" in capsys.readouterr().err


def test_cli_names_a_missing_lora_folder(tmp_path, capsys):
    err = cli_error(capsys, "generate", "otter", "--lora-dir", str(tmp_path / "loras"), "-o", str(tmp_path / "out"))
    assert err == f"ldm: error: LoRA folder not found: {tmp_path / 'loras'}"


def test_cli_names_an_output_folder_it_cannot_write(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = cli_error(capsys, "generate", "otter", "-o", str(tmp_path / "file" / "out"))
    assert err.startswith(f"ldm: error: cannot write to output folder {tmp_path / 'file' / 'out'}: ")


def test_cli_refuses_an_init_image_over_the_pixel_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "MAX_INPUT_PIXELS", 100)
    image().save(tmp_path / "init.png")
    err = cli_error(capsys, "generate", "otter", "--init-image", str(tmp_path / "init.png"), "-o", str(tmp_path))
    assert err == f"ldm: error: init image {tmp_path / 'init.png'} is 16x16, over the 100 pixel limit"


def test_cli_names_an_init_image_it_cannot_read(tmp_path, capsys):
    (tmp_path / "init.png").write_bytes(b"not an image")
    err = cli_error(capsys, "generate", "otter", "--init-image", str(tmp_path / "init.png"), "-o", str(tmp_path))
    assert err.startswith(f"ldm: error: cannot read init image {tmp_path / 'init.png'}: ")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"image": "a.png"}, "image must be an uploaded file"),
        ({"prompt": ["otter", "fox"]}, "prompt must be one text value"),
    ],
)
def test_openai_edit_form_fields_are_refused_with_their_reason(client, data, reason):
    files = [("mask", ("m.png", png_bytes("RGBA")))]
    if "image" not in data:
        files.append(("image", ("a.png", png_bytes())))
    response = client.post("/v1/images/edits", files=files, data={"prompt": "otter", **data})
    assert response.status_code == 400, response.text
    assert reason in response.text


def test_cli_says_what_was_written_when_a_run_fails_after_checks(tiny_folder, tmp_path, capsys):
    # The file looks like a LoRA (checked before any compute) but targets no layer of the model: it fails when applied.
    (tmp_path / "loras").mkdir()
    weights = {f"lora_unet_nothing_here.lora_{end}.weight": torch.zeros(2, 2) for end in ("up", "down")}
    safetensors.torch.save_file(weights, tmp_path / "loras" / "bad.safetensors")
    args = ["--model", str(tiny_folder), "--lora-dir", str(tmp_path / "loras"), "--steps", "1", "--size", "16x16"]
    assert main(["generate", "otter <lora:bad>", *args, "-o", str(tmp_path / "out")]) == 2
    # In-process, transformers' weight-loading bar may come first (the CLI quiets it before importing transformers,
    # which this process already did); diffusers' own log of the failure must not: the error is said once.
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any("was unsuccessful" in line for line in lines)
    err = lines[-1]
    assert err.startswith("ldm: error: cannot apply LoRA bad.safetensors to this model: ")
    assert err.endswith("; no file was written")


def test_a_controlnet_pth_whose_state_dict_holds_itself_is_refused_not_looped_over(tmp_path):
    from ldmkit.controlnet import read_weights

    checkpoint = {}
    checkpoint["state_dict"] = checkpoint
    torch.save(checkpoint, tmp_path / "loop.pth")
    with pytest.raises(ModelLoadError, match="loop.pth is not a checkpoint: its state_dict holds itself"):
        read_weights(tmp_path / "loop.pth")


# ---- control_units.py: a ControlNet unit, as the Python API, the CLI and the A1111 API build it ----


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "None"}, "model: a ControlNet unit needs a ControlNet model, got 'None'"),
        ({"image": "sketch.png"}, "image must be a PIL image, not str"),
        ({"weight": 2.5}, "weight must be from 0 to 2, got 2.5"),
        ({"guidance_end": 1.5}, "guidance_end must be a fraction of the schedule from 0 to 1, got 1.5"),
        ({"guidance_start": 0.6, "guidance_end": 0.4}, "guidance_start (0.6) must not be after guidance_end (0.4)"),
        (
            {"resize_mode": "Stretch"},
            "resize_mode must be one of Just Resize, Crop and Resize, Resize and Fill; got 'Stretch'",
        ),
        ({"pixel_perfect": "yes"}, "pixel_perfect must be true or false, got 'yes'"),
    ],
)
def test_control_unit_values_are_refused_with_their_name(fields, message):
    from ldmkit.control_units import ControlUnit

    with pytest.raises(InvalidRequest) as caught:
        ControlUnit(**{"model": "cn", **fields}).validate()
    assert str(caught.value) == message


def a1111_unit(values):
    from ldmkit.control_units import ControlUnit

    return ControlUnit.from_a1111(values, lambda text, what: image())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["cn"], "a ControlNet unit must be a JSON object, got list"),
        (
            {"model": "cn", "input_image": "a", "image": "b"},
            "ControlNet unit has both 'input_image' and 'image'; send one",
        ),
        ({"model": "cn", "oops": 1}, "unknown ControlNet unit field 'oops'"),
        ({"model": "cn", "low_vram": True}, "ControlNet unit field 'low_vram' = True is not supported by ldmkit"),
        ({"model": "cn", "enabled": "yes"}, "enabled must be true or false, got 'yes'"),
        (
            {"model": "cn", "control_mode": 5},
            "control_mode must be one of Balanced, My prompt is more important, ControlNet is more important "
            "(or 0-2), got 5",
        ),
        ({"model": "cn", "image": ["a"]}, "image as a list must be [image, mask]"),
        (
            {"model": "cn", "image": {"image": "a", "mask": "b"}},
            "ControlNet unit image mask (inpaint ControlNets) is not supported by ldmkit",
        ),
        ({"model": "cn", "image": 7}, "ControlNet unit image must be base64 text, got int"),
    ],
)
def test_a1111_control_units_are_refused_naming_the_field(values, message):
    with pytest.raises(InvalidRequest) as caught:
        a1111_unit(values)
    assert str(caught.value) == message


def test_a_requests_control_units_are_checked_by_index():
    from ldmkit.control_units import MAX_UNITS, ControlUnit, check_units

    unit = ControlUnit(model="cn", image=image())
    cases = [
        ((unit,) * (MAX_UNITS + 1), False, "controls must be a list of at most 8 ControlNet units"),
        ((unit, {"model": "cn"}), False, "ControlNet unit 1 must be a ControlUnit, not dict"),
        ((dataclasses.replace(unit, weight=3),), False, "ControlNet unit 0: weight must be from 0 to 2, got 3"),
        (
            (dataclasses.replace(unit, image=None),),
            False,
            "ControlNet unit 0 has no image (only img2img can use its init image)",
        ),
    ]
    for units, has_init_image, message in cases:
        with pytest.raises(InvalidRequest) as caught:
            check_units(units, has_init_image)
        assert str(caught.value) == message
    check_units((dataclasses.replace(unit, image=None),), has_init_image=True)  # img2img: its init image


# ---- server/controlnet_api.py: units in alwayson_scripts, and /controlnet/detect ----


class Library:
    """Every ControlNet name resolves (the folder is another test's subject)."""

    def resolve_name(self, name):
        return name


@pytest.mark.parametrize(
    ("scripts", "message"),
    [
        ([{"args": []}], "alwayson_scripts must be an object of script name -> {'args': [...]}"),
        (
            {"ADetailer": {"args": []}},
            "alwayson_scripts.ADetailer is not supported: ldmkit runs the ControlNet script only",
        ),
        ({"controlnet": {"args": {}}}, "alwayson_scripts.controlnet must be {'args': [unit, ...]}"),
        (
            {"controlnet": {"args": [{"model": "cn", "oops": 1}]}},
            "alwayson_scripts.controlnet.args[0]: unknown ControlNet unit field 'oops'",
        ),
        ({"controlnet": {"args": [{"model": "cn"}] * 9}}, "at most 8 ControlNet units per request, got 9"),
    ],
)
def test_alwayson_scripts_are_refused_naming_where(scripts, message):
    pytest.importorskip("fastapi", reason="server extras not installed (pip install -e .[server])")
    from ldmkit.server.controlnet_api import units_from_scripts

    with pytest.raises(InvalidRequest) as caught:
        units_from_scripts(scripts, Library(), max_pixels=4096)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"controlnet_masks": ["x"]}, "controlnet_masks are not supported (no ldmkit preprocessor takes a mask)"),
        ({"low_vram": True}, "low_vram is not supported by ldmkit; send false"),
        ({"controlnet_input_images": []}, "controlnet_input_images is empty: send at least one base64 image"),
        ({"controlnet_input_images": ["IMAGE"] * 9}, "at most 8 controlnet_input_images per request"),
    ],
)
def test_controlnet_detect_refusals_get_400_with_the_reason(client, body, message):
    body = {"controlnet_module": "canny", "controlnet_input_images": ["IMAGE"], **body}
    body["controlnet_input_images"] = [png_b64() for _ in body["controlnet_input_images"]]
    response = client.post("/controlnet/detect", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == message
