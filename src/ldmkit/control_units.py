"""A ControlNet unit: one ControlNet, its control image and how it guides a generation. Torch-free.

The fields, their defaults and their values are those of the AUTOMATIC1111 ControlNet extension's unit
(sd-webui-controlnet `ControlNetUnit`; `webuiapi.ControlNetUnit` sends the same), so an API client's unit and an
infotext line round-trip. `ControlUnit.from_a1111` parses a unit as clients send it in
`alwayson_scripts.controlnet.args`; every field is used or refused, none is dropped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from ldmkit.control_preprocess import RESIZE_MODES, get_preprocessor
from ldmkit.errors import InvalidRequest

CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
HR_OPTIONS = ("Both", "Low res only", "High res only")  # which passes of a hires fix the unit guides
MAX_WEIGHT = 2.0  # the extension's range for a unit's weight
MAX_UNITS = 8  # ControlNets in one request (the extension's UI shows 3 by default; each costs a model call per step)

# Other spellings clients and the CLI use for the same values (the extension's aliases, then short CLI forms).
_RESIZE_ALIASES = {
    "inner fit (scale to fit)": "Crop and Resize",
    "scale to fit (inner fit)": "Crop and Resize",
    "outer fit (shrink to fit)": "Resize and Fill",
    "envelope (outer fit)": "Resize and Fill",
    "just resize (latent upscale)": "Just Resize",  # the extension's int 3; the map is resized all the same
    "resize": "Just Resize",
    "crop": "Crop and Resize",
    "fill": "Resize and Fill",
}
_CONTROL_MODE_ALIASES = {"balanced": CONTROL_MODES[0], "prompt": CONTROL_MODES[1], "control": CONTROL_MODES[2]}
_HR_ALIASES = {"both": "Both", "low": "Low res only", "high": "High res only"}

# A1111 lists a model as "stem [hash]"; clients send that back.
_MODEL_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{8,10}\]$")


@dataclass(frozen=True)
class ControlUnit:
    """One ControlNet's part in a request. Field names and values are the extension's."""

    model: str  # a ControlNet name in the --controlnet-dir folder (A1111's "stem [hash]" works), or a path
    image: Image.Image | None = None  # None with an init image (img2img): the init image, as in A1111
    module: str = "none"  # the preprocessor that makes the control map from `image` (ldmkit.control_preprocess)
    weight: float = 1.0  # scales the ControlNet's residuals
    guidance_start: float = 0.0  # fraction of the schedule where the unit starts guiding
    guidance_end: float = 1.0  # ... and stops
    processor_res: int | None = None  # the preprocessor's working resolution; None: its default (512)
    threshold_a: float | None = None  # the preprocessor's first parameter (canny: low threshold); None: default
    threshold_b: float | None = None  # its second (canny: high threshold)
    resize_mode: str = "Crop and Resize"  # how the map is fitted to the generation size (RESIZE_MODES)
    control_mode: str = "Balanced"  # CONTROL_MODES: "My prompt is more important" weakens the shallow layers;
    # "ControlNet is more important" also leaves the unconditional half of classifier-free guidance unguided
    pixel_perfect: bool = False  # processor_res chosen so the map needs no rescaling
    hr_option: str = "Both"  # HR_OPTIONS

    def validate(self) -> None:
        """Refuse, naming the field, what no model could run; the model name is resolved by the Pipeline."""
        if not isinstance(self.model, str) or not self.model.strip() or self.model == "None":
            raise InvalidRequest(f"model: a ControlNet unit needs a ControlNet model, got {self.model!r}")
        if self.image is not None and not isinstance(self.image, Image.Image):
            raise InvalidRequest(f"image must be a PIL image, not {type(self.image).__name__}")
        get_preprocessor(self.module).check(self.processor_res, self.threshold_a, self.threshold_b)
        if not _is_number(self.weight) or not 0 <= self.weight <= MAX_WEIGHT:
            raise InvalidRequest(f"weight must be from 0 to {MAX_WEIGHT:g}, got {self.weight!r}")
        for name in ("guidance_start", "guidance_end"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= 1:
                raise InvalidRequest(f"{name} must be a fraction of the schedule from 0 to 1, got {value!r}")
        if self.guidance_start > self.guidance_end:
            raise InvalidRequest(
                f"guidance_start ({self.guidance_start}) must not be after guidance_end ({self.guidance_end})"
            )
        for name, allowed in (
            ("resize_mode", RESIZE_MODES),
            ("control_mode", CONTROL_MODES),
            ("hr_option", HR_OPTIONS),
        ):
            if getattr(self, name) not in allowed:
                raise InvalidRequest(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not isinstance(self.pixel_perfect, bool):
            raise InvalidRequest(f"pixel_perfect must be true or false, got {self.pixel_perfect!r}")

    @property
    def model_name(self) -> str:
        return strip_model_hash(self.model)

    def infotext(self, model_title: str, processor_res: int | None = None) -> str:
        """The unit as the extension records it in the infotext ('ControlNet 0: "Module: canny, ..."')."""
        preprocessor = get_preprocessor(self.module)
        res, a, b = preprocessor.check(self.processor_res, self.threshold_a, self.threshold_b)
        fields = {
            "Module": preprocessor.name,
            "Model": model_title,
            "Weight": float(self.weight),
            "Resize Mode": self.resize_mode,
            "Processor Res": (processor_res or res) if preprocessor.has_resolution else -1,
            "Threshold A": _whole(a),
            "Threshold B": _whole(b),
            "Guidance Start": float(self.guidance_start),
            "Guidance End": float(self.guidance_end),
            "Pixel Perfect": self.pixel_perfect,
            "Control Mode": self.control_mode,
        }
        if self.hr_option != "Both":
            fields["Hr Option"] = self.hr_option
        return ", ".join(f"{key}: {value}" for key, value in fields.items())

    @classmethod
    def from_a1111(cls, values: dict, decode_image: Callable[[str, str], Image.Image]) -> ControlUnit | None:
        """A unit as A1111 API clients send it; None for a disabled one.

        `decode_image(base64_text, what)` decodes the image field. Legacy names (input_image, lowvram, guidance)
        are read as the extension reads them; fields for features ldmkit lacks are refused unless they hold
        their "off" value; unknown fields are refused.
        """
        if not isinstance(values, dict):
            raise InvalidRequest(f"a ControlNet unit must be a JSON object, got {type(values).__name__}")
        values = dict(values)
        for legacy, name in _LEGACY_FIELDS.items():
            if legacy in values:
                if name in values:
                    raise InvalidRequest(f"ControlNet unit has both {legacy!r} and {name!r}; send one")
                values[name] = values.pop(legacy)
        unknown = sorted(set(values) - set(_A1111_FIELDS) - set(_OFF_VALUES))
        if unknown:
            raise InvalidRequest(f"unknown ControlNet unit field {unknown[0]!r}")
        for name, off in _OFF_VALUES.items():
            if name in values and values[name] not in off:
                raise InvalidRequest(f"ControlNet unit field {name!r} = {values[name]!r} is not supported by ldmkit")
        enabled = values.get("enabled", True)  # the extension's API units before 1.1.4xx had no "enabled"
        if not isinstance(enabled, bool):
            raise InvalidRequest(f"enabled must be true or false, got {enabled!r}")
        if not enabled:
            return None
        kwargs = {name: values[name] for name in _A1111_FIELDS if name in values and name not in ("enabled", "image")}
        kwargs["image"] = _unit_image(values.get("image"), decode_image)
        for name in ("processor_res", "threshold_a", "threshold_b"):
            if kwargs.get(name) == -1:
                kwargs[name] = None
        for name, parse in (
            ("resize_mode", parse_resize_mode),
            ("control_mode", parse_control_mode),
            ("hr_option", parse_hr_option),
        ):
            if name in kwargs:
                kwargs[name] = parse(kwargs[name])
        unit = cls(**kwargs)
        unit.validate()
        return unit


def check_units(units: tuple, has_init_image: bool) -> None:
    """A request's units (GenerationParams.controls), each validated; a unit's error names its index."""
    if not isinstance(units, tuple) or len(units) > MAX_UNITS:
        raise InvalidRequest(f"controls must be a list of at most {MAX_UNITS} ControlNet units")
    for index, unit in enumerate(units):
        if not isinstance(unit, ControlUnit):
            raise InvalidRequest(f"ControlNet unit {index} must be a ControlUnit, not {type(unit).__name__}")
        try:
            unit.validate()
        except InvalidRequest as error:
            raise InvalidRequest(f"ControlNet unit {index}: {error}") from None
        if unit.image is None and not has_init_image:
            raise InvalidRequest(f"ControlNet unit {index} has no image (only img2img can use its init image)")


def strip_model_hash(title: str) -> str:
    """A model's name from A1111's model list title "name [hash]" (a plain name is returned as it is)."""
    return _MODEL_HASH_SUFFIX.sub("", title.strip())


def parse_choice(field: str, value, choices: tuple[str, ...], aliases: dict[str, str]) -> str:
    """One of `choices` from its exact name, its index (the extension's int form), an alias, or any case."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value == 3 and choices == RESIZE_MODES:
            return "Just Resize"  # the extension's "Just Resize (Latent upscale)"
        if 0 <= value < len(choices):
            return choices[value]
    elif isinstance(value, str):
        folded = value.strip().casefold()
        for choice in choices:
            if folded == choice.casefold():
                return choice
        if folded in aliases:
            return aliases[folded]
    raise InvalidRequest(f"{field} must be one of {', '.join(choices)} (or 0-{len(choices) - 1}), got {value!r}")


def parse_resize_mode(value) -> str:
    return parse_choice("resize_mode", value, RESIZE_MODES, _RESIZE_ALIASES)


def parse_control_mode(value) -> str:
    return parse_choice("control_mode", value, CONTROL_MODES, _CONTROL_MODE_ALIASES)


def parse_hr_option(value) -> str:
    return parse_choice("hr_option", value, HR_OPTIONS, _HR_ALIASES)


# Fields of the extension's unit that ldmkit implements.
_A1111_FIELDS = (
    "enabled", "image", "module", "model", "weight", "guidance_start", "guidance_end", "processor_res",
    "threshold_a", "threshold_b", "resize_mode", "control_mode", "pixel_perfect", "hr_option",
)  # fmt: skip
_LEGACY_FIELDS = {"input_image": "image", "lowvram": "low_vram", "guidance": "guidance_end", "guessmode": "guess_mode"}
# Fields of features ldmkit does not have, accepted only with the value that leaves the feature off (clients such
# as webuiapi always send some of them). save_detected_map: the server returns no detected maps.
_OFF_VALUES = {
    "mask": (None, ""),
    "mask_image": (None, ""),
    "low_vram": (False,),
    "guess_mode": (False, None),
    "advanced_weighting": (None,),
    "effective_region_mask": (None,),
    "ipadapter_input": (None,),
    "inpaint_crop_input_image": (True, False),  # only read for "Only masked" inpainting, which ldmkit lacks
    "input_mode": ("simple",),
    "batch_images": (None, ""),
    "output_dir": ("",),
    "loopback": (False,),
    "is_ui": (False,),
    "save_detected_map": (False, True),  # a preference: ldmkit's API returns only the generated images
    "pulid_mode": ("Fidelity",),
    "union_control_type": ("Unknown", None),
}


def _unit_image(value, decode_image) -> Image.Image | None:
    """The unit's image: base64 text, or the extension's {"image": ..., "mask": ...} / [image, mask] forms."""
    if value in (None, ""):
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise InvalidRequest("image as a list must be [image, mask]")
        value = {"image": value[0], "mask": value[1]}
    if isinstance(value, dict):
        if value.get("mask") not in (None, ""):
            raise InvalidRequest("ControlNet unit image mask (inpaint ControlNets) is not supported by ldmkit")
        value = value.get("image")
        if value in (None, ""):
            return None
    if not isinstance(value, str):
        raise InvalidRequest(f"ControlNet unit image must be base64 text, got {type(value).__name__}")
    return decode_image(value, "ControlNet unit image")


def _whole(threshold: float | None) -> float | int:
    """A threshold as the extension writes it: its slider default or value; -1 where the module has none."""
    if threshold is None:
        return -1
    return int(threshold) if float(threshold).is_integer() else threshold


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
