"""AUTOMATIC1111's request fields that ldmkit does not implement: accepted where the value is A1111's default or
has no effect, else refused with a 400 that names the field (never accepted and silently ignored).

The field names and defaults are those of A1111 1.10's /sdapi/v1 request models (StableDiffusionProcessingTxt2Img
and Img2Img as its API exposes them). docs/server.md has the whole table.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from ldmkit.errors import InvalidRequest
from ldmkit.params import MAX_SEED

CLIP_SKIP_SETTING = "CLIP_stop_at_last_layers"  # A1111's name for clip skip
MODEL_SETTING = "sd_model_checkpoint"
VAE_SETTING = "sd_vae"
# sd_vae values without a VAE file name: "Automatic" runs the VAE `ldm serve --vae` gives, else the model's own (A1111
# looks for a file named after the model); "None" is the model's own.
OWN_VAE = ("Automatic", "None")
ENSD_SETTING = "eta_noise_seed_delta"  # A1111's seed offset of the samplers' per-step noise (ldmkit.noise)
SAME_SAMPLER = "Use same sampler"  # A1111's UI value of hr_sampler_name: the first pass's
SAME_SCHEDULER = "Use same scheduler"
INPAINT_FILL, INPAINT_ORIGINAL = 0, 1  # A1111's inpainting_fill modes ldmkit runs; 'original' unless 'fill' is sent


def refuse(name: str, value: Any, why: str) -> None:
    raise InvalidRequest(f"{name}={value!r} is not supported: {why}")


def check_processing(body, sampler) -> None:
    """The fields txt2img and img2img share; `sampler` is the request's resolved ldmkit.samplers.Sampler."""
    if body.restore_faces:
        refuse("restore_faces", True, "this server has no face restorer")
    if body.tiling:
        refuse("tiling", True, "tileable images are not implemented")
    # subseed, seed resize, eta and the churn options are GenerationParams' (checked there, per sampler)
    if body.s_min_uncond not in (None, 0):
        refuse("s_min_uncond", body.s_min_uncond, "skipping the unconditional pass is not implemented (send 0)")
    if body.disable_extra_networks:
        refuse("disable_extra_networks", True, "<lora:...> tags are always applied here; remove them instead")
    if body.firstpass_image:
        refuse("firstpass_image", "...", "a given first-pass image is not implemented")
    if body.script_name not in (None, "", "None"):
        refuse("script_name", body.script_name, "this server runs no scripts (GET /sdapi/v1/scripts)")
    if body.infotext:
        refuse("infotext", "...", "reading the request from an infotext is not implemented; send the fields")


def seed_resize_from(body) -> tuple[int, int] | None:
    """A1111's seed_resize_from_w/_h as (width, height); either <= 0 turns it off, as in A1111."""
    width, height = body.seed_resize_from_w, body.seed_resize_from_h
    return None if width <= 0 or height <= 0 else (width, height)


def s_tmax(body) -> float:
    """A1111 reads an s_tmax of 0 (or none) as infinity: churn at every noise level."""
    return body.s_tmax or math.inf


def check_txt2img(body, sampler, model_name: str) -> None:
    check_processing(body, sampler)
    if not body.enable_hr:
        return  # the hr_* fields only describe the second pass
    if body.hr_prompt not in ("", body.prompt):
        refuse("hr_prompt", body.hr_prompt, "a second-pass prompt different from the prompt is not implemented")
    if body.hr_negative_prompt not in ("", body.negative_prompt):
        refuse("hr_negative_prompt", body.hr_negative_prompt, "a second-pass negative prompt is not implemented")
    if body.hr_sampler_name not in (None, "", SAME_SAMPLER) and body.hr_sampler_name not in (
        body.sampler_name,
        sampler.name,
        sampler.algorithm.name,
    ):
        refuse("hr_sampler_name", body.hr_sampler_name, "the second pass runs the first pass's sampler")
    if body.hr_scheduler not in (None, "", SAME_SCHEDULER, body.scheduler):
        refuse("hr_scheduler", body.hr_scheduler, "the second pass runs the first pass's schedule type")
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint", model_name):
        refuse("hr_checkpoint_name", body.hr_checkpoint_name, f"this server serves {model_name!r} only")


def check_img2img(body, sampler) -> None:
    check_processing(body, sampler)
    if body.resize_mode != 0:
        refuse("resize_mode", body.resize_mode, "only 0 (just resize) is implemented")
    if body.initial_noise_multiplier not in (None, 1):
        refuse("initial_noise_multiplier", body.initial_noise_multiplier, "only 1 is implemented")
    if body.latent_mask:
        refuse("latent_mask", "...", "a separate latent mask is not implemented")
    if not body.mask:
        return  # the inpainting fields describe the mask's use only
    # A1111's defaults here are 'only masked' (true) and 'fill' (0); an omitted field runs ldmkit's whole-picture,
    # 'original' inpainting, which docs/server.md says; a value sent is run or refused.
    if "inpaint_full_res" in body.model_fields_set and body.inpaint_full_res:
        refuse("inpaint_full_res", True, "'only masked' inpainting is not implemented; send false (whole picture)")
    if "inpainting_fill" in body.model_fields_set and body.inpainting_fill not in (INPAINT_FILL, INPAINT_ORIGINAL):
        refuse("inpainting_fill", body.inpainting_fill, "only 0 (fill) and 1 (original) are implemented")
    if not body.mask_round:
        refuse("mask_round", False, "the mask is always rounded here (A1111's default)")


