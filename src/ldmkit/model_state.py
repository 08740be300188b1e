"""The models a Pipeline runs, in their current form, and the record of what was done to them.

A speed-up (ldmkit.fast), VAE tiling (ldmkit.tiled_vae) or a LoRA is a transform: a function that takes a
`ModelState` and returns the next one, naming itself in `transforms`. Only the Pipeline installs the result
(`Pipeline.apply`), so no module rewrites the pipeline's attributes, and whether the UNet is compiled or its
attention fused is read from the record, not guessed from the modules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ldmkit import tiled_vae


@dataclass(frozen=True)
class ModelState:
    tokenizer: object
    text_encoder: torch.nn.Module | None
    unet: torch.nn.Module  # the module itself: its config, its LoRA layers and hooks live here
    vae: torch.nn.Module
    device: torch.device
    dtype: torch.dtype  # of the weights; the activations follow it
    unet_forward: Callable | None = None  # what runs the UNet when not the module (the fast path's compiled call)
    vae_decode: Callable | None = None  # what runs vae.decode when not the method itself (compiled)
    vae_tile_px: int | None = None  # VAE encode/decode in tiles of this many image pixels (ldmkit.tiled_vae)
    transforms: tuple[str, ...] = ()  # what was applied, in order ("fp16", "fused_qkv", "vae_tiling:512", ...)
    # SDXL's second tokenizer and text encoder (OpenCLIP bigG with its projection) and its model_index flags
    # (loading.Components has the same three); the SDXL refiner has these and no tokenizer/text_encoder.
    tokenizer_2: object = None
    text_encoder_2: torch.nn.Module | None = None
    pipeline_config: dict = dataclasses.field(default_factory=dict)
    offload_hooks: tuple = ()  # accelerate's hooks of ldmkit.offload: each model on the GPU only while it runs
    # what runs each text encoder when not the module (the fast path's CUDA graphs; ldmkit.fast.FastTextEncoder)
    text_encoder_forward: Callable | None = None
    text_encoder_2_forward: Callable | None = None

    def release(self) -> None:
        """With offload, every model back to the CPU (a request's last model stays on the GPU otherwise)."""
        for hook in self.offload_hooks:
            hook.offload()

    def with_transform(self, name: str, **changes) -> ModelState:
        """The state after the transform `name`, which changed the fields in `changes` (modules may have changed in
        place too: the name records it)."""
        return dataclasses.replace(self, transforms=(*self.transforms, name), **changes)

    def has(self, transform: str) -> bool:
        """Whether a transform of this name (before any ':') was applied."""
        return any(t.split(":")[0] == transform for t in self.transforms)

    @property
    def run_unet(self) -> Callable:
        """Called as diffusers' UNet2DConditionModel is."""
        return self.unet_forward or self.unet

    @property
    def run_text_encoder(self) -> Callable | None:
        """Called as transformers' CLIP text encoder is; None where the model has none (the SDXL refiner)."""
        return self.text_encoder_forward or self.text_encoder

    @property
    def run_text_encoder_2(self) -> Callable | None:
        return self.text_encoder_2_forward or self.text_encoder_2

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents in the VAE's own scale -> (B, 3, H, W) in [-1, 1]; in tiles when tiling is on and
        the image is larger than one (tiles run eager: their layers change per tile)."""
        if self.vae_tile_px is not None and tiled_vae.needs_tiles(latents, self.vae_tile_px // self.vae_scale_factor):
            return tiled_vae.decode(self.vae, latents, self.vae_tile_px)
        return (self.vae_decode or self.vae.decode)(latents, return_dict=False)[0]

    def encode(self, pixels: torch.Tensor):
        """(B, 3, H, W) in [-1, 1] -> the VAE's posterior (a DiagonalGaussianDistribution), tiled as decode is."""
        if self.vae_tile_px is not None and tiled_vae.needs_tiles(pixels, self.vae_tile_px):
            return tiled_vae.encode(self.vae, pixels, self.vae_tile_px)
        return self.vae.encode(pixels).latent_dist
