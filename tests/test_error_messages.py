"""Each user-facing error message is reached once, and says what it should (issue 21: messages no test reached)."""

import dataclasses

import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from support.tiny import make_tiny_components

from ldmkit.cli import main
from ldmkit.embeddings import load_embeddings, read_embedding
from ldmkit.errors import InvalidRequest, LdmError, ModelLoadError
from ldmkit.loading import load_components
from ldmkit.lora import applied_loras, prompt_loras, resolve_lora
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


def test_embeddings_are_refused_for_sdxl(tmp_path):
    components = make_tiny_components()
    sdxl_like = dataclasses.replace(
        components, tokenizer_2=components.tokenizer, text_encoder_2=components.text_encoder
    )
    with pytest.raises(InvalidRequest, match=r"textual-inversion embeddings are not supported for SDXL models yet"):
        Pipeline(sdxl_like, CPU, torch.float32, embeddings_dir=tmp_path)


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
            r"negative prompt: '\[cat:dog:0\.5\]' is AUTOMATIC1111's prompt editing \(\[from:to:when\]\) or alternation",
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
