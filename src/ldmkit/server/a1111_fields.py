"""AUTOMATIC1111's request fields beyond the basic ones: those ldmkit implements mapped to GenerationParams' (the
hires pass's sampler, inpainting's area and masked content, the resize mode, the mask blur); those it does not,
accepted where the value is A1111's default or has no effect, else refused with a 400 that names the field (never
accepted and silently ignored).

The field names and defaults are those of A1111 1.10's /sdapi/v1 request models (StableDiffusionProcessingTxt2Img
and Img2Img as its API exposes them). docs/server.md has the whole table.
"""

from __future__ import annotations

import math
import threading
from typing import Any

from ldmkit.errors import InvalidRequest
from ldmkit.params import MAX_SEED
from ldmkit.samplers import get_sampler
from ldmkit.schedules import AUTOMATIC, get_schedule_type
from ldmkit.server.a1111_xyz import is_xyz_script

CLIP_SKIP_SETTING = "CLIP_stop_at_last_layers"  # A1111's name for clip skip
MODEL_SETTING = "sd_model_checkpoint"
VAE_SETTING = "sd_vae"
# sd_vae values without a VAE file name: "Automatic" runs the VAE `ldm serve --vae` gives, else the model's own (A1111
# looks for a file named after the model); "None" is the model's own.
OWN_VAE = ("Automatic", "None")
ENSD_SETTING = "eta_noise_seed_delta"  # A1111's seed offset of the samplers' per-step noise (ldmkit.noise)
A1111_CFG_SCALE = 7.0  # A1111's default cfg_scale
SAME_SAMPLER = "Use same sampler"  # A1111's UI value of hr_sampler_name: the first pass's
SAME_SCHEDULER = "Use same scheduler"
# A1111's inpainting_fill and resize_mode numbers -> GenerationParams.masked_content and resize_mode
MASKED_CONTENTS = {0: "fill", 1: "original", 2: "latent_noise", 3: "latent_nothing"}
RESIZE_MODES = {0: "resize", 1: "crop", 2: "fill", 3: "latent"}


def refuse(name: str, value: Any, why: str) -> None:
    raise InvalidRequest(f"{name}={value!r} is not supported: {why}")


def check_processing(body, sampler) -> None:
    """The fields txt2img and img2img share; `sampler` is the request's resolved ldmkit.samplers.Sampler."""
    if body.restore_faces:
        refuse("restore_faces", True, "this server has no face restorer")
    # subseed, seed resize, eta and the churn options are GenerationParams' (checked there, per sampler)
    if body.s_min_uncond not in (None, 0):
        refuse("s_min_uncond", body.s_min_uncond, "skipping the unconditional pass is not implemented (send 0)")
    if body.disable_extra_networks:
        refuse("disable_extra_networks", True, "<lora:...> tags are always applied here; remove them instead")
    if body.firstpass_image:
        refuse("firstpass_image", "...", "a given first-pass image is not implemented")
    if body.script_name not in (None, "", "None") and not is_xyz_script(body.script_name):
        refuse("script_name", body.script_name, "this server runs the 'x/y/z plot' script only (GET /sdapi/v1/scripts)")
    if body.infotext:
        refuse("infotext", "...", "reading the request from an infotext is not implemented; send the fields")


def seed_resize_from(body) -> tuple[int, int] | None:
    """A1111's seed_resize_from_w/_h as (width, height); either <= 0 turns it off, as in A1111."""
    width, height = body.seed_resize_from_w, body.seed_resize_from_h
    return None if width <= 0 or height <= 0 else (width, height)


def cfg_scale(body, model_guidance: float | None) -> float:
    """The request's cfg_scale; omitted: the guidance the model's folder names (Components.default_guidance), else
    A1111's default 7 (not ldmkit's 7.5: clients that omit it get what A1111 would give them)."""
    if body.cfg_scale is not None:
        return body.cfg_scale
    return A1111_CFG_SCALE if model_guidance is None else model_guidance


def s_tmax(body) -> float:
    """A1111 reads an s_tmax of 0 (or none) as infinity: churn at every noise level."""
    return body.s_tmax or math.inf


def check_txt2img(body, sampler, model_name: str) -> None:
    check_processing(body, sampler)
    if not body.enable_hr:
        return  # the hr_* fields only describe the second pass
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint", model_name):
        refuse("hr_checkpoint_name", body.hr_checkpoint_name, f"this server serves {model_name!r} only")


def hires_sampler(body) -> str | None:
    """A1111's hr_sampler_name and hr_scheduler -> the second pass's sampler label; None: the first pass's.

    "Use same scheduler" (or none) is the first pass's schedule type (its `scheduler`, or the one its sampler name
    carries: "DPM++ 2M Karras"), Automatic staying each sampler's own; a hires sampler name carrying one keeps it."""
    name = None if body.hr_sampler_name in (None, "", SAME_SAMPLER) else body.hr_sampler_name
    schedule = None if body.hr_scheduler in (None, "", SAME_SCHEDULER) else body.hr_scheduler
    if name is None and schedule is None:
        return None
    first_name = body.sampler_name or body.sampler_index
    if schedule is None and (name is None or _named_schedule(name) is None):
        schedule = _named_schedule(first_name, body.scheduler)
    return get_sampler(name or get_sampler(first_name).algorithm.name, schedule).name


def _named_schedule(sampler_name: str, schedule_type: str | None = None) -> str | None:
    """The schedule type a request names: its schedule type unless Automatic, else the one its sampler name
    carries ('Karras' of "DPM++ 2M Karras"); None: Automatic."""
    if schedule_type and get_schedule_type(schedule_type) is not AUTOMATIC:
        return get_schedule_type(schedule_type).label
    sampler = get_sampler(sampler_name)
    plain = {sampler.algorithm.name.lower(), *(alias.lower() for alias in sampler.algorithm.aliases)}
    return None if sampler_name.strip().lower() in plain else sampler.schedule.label


def check_img2img(body, sampler) -> None:
    check_processing(body, sampler)
    if body.resize_mode not in RESIZE_MODES:
        refuse("resize_mode", body.resize_mode, "use 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3")
    if body.initial_noise_multiplier not in (None, 1):
        refuse("initial_noise_multiplier", body.initial_noise_multiplier, "only 1 is implemented")
    if body.latent_mask:
        refuse("latent_mask", "...", "a separate latent mask is not implemented")
    if not body.mask:
        return  # the inpainting fields describe the mask's use only
    if body.inpainting_fill not in MASKED_CONTENTS:
        refuse("inpainting_fill", body.inpainting_fill, "use 0 (fill), 1 (original), 2 (latent noise) or 3 (nothing)")
    if body.resize_mode == 3 and not body.inpaint_full_res:
        refuse("resize_mode", 3, "a latent upscale with a mask is not implemented; use 0, 1 or 2")
    if not body.mask_round:
        refuse("mask_round", False, "the mask is always rounded here (A1111's default)")


def inpainting_fields(body) -> dict:
    """GenerationParams' inpainting and resize fields of an img2img request (A1111's defaults for those omitted:
    'only masked', 'fill'). 'Only masked' crops around the mask: the resize mode changes nothing then, in A1111 too.
    """
    if not body.mask:
        return {"resize_mode": RESIZE_MODES[body.resize_mode]}
    only_masked = bool(body.inpaint_full_res)
    return {
        "resize_mode": "resize" if only_masked else RESIZE_MODES[body.resize_mode],
        "masked_content": MASKED_CONTENTS[body.inpainting_fill],
        "inpaint_only_masked": only_masked,
        "inpaint_padding": body.inpaint_full_res_padding,
    }


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