def fills_masked_area(body) -> bool:
    """inpainting_fill 0 sent with a mask: the init image's masked part is filled from around it first."""
    return bool(body.mask) and "inpainting_fill" in body.model_fields_set and body.inpainting_fill == INPAINT_FILL


def mask_blur(body) -> int:
    """A1111's mask_blur sets both directions; without it, mask_blur_x and _y must agree (one blur radius here)."""
    if body.mask_blur is not None:
        return body.mask_blur
    if body.mask_blur_x != body.mask_blur_y:
        refuse(
            "mask_blur_y", body.mask_blur_y, f"one blur for both directions only (mask_blur_x is {body.mask_blur_x})"
        )
    return body.mask_blur_x


class ServerOptions:
    """A1111's settings that POST /sdapi/v1/options changes for the server's life; a request's override_settings
    win over them for that request. Thread-safe: the web UI's threads and the API's handlers share one."""

    def __init__(self, model_name: str, check_clip_skip=None, vae_names=list):
        self.model_name = model_name
        self.check_clip_skip = check_clip_skip  # raises InvalidRequest for the model's bad values
        self.vae_names = vae_names  # the VAE names sd_vae may take besides OWN_VAE (the server's --vae-dir), now
        self._values = {CLIP_SKIP_SETTING: 1, VAE_SETTING: OWN_VAE[0], ENSD_SETTING: 0}
        self._lock = threading.Lock()

    def as_dict(self) -> dict:
        with self._lock:
            return {MODEL_SETTING: self.model_name, **self._values}

    def update(self, options: dict[str, Any]) -> None:
        """All or nothing: every key is checked before any is kept."""
        settings = resolve_settings(options, self, "options")
        with self._lock:
            self._values.update(settings)

    def for_request(self, override_settings: dict[str, Any], keep: bool = False) -> dict[str, Any]:
        """The settings a request runs: the stored ones with its override_settings on top, checked; keep=True
        (override_settings_restore_afterwards false) stores the overrides, as A1111 does."""
        settings = resolve_settings(override_settings, self, "override_settings")
        with self._lock:
            if keep:
                self._values.update(settings)
            return {**self._values, **settings}


def resolve_settings(settings: dict[str, Any], options: ServerOptions, where: str) -> dict[str, Any]:
    """The settings ldmkit applies, checked; an unknown key or a value ldmkit cannot run is refused by name."""
    known = (MODEL_SETTING, CLIP_SKIP_SETTING, VAE_SETTING, ENSD_SETTING)
    unknown = sorted(key for key in settings if key not in known)
    if unknown:
        raise InvalidRequest(
            f"{where}: {', '.join(unknown)} not supported; this server has {MODEL_SETTING}, {CLIP_SKIP_SETTING},"
            f" {VAE_SETTING} and {ENSD_SETTING}"
        )
    wanted = settings.get(MODEL_SETTING, options.model_name)
    if wanted != options.model_name:
        raise InvalidRequest(f"model {wanted!r} is not loaded; this server serves {options.model_name!r} only")
    result = {}
    if CLIP_SKIP_SETTING in settings:
        clip_skip = settings[CLIP_SKIP_SETTING]
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
            raise InvalidRequest(f"{where}.{CLIP_SKIP_SETTING} must be an integer, got {clip_skip!r}")
        if options.check_clip_skip is not None:
            options.check_clip_skip(clip_skip)
        result[CLIP_SKIP_SETTING] = clip_skip
    if ENSD_SETTING in settings:
        ensd = settings[ENSD_SETTING]
        if isinstance(ensd, bool) or not isinstance(ensd, int) or not 0 <= ensd <= MAX_SEED:
            raise InvalidRequest(f"{where}.{ENSD_SETTING} must be an integer from 0 to {MAX_SEED}, got {ensd!r}")
        result[ENSD_SETTING] = ensd
    if VAE_SETTING in settings:
        vae, names = settings[VAE_SETTING], options.vae_names()
        if vae not in OWN_VAE and vae not in names:
            have = ", ".join([*OWN_VAE, *names])
            raise InvalidRequest(f"{where}.{VAE_SETTING}: unknown VAE {vae!r}; this server has: {have}")
        result[VAE_SETTING] = vae
    return result
