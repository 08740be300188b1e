"""Refuse sizes that cannot fit before allocating anything: a rough peak-memory estimate per request.

Activation memory grows with pixels: SD-style UNets and VAEs use memory-efficient attention (SDPA)
on CUDA and on the CPU, so convolution activations dominate. The constants were measured with the
SD1.5 architecture in fp32 on the CPU (peak RSS growth of one forward): VAE decode at 512x512,
1.0 GB (about 8 bytes x block_out_channels[0] per pixel per byte of dtype); UNet at 256x256 with
batch 2, 0.21 GB (about 80 bytes x block_out_channels[0] per latent pixel per batch item per byte).
Long prompts add their conditioning to the UNet's share: the context itself and the keys and values one
cross-attention layer makes of it (at the widest layer), per batch item. Measured the same way (SD1.5
shapes, fp32, CPU, batch 2, an 8x8 latent): 49,280 context tokens (640 chunks) took 1,152 MiB beyond a
77-token call, context included; this count gives 1,251 MiB (24,640 tokens: 514 measured, 626 counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from ldmkit.errors import InvalidRequest

VAE_DECODE_FACTOR = 8
UNET_FACTOR = 80
HEADROOM = 0.9  # use at most this share of what is free


@dataclass(frozen=True)
class Footprint:
    """What the estimate needs to know of the loaded model (Pipeline.memory_footprint)."""

    dtype: torch.dtype
    vae_scale_factor: int
    unet_channels: int  # the UNet's block_out_channels[0]
    vae_channels: int  # the VAE's block_out_channels[0]
    context_dim: int  # width of the cross-attention context (the text encoder's hidden size)
    attention_width: int  # the widest cross-attention layer (the UNet's block_out_channels[-1])
    vae_tile_px: int | None = None  # the VAE's tile size when it runs in tiles


def estimate_peak_bytes(
    model: Footprint, width: int, height: int, num_images: int, use_guidance: bool, context_tokens: int = 77
) -> int:
    """Activation bytes of the larger of one UNet call and one image's VAE decode (the pipeline decodes one at a
    time; weights are already loaded). `context_tokens`: the conditioning's length (77 per 75-token CLIP chunk).
    """
    dtype_bytes = torch.finfo(model.dtype).bits // 8
    pixels = width * height
    latent_pixels = pixels // model.vae_scale_factor**2
    unet_batch = num_images * (2 if use_guidance else 1)
    unet = UNET_FACTOR * model.unet_channels * latent_pixels * unet_batch * dtype_bytes
    context = context_tokens * (model.context_dim + 2 * model.attention_width) * unet_batch * dtype_bytes
    vae = VAE_DECODE_FACTOR * model.vae_channels * vae_pixels(model, pixels) * dtype_bytes
    return max(unet + context, vae)


def vae_pixels(model: Footprint, pixels: int) -> int:
    """Pixels the VAE holds at once: the whole image, or one tile when tiling is on."""
    if model.vae_tile_px is not None:
        return min(pixels, model.vae_tile_px**2)
    return pixels


def available_bytes(device: torch.device) -> int | None:
    """Free memory on the device (None where it cannot be read, e.g. MPS)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks PyTorch's caching allocator keeps reserved after the last request are free to the next one;
        # the driver counts them as taken, so without them a second identical request would be refused.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached
    if device.type == "cpu":
        return psutil.virtual_memory().available  # what can be allocated without swapping, on every OS
    return None


def check_memory(
    model: Footprint,
    device: torch.device,
    width: int,
    height: int,
    num_images: int,
    use_guidance: bool,
    context_tokens: int = 77,
) -> None:
    need = estimate_peak_bytes(model, width, height, num_images, use_guidance, context_tokens)
    free = available_bytes(device)
    if free is not None and need > free * HEADROOM:
        tiling = "" if model.vae_tile_px is not None else ", or VAE tiling (--vae-tiling)"
        raise InvalidRequest(
            f"{num_images} image(s) of {width}x{height} need about {need / 2**30:.1f} GiB on {device.type}, "
            f"but only {free / 2**30:.1f} GiB is free; use a smaller size or fewer images{tiling}"
        )
