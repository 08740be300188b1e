"""fp16 safety of the VAE encode (img2img, inpainting, hires' pixel upscaler): an overflow is redone in fp32."""

import numpy as np
import torch
from PIL import Image
from support.sdxl import make_tiny_sdxl_components

from ldmkit import Pipeline


def overflowing_fp16_encoder(pipe):
    """The VAE's encoder made to overflow in fp16 only (inf in the posterior's moments), as the SDXL VAE does on
    bright images; returns the dtypes the encoder saw."""
    real_encoder = pipe.vae.encoder.forward
    seen = []

    def encode(x):
        seen.append(x.dtype)
        out = real_encoder(x)
        return out * float("inf") if out.dtype == torch.float16 else out

    pipe.vae.encoder.forward = encode
    return seen


def init_image():
    return Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def test_an_overflowing_fp16_encode_is_redone_in_fp32_and_gives_the_fp32_latents():
    components = make_tiny_sdxl_components(seed=6)
    reference = Pipeline(components, torch.device("cpu"), torch.float32)
    pixels = reference.image_to_tensor(init_image(), 16, 16)
    expected = reference.encode_samples(pixels, [torch.Generator().manual_seed(3)])
    pipe = Pipeline(components, torch.device("cpu"), torch.float16)
    seen = overflowing_fp16_encoder(pipe)
    latents = pipe.encode_samples(pixels.half(), [torch.Generator().manual_seed(3)])
    assert seen == [torch.float16, torch.float32]  # tried in fp16, redone in fp32
    assert latents.dtype == torch.float16 and torch.isfinite(latents).all()
    # the fp32 retry's latents, up to the fp16 input's and output's rounding
    assert torch.allclose(latents.float(), expected, atol=2e-2, rtol=1e-2)
    assert pipe.vae.dtype == torch.float16  # restored after the retry
    modes = pipe.images_to_latents([init_image()])
    assert modes.dtype == torch.float16 and torch.isfinite(modes).all()


def test_a_finite_fp16_encode_is_not_redone():
    pipe = Pipeline(make_tiny_sdxl_components(seed=6), torch.device("cpu"), torch.float16)
    real_encoder = pipe.vae.encoder.forward
    seen = []
    pipe.vae.encoder.forward = lambda x: (seen.append(x.dtype), real_encoder(x))[1]
    pipe.images_to_latents([init_image()])
    assert seen == [torch.float16]
