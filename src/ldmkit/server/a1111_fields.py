"""AUTOMATIC1111's request fields that ldmkit does not implement: accepted where the value is A1111's default or
has no effect, else refused with a 400 that names the field (never accepted and silently ignored).

The field names and defaults are those of A1111 1.10's /sdapi/v1 request models (StableDiffusionProcessingTxt2Img
and Img2Img as its API exposes them). docs/server.md has the whole table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ldmkit.errors import InvalidRequest
from ldmkit.server.a1111_xyz import is_xyz_script

CLIP_SKIP_SETTING = "CLIP_stop_at_last_layers"  # A1111's name for clip skip
MODEL_SETTING = "sd_model_checkpoint"
# sd_vae values that mean the model's own VAE: "Automatic" looks for a VAE file next to the model (there is none
# here), "None" is the model's own.
OWN_VAE = ("Automatic", "None")
# Settings ldmkit has, with the one value it runs, besides clip skip and the model (checked by ServerOptions).
FIXED_SETTINGS = {"sd_vae": OWN_VAE, "eta_noise_seed_delta": (0,)}
NO_STYLE = ("", "None")  # what clients send for no style (AIYA: ["None"]); A1111 applies nothing for them
SAME_SAMPLER = "Use same sampler"  # A1111's UI value of hr_sampler_name: the first pass's
SAME_SCHEDULER = "Use same scheduler"
INPAINT_FILL, INPAINT_ORIGINAL = 0, 1  # A1111's inpainting_fill modes ldmkit runs; 'original' unless 'fill' is sent


def refuse(name: str, value: Any, why: str) -> None:
    raise InvalidRequest(f"{name}={value!r} is not supported: {why}")


def check_processing(body, sampler) -> None:
    """The fields txt2img and img2img share; `sampler` is the request's resolved ldmkit.samplers.Sampler."""
    styles = [name for name in body.styles or () if name not in NO_STYLE]
    if styles:
        refuse("styles", styles, "this server has no prompt styles (GET /sdapi/v1/prompt-styles is empty)")
    if body.subseed_strength not in (None, 0):
        refuse("subseed_strength", body.subseed_strength, "variation seeds are not implemented (send 0)")
    for side, size in (("h", body.height), ("w", body.width)):
        value = getattr(body, f"seed_resize_from_{side}")
        if value is not None and value > 0 and value != size:
            refuse(f"seed_resize_from_{side}", value, "seed resize is not implemented (send -1 or 0)")
    if body.restore_faces:
        refuse("restore_faces", True, "this server has no face restorer")
    if body.tiling:
        refuse("tiling", True, "tileable images are not implemented")
    _check_eta(body.eta, sampler)
    if body.s_churn not in (None, 0):
        refuse("s_churn", body.s_churn, "the sampler noise options are not implemented (send 0)")
    # s_tmin/s_tmax bound where s_churn applies: no effect while it is 0
    if body.s_noise not in (None, 1):
        refuse("s_noise", body.s_noise, "the sampler noise options are not implemented (send 1)")
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


def _check_eta(eta: float | None, sampler) -> None:
    """eta is the noise of DDIM and the ancestral/SDE samplers; the others (Euler, DPM++ 2M, LCM...) take none."""
    if eta is None:
        return
    name = sampler.algorithm.name
    if name == "DDIM":
        default = 0.0  # A1111's eta_ddim option
    elif sampler.stochastic and name != "LCM":
        default = 1.0  # A1111's eta_ancestral option: what the ancestral and SDE samplers here run
    else:
        return  # this sampler has no eta: any value changes nothing, in A1111 too
    if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and math.isclose(eta, default)):
        refuse("eta", eta, f"{sampler.name} runs at A1111's default eta {default:g} only")


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


@dataclass
class ServerOptions:
    """A1111's settings that POST /sdapi/v1/options may change: they persist for the server's life."""

    model_name: str
    clip_skip: int = 1
    check_clip_skip: Any = field(default=None, repr=False)  # raises InvalidRequest for the model's bad values

    def as_dict(self) -> dict:
        return {
            MODEL_SETTING: self.model_name,
            CLIP_SKIP_SETTING: self.clip_skip,
            "sd_vae": "Automatic",
            "eta_noise_seed_delta": 0,
        }

    def update(self, options: dict[str, Any]) -> None:
        """All or nothing: every key is checked before any is kept."""
        settings = resolve_settings(options, self, "options")
        self.clip_skip = settings.get(CLIP_SKIP_SETTING, self.clip_skip)

    def clip_skip_for(self, override_settings: dict[str, Any]) -> int:
        return resolve_settings(override_settings, self, "override_settings").get(CLIP_SKIP_SETTING, self.clip_skip)


def resolve_settings(settings: dict[str, Any], options: ServerOptions, where: str) -> dict[str, Any]:
    """The settings ldmkit applies, checked; an unknown key or a value ldmkit cannot run is refused by name."""
    unknown = sorted(key for key in settings if key not in (MODEL_SETTING, CLIP_SKIP_SETTING, *FIXED_SETTINGS))
    if unknown:
        raise InvalidRequest(
            f"{where}: {', '.join(unknown)} not supported; this server has {MODEL_SETTING}, {CLIP_SKIP_SETTING},"
            f" sd_vae ({' or '.join(OWN_VAE)}) and eta_noise_seed_delta (0)"
        )
    wanted = settings.get(MODEL_SETTING, options.model_name)
    if wanted != options.model_name:
        raise InvalidRequest(f"model {wanted!r} is not loaded; this server serves {options.model_name!r} only")
    for key, allowed in FIXED_SETTINGS.items():
        if key in settings and settings[key] not in allowed:
            refuse(f"{where}.{key}", settings[key], f"this server runs {' or '.join(map(str, allowed))} only")
    result = {}
    if CLIP_SKIP_SETTING in settings:
        clip_skip = settings[CLIP_SKIP_SETTING]
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int):
            raise InvalidRequest(f"{where}.{CLIP_SKIP_SETTING} must be an integer, got {clip_skip!r}")
        if options.check_clip_skip is not None:
            options.check_clip_skip(clip_skip)
        result[CLIP_SKIP_SETTING] = clip_skip
    return result
