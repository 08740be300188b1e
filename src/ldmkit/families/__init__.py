"""Model families: what differs between SD 1.x/2.x and a family such as SDXL, behind one small interface.

Everything else (the request, the denoiser and sampling loop, the samplers, inpainting, hires fix, the VAE
codec with tiling, the fast path, the server) is shared. A family is told the models (a ModelState) and
answers the questions below; `family_of(components)` picks the family a loaded model belongs to.

To add a family (docs/architecture.md): subclass ModelFamily (families/base.py) in families/<name>.py,
implement its methods, and add it to FAMILIES.
"""

from __future__ import annotations

from ldmkit.errors import ModelLoadError
from ldmkit.families.base import Conditioning, ModelFamily
from ldmkit.families.sd import StableDiffusion
from ldmkit.families.sdxl import StableDiffusionXL

# tried in order: put a family before those it extends
FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusionXL, StableDiffusion)

__all__ = ["FAMILIES", "Conditioning", "ModelFamily", "family_of", "reference_pipeline", "scheduler_from_config"]


def family_of(components) -> ModelFamily:
    """The family of loaded components: the first in FAMILIES whose `matches` accepts them."""
    for family in FAMILIES:
        if family.matches(components):
            return family()
    raise ModelLoadError(
        f"{components.name}: no model family of ldmkit fits this UNet (SD 1.x, 2.x and SDXL are supported)"
    )


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
