"""make_fast: what it changes on a Pipeline, and that the pictures stay the same (tiny model, CPU)."""

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import FusedAttnProcessor2_0

from ldmkit import Pipeline
from ldmkit.fast import compile_models, make_fast, use_fp16

KWARGS = {
    "prompt": "an otter in a river",
    "negative_prompt": "blurry",
    "steps": 4,
    "sampler": "DDIM",
    "seed": 7,
    "width": 16,
    "height": 16,
    "num_images": 2,
}


def pixels(pipe):
    return np.stack([np.asarray(image, dtype=int) for image in pipe.generate(**KWARGS).images])


def test_make_fast_on_cpu_changes_nothing(tiny_components):
    # Compile, fp16 and the layouts that serve the compiled UNet were measured to pay on CUDA only.
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    make_fast(pipe)
    assert not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert pipe.dtype == torch.float32
    assert not any(isinstance(p, FusedAttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    assert not pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_fused_qkv_and_channels_last_keep_the_images(tiny_components):
    eager = pixels(Pipeline(tiny_components, torch.device("cpu"), torch.float32))
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    make_fast(pipe, channels_last=True, fuse_qkv=True, compile=False)
    for model in (pipe.unet, pipe.vae):
        processors = model.attn_processors.values()
        assert processors and all(isinstance(p, FusedAttnProcessor2_0) for p in processors)
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(pixels(pipe) - eager).max() <= 1


def test_compile_models_wraps_unet_and_decoder_once(tiny_components):
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    unet = pipe.unet
    compile_models(pipe, mode="default")
    assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert pipe.unet._orig_mod is unet
    assert pipe.unet.config.in_channels == unet.config.in_channels  # the pipeline reads .config through the wrapper
    decode = pipe.vae.decode
    compile_models(pipe, mode="default")
    assert pipe.unet._orig_mod is unet and pipe.vae.decode is decode


def test_use_fp16_casts_models_and_pipeline_dtype(tiny_components):
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    use_fp16(pipe)
    assert pipe.dtype == torch.float16
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        assert next(model.parameters()).dtype == torch.float16


def test_unknown_compile_mode_is_refused(tiny_components):
    pipe = Pipeline(tiny_components, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="compile mode"):
        make_fast(pipe, mode="fastest")
