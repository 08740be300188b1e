"""Model families: what differs between SD 1.x/2.x and a family such as SDXL, behind one small interface.

Everything else (the request, the denoiser and sampling loop, the samplers, inpainting, hires fix, the VAE
codec with tiling, the fast path, the server) is shared. A family is told the models (a ModelState) and
answers the questions below; `family_of(components)` picks the family a loaded model belongs to.

To add a family (docs/architecture.md): subclass ModelFamily in families/<name>.py, implement its methods,
and put it in FAMILIES before the families it must be told apart from.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from ldmkit.errors import ModelLoadError


@dataclass
class Conditioning:
    """What the UNet is conditioned on for one batch, batched as its input is: with guidance, the unconditional
    half first, then num_images rows per prompt."""

    context: torch.Tensor  # (B or 2B, tokens, D): the cross-attention states (`encoder_hidden_states`)
    unet_kwargs: dict = field(default_factory=dict)  # extra UNet inputs, e.g. SDXL's added_cond_kwargs


class ModelFamily(ABC):
    """What a Pipeline asks of a model family. Methods take the models (a ModelState) and plain values."""

    name: str  # short name for messages and docs ("sd", "sdxl")

    @classmethod
    @abstractmethod
    def matches(cls, components) -> bool:
        """Whether loaded components (ldmkit.loading.Components) are of this family."""

    @abstractmethod
    def default_size(self, models) -> int:
        """The side in pixels the model was trained at: the size of a request that gives none."""

    @abstractmethod
    def check(self, models, params) -> None:
        """Refuse (InvalidRequest) what this family's models cannot do, e.g. a clip skip beyond the text encoder."""

    @abstractmethod
    def context_tokens(self, models, texts: list[str]) -> int:
        """How long the conditioning of these texts (prompts and negative prompt, batched together) will be:
        what the memory estimate counts before encoding."""

    @abstractmethod
    def encode_prompt(
        self,
        models,
        prompts: tuple[str, ...],
        negative_prompt: str,
        num_images: int,
        use_guidance: bool,
        clip_skip: int,
        size: tuple[int, int],
    ) -> Conditioning:
        """Prompts (without LoRA tags) -> the UNet's conditioning; `size` (width, height) for families whose
        conditioning includes the image size (SDXL's time ids)."""

    @abstractmethod
    def diffusers_pipeline(self, parts, scheduler, pipeline_class=None):
        """diffusers' own pipeline of this family over these modules (no copies): the reference in tests and
        benchmarks, the host for diffusers' LoRA loader, the writer of diffusers folders. `parts` has tokenizer,
        text_encoder, unet and vae (Components or ModelState); `pipeline_class` picks a variant (img2img...)."""

    def to_latents(self, vae, z: torch.Tensor) -> torch.Tensor:
        """The VAE's latent sample -> the latents the UNet works in."""
        return z * vae.config.scaling_factor

    def from_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The UNet's latents -> what the VAE decodes (to_latents undone)."""
        return latents / vae.config.scaling_factor


def family_of(components) -> ModelFamily:
    from ldmkit.families.sd import StableDiffusion

    for family in (StableDiffusion,):
        if family.matches(components):
            return family()
    raise ModelLoadError(f"{components.name}: no model family of ldmkit fits this UNet (SD 1.x and 2.x are supported)")


def reference_pipeline(components, scheduler=None, pipeline_class=None):
    """diffusers' own pipeline over loaded components (ldmkit.loading.Components), their family's, with no safety
    checker: for tests, benchmarks and saving. Their own scheduler unless one is given."""
    scheduler = scheduler or scheduler_from_config(components.scheduler_config)
    return family_of(components).diffusers_pipeline(components, scheduler, pipeline_class)


def scheduler_from_config(config: dict):
    """The diffusers scheduler a scheduler config names (DDIM where it names none)."""
    import diffusers

    config = dict(config)
    return getattr(diffusers, config.pop("_class_name", "DDIMScheduler")).from_config(config)
