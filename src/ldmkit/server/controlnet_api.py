"""The AUTOMATIC1111 ControlNet extension's API: units in `alwayson_scripts.controlnet.args` of txt2img/img2img, and
its routes /controlnet/version, /model_list, /module_list, /settings and /detect (names and fields are the
extension's, scripts/api.py). Models are reached by name in the server's --controlnet-dir only, never by path.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from PIL import Image
from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from ldmkit.control_preprocess import DEFAULT_RESOLUTION, PREPROCESSORS, RESOLUTION_RANGE, detect, get_preprocessor
from ldmkit.control_units import MAX_UNITS, ControlUnit
from ldmkit.errors import InvalidRequest
from ldmkit.server.imaging import decode_base64_image, encode_png_base64

API_VERSION = 2  # what the extension's /controlnet/version answers (external_code.get_api_version)
SCRIPT_NAME = "controlnet"


def units_from_scripts(
    alwayson_scripts: dict[str, Any] | None, library, max_pixels: int
) -> tuple[tuple[ControlUnit, ...], list[bool]]:
    """The enabled units of a txt2img/img2img body's `alwayson_scripts`, and whether each wants its map returned
    (`save_detected_map`, default true as in the extension). Other scripts are refused: ldmkit runs none."""
    if not alwayson_scripts:
        return (), []
    if not isinstance(alwayson_scripts, dict):
        raise InvalidRequest("alwayson_scripts must be an object of script name -> {'args': [...]}")
    for name in alwayson_scripts:
        if name.lower() != SCRIPT_NAME:
            raise InvalidRequest(f"alwayson_scripts.{name} is not supported: ldmkit runs the ControlNet script only")
    script = next(iter(alwayson_scripts.values()))
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise InvalidRequest("alwayson_scripts.controlnet must be {'args': [unit, ...]}")

    def decode(text: str, what: str) -> Image.Image:
        return decode_base64_image(text, what, max_pixels).convert("RGB")

    units, save_maps = [], []
    for index, values in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{index}]"
        try:
            unit = ControlUnit.from_a1111(values, decode)
            if unit is not None:
                library.resolve_name(unit.model)
        except InvalidRequest as error:
            raise InvalidRequest(f"{where}: {error}") from None
        if unit is not None:
            units.append(unit)
            save_maps.append(values.get("save_detected_map", True))
    if len(units) > MAX_UNITS:
        raise InvalidRequest(f"at most {MAX_UNITS} ControlNet units per request, got {len(units)}")
    return tuple(units), save_maps


def detected_maps(result, save_maps: list[bool]) -> list[str]:
    """The control maps to append to a response's images (base64 PNGs), as the extension appends them."""
    per_unit = len(result.control_maps) // max(len(save_maps), 1)
    return [encode_png_base64(image) for index, image in enumerate(result.control_maps) if save_maps[index // per_unit]]


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field ldmkit does not know is refused, not dropped

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("controlnet_input_images", "controlnet_images"),  # webuiapi's name for it
        description="base64 images",
    )
    controlnet_processor_res: int = Field(-1, description=f"-1: {DEFAULT_RESOLUTION}")
    controlnet_threshold_a: float = Field(-1, description="the module's first parameter; -1: its default")
    controlnet_threshold_b: float = Field(-1, description="its second; -1: its default")
    controlnet_masks: list[str] = Field(default_factory=list, description="not supported: must be empty")
    low_vram: bool = Field(False, description="not supported: must be false")


class DetectResponse(BaseModel):
    images: list[str] = Field(description="base64 PNG control maps, one per input image")
    info: str


MAX_DETECT_IMAGES = 8


def create_router(queue) -> APIRouter:
    """The extension's routes over the queue's pipeline (its --controlnet-dir) and the server's limits."""
    pipe, limits = queue.pipe, queue.limits
    router = APIRouter(prefix="/controlnet", tags=["ControlNet (AUTOMATIC1111 extension)"])

    @router.get("/version")
    async def version() -> dict:
        return {"version": API_VERSION}

    @router.get("/model_list")
    async def model_list(update: bool = True) -> dict:
        """Every ControlNet of --controlnet-dir as "name [hash]". The folder is read on each call, so `update` (the
        extension's "re-scan the folder") holds whatever its value: a file added since start-up is listed."""
        return {"model_list": await asyncio.to_thread(pipe.controlnets.titles)}

    @router.get("/module_list")
    async def module_list(alias_names: bool = False) -> dict:
        """The preprocessors ldmkit runs (model-free ones) and their sliders, as the extension describes them."""
        names = [p.label if alias_names else p.name for p in PREPROCESSORS.values()]
        return {"module_list": names, "module_detail": {name: _module_detail(name) for name in names}}

    @router.get("/settings")
    async def settings() -> dict:
        return {"control_net_unit_count": MAX_UNITS}

    @router.post("/detect", response_model=DetectResponse)
    async def detect_maps(body: DetectRequest) -> dict:
        """Run a preprocessor on images: the control maps a unit with this module would use (before fitting)."""
        preprocessor = get_preprocessor(body.controlnet_module)
        if body.controlnet_masks:
            raise InvalidRequest("controlnet_masks are not supported (no ldmkit preprocessor takes a mask)")
        if body.low_vram:
            raise InvalidRequest("low_vram is not supported by ldmkit; send false")
        if not body.controlnet_input_images:
            raise InvalidRequest("controlnet_input_images is empty: send at least one base64 image")
        if len(body.controlnet_input_images) > MAX_DETECT_IMAGES:
            raise InvalidRequest(f"at most {MAX_DETECT_IMAGES} controlnet_input_images per request")
        preprocessor.check(body.controlnet_processor_res, body.controlnet_threshold_a, body.controlnet_threshold_b)

        def run() -> list[str]:
            maps = []
            for index, text in enumerate(body.controlnet_input_images):
                image = decode_base64_image(text, f"controlnet_input_images[{index}]", limits.max_input_pixels)
                control_map = detect(
                    image.convert("RGB"),
                    preprocessor.name,
                    body.controlnet_processor_res,
                    body.controlnet_threshold_a,
                    body.controlnet_threshold_b,
                )
                maps.append(encode_png_base64(Image.fromarray(control_map)))
            return maps

        return {"images": await asyncio.to_thread(run), "info": "Success"}

    return router


def _module_detail(name: str) -> dict:
    preprocessor = get_preprocessor(name)
    sliders = []
    if preprocessor.has_resolution:
        low, high = RESOLUTION_RANGE
        sliders.append({"name": "Resolution", "value": DEFAULT_RESOLUTION, "min": low, "max": high, "step": 8})
    for slider in (preprocessor.slider_a, preprocessor.slider_b):
        if slider is not None:
            sliders.append(
                {"name": slider.label, "value": slider.default, "min": slider.minimum, "max": slider.maximum, "step": 1}
            )
    return {"model_free": True, "sliders": sliders}
