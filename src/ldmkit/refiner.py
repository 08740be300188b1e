"""A refiner: a second model that finishes the base model's denoising in latent space (SDXL base + refiner).

The base runs the steps of the schedule down to the switch point, a fraction of the training timesteps as
diffusers' `denoising_end`/`denoising_start` define it; the refiner runs the rest of the same `steps`-step
schedule on a fresh scheduler of its own, from the base's latents as they are (no new noise), with its own
conditioning (the SDXL refiner's: bigG alone, aesthetic-score time ids), and its VAE decodes the image.
AUTOMATIC1111 names it in the infotext as "Refiner: name [hash], Refiner switch at: 0.8".

With the hires fix the refiner finishes the hires pass (AUTOMATIC1111's default): the base pass is the base model's
alone, the hires pass is the base's down to the switch point (none of it if the pass starts below) and the refiner's
after, conditioned on the hires size. Inpainting (regular models) keeps the known region through the refiner's
steps too, re-noised to each of its steps, as AUTOMATIC1111's denoiser blends it whichever model runs. ControlNets
guide the base model's steps only (their start/end are fractions of the whole pass), as diffusers' SDXL ControlNet
pipeline with `denoising_end` followed by the refiner does: a ControlNet made for the base does not fit the
refiner's UNet.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from ldmkit.errors import InvalidRequest

DEFAULT_SWITCH = 0.8  # AUTOMATIC1111's and diffusers' examples' default


def check_refiner(base, refiner, p) -> None:
    """Refuse (InvalidRequest) a refiner this base cannot hand its latents to, or a request it cannot finish.

    `base` and `refiner` are Pipelines; `p` the resolved request (with a refiner)."""
    if refiner is base:
        raise InvalidRequest("the refiner is the base model itself; give a different model or none")
    if refiner.latent_channels != base.latent_channels or refiner.vae_scale_factor != base.vae_scale_factor:
        raise InvalidRequest(f"refiner {refiner.model_name}: its latents differ from {base.model_name}'s")
    if refiner.is_inpainting_model or base.is_inpainting_model:
        # An inpainting UNet takes the mask and masked image as input channels; the other model would not (or would
        # need them from a pass that never made them): no hand-over between the two is defined.
        raise InvalidRequest("a refiner is not supported with an inpainting model (9-channel UNet)")
    if refiner.device != base.device:
        raise InvalidRequest(f"the refiner is on {refiner.device}, the model on {base.device}: load both on one")
    refiner.family.check(refiner.state, p)
    from ldmkit.denoise import Schedule
    from ldmkit.samplers import get_sampler

    sampler = get_sampler(p.sampler)
    steps, strength = refined_pass(p)
    own = Schedule.make(sampler, base.scheduler_config, steps, strength).until(p.refiner_switch)
    if p.hires is None and not len(own):  # (a hires pass may go to the refiner whole: the base pass is the model's)
        raise InvalidRequest(f"refiner switch at {p.refiner_switch} leaves the model no step of its own; raise it")
    if not len(Schedule.make_after(sampler, refiner.scheduler_config, steps, p.refiner_switch, strength)):
        raise InvalidRequest(f"refiner switch at {p.refiner_switch} leaves the refiner no step of {steps}; lower it")


def refined_pass(p) -> tuple[int, float | None]:
    """(steps, strength) of the pass the refiner finishes: the hires pass when there is one, as AUTOMATIC1111 does by
    default (its setting "Hires fix: which pass to enable refiner for" is "second pass"), else the only pass."""
    if p.hires is not None:
        return p.hires.pass_steps(p.steps), p.hires.strength
    return p.steps, (p.strength if p.init_image is not None else None)


def refiner_infotext(refiner, switch: float) -> dict:
    """{"Refiner": "name [hash]", "Refiner switch at": switch} as A1111 writes them (the hash of a single file)."""
    title = refiner.model_name if refiner.model_hash is None else f"{refiner.model_name} [{refiner.model_hash}]"
    return {"Refiner": title, "Refiner switch at": switch}


def checkpoint_shorthash(path: str | os.PathLike) -> str:
    """A1111's short checkpoint hash: the first 10 hex digits of the file's sha256 (cached per file version)."""
    path = Path(path)
    stat = path.stat()
    return _sha256(path.resolve(), stat.st_mtime_ns, stat.st_size)[:10]


@lru_cache(maxsize=16)
def _sha256(path: Path, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
