"""AUTOMATIC1111's other endpoints, which its clients call at startup or for side jobs: lists of what the server
has (prompt styles, VAE files, the X/Y/Z plot script; no face restorers or hypernetworks here), the extras
upscalers (the resizes and the models of --upscalers-dir, ldmkit.upscalers) and refusals by name for what needs a
model this server lacks (interrogation, face restoration)."""

from __future__ import annotations

import asyncio
import math
import os

import torch
from fastapi import APIRouter
from PIL import Image
from pydantic import BaseModel, Field

from ldmkit.errors import InvalidRequest
from ldmkit.server import a1111_xyz
from ldmkit.server.imaging import decode_base64_image, encode_png_base64
from ldmkit.server.queue import GenerationQueue
from ldmkit.styles import StyleLibrary
from ldmkit.upscalers import UpscalerLibrary

MAX_EXTRAS_SCALE = 8.0
MAX_BATCH_IMAGES = 16


class ExtrasOptions(BaseModel):
    """A1111's extras fields (ExtrasBaseRequest); face restoration is refused when used."""

    resize_mode: int = Field(0, description="0: scale by upscaling_resize; 1: to upscaling_resize_w x _h")
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(0, description="0 only: no face restorer")
    codeformer_visibility: float = Field(0, description="0 only: no face restorer")
    codeformer_weight: float = 0
    upscaling_resize: float = 2
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = Field(True, description="resize_mode 1: crop to the aspect ratio (else stretch)")
    upscaler_1: str = Field("None", description="an upscaler of /sdapi/v1/upscalers; 'None' leaves the image as it is")
    upscaler_2: str = Field("None", description="a second upscaler of the original, blended in by its visibility")
    extras_upscaler_2_visibility: float = Field(0, description="0 to 1: upscaler_2's share of the result")
    upscale_first: bool = Field(False, description="any: no face restorer to run before or after")


class ExtrasSingleImageRequest(ExtrasOptions):
    image: str = Field("", description="base64 image")


class ImageItem(BaseModel):
    data: str
    name: str = ""


class ExtrasBatchImagesRequest(ExtrasOptions):
    imageList: list[ImageItem]  # A1111 spells it so


class InterrogateRequest(BaseModel):
    image: str = ""
    model: str = "clip"


def add_routes(router: APIRouter, queue: GenerationQueue, styles: StyleLibrary) -> None:
    pipe = queue.pipe

    @router.get("/cmd-flags")
    async def cmd_flags() -> dict:
        """The flags clients read (AIYA checks that the API answers); paths are not a client's business."""
        return {"api": True, "nowebui": False, "listen": False, "lowvram": False, "medvram": False, "xformers": False}

    @router.get("/prompt-styles")
    async def prompt_styles() -> list[dict]:
        """The styles file's styles (`ldm serve --styles`, or ./styles.csv), in its order."""
        return [
            {"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt} for s in styles.styles.values()
        ]

    @router.get("/face-restorers")
    async def face_restorers() -> list[dict]:
        return []  # {name, cmd_dir}

    @router.get("/sd-vae")
    async def sd_vae() -> list[dict]:
        """The VAEs sd_vae may name (`--vae` and `--vae-dir`'s); the model's own VAE is 'None', never an entry.
        filename is the path within --vae-dir (just the name for --vae): where files are is no client's business."""
        paths = await asyncio.to_thread(pipe.vaes.paths)
        return [{"model_name": name, "filename": _vae_filename(pipe.vaes, path)} for name, path in paths.items()]

    @router.get("/hypernetworks")
    async def hypernetworks() -> list[dict]:
        return []

    @router.get("/realesrgan-models")
    async def realesrgan_models() -> list[dict]:
        """The model files of --upscalers-dir (spandrel runs Real-ESRGAN's among others): as /upscalers lists them."""
        models = [info for info in await asyncio.to_thread(pipe.upscalers.entries) if info.is_model]
        return [
            {"name": m.name, "path": m.path.relative_to(pipe.upscalers.folder).as_posix(), "scale": m.scale}
            for m in models
        ]

    @router.get("/scripts")
    async def scripts() -> dict:
        """Selectable scripts: the X/Y/Z plot. The ControlNet extension's own routes say it is here."""
        return {"txt2img": [a1111_xyz.SCRIPT_NAME], "img2img": [a1111_xyz.SCRIPT_NAME]}

    @router.get("/script-info")
    async def script_info() -> list[dict]:
        return a1111_xyz.script_info()

    @router.post("/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        """Nothing to refresh: the server holds the one model it started with."""

    @router.post("/refresh-vae")
    async def refresh_vae() -> None:
        """Nothing to refresh: --vae-dir is read at each request."""

    @router.post("/refresh-loras")
    async def refresh_loras() -> None:
        """Nothing to refresh: <lora:...> tags are looked up in the folder at each request."""

    @router.post("/skip")
    async def skip() -> dict:
        """A1111's skip: the running request's current batch (n_iter) ends at the next step, with its images as they
        are then, and the request goes on with its next batch; nothing running: no effect."""
        queue.skip()
        return {}

    @router.get("/memory")
    async def memory() -> dict:
        return {"ram": _ram(), "cuda": _cuda(pipe.device)}

    @router.post("/interrogate")
    async def interrogate(body: InterrogateRequest) -> None:
        raise InvalidRequest(f"interrogate model {body.model!r} is not available: this server has no captioning model")

    @router.post("/extra-single-image")
    async def extra_single_image(body: ExtrasSingleImageRequest) -> dict:
        _check_extras(body, pipe.upscalers)
        limit = queue.limits.max_input_pixels

        def run() -> str:
            image = decode_base64_image(body.image, "image", limit)
            _check_sizes([image], body, pipe.upscalers, limit)
            return _upscale(image, body, pipe.upscalers)

        return {"html_info": _html_info(body), "image": await asyncio.to_thread(run)}

    @router.post("/extra-batch-images")
    async def extra_batch_images(body: ExtrasBatchImagesRequest) -> dict:
        _check_extras(body, pipe.upscalers)
        if not 1 <= len(body.imageList) <= MAX_BATCH_IMAGES:
            raise InvalidRequest(f"imageList must hold 1 to {MAX_BATCH_IMAGES} images, got {len(body.imageList)}")

        def run() -> list[str]:
            limit = queue.limits.max_input_pixels
            decoded = [
                decode_base64_image(item.data, f"imageList[{i}]", limit) for i, item in enumerate(body.imageList)
            ]
            _check_sizes(decoded, body, pipe.upscalers, limit)
            return [_upscale(image, body, pipe.upscalers) for image in decoded]

        return {"html_info": _html_info(body), "images": await asyncio.to_thread(run)}


def _vae_filename(vaes, path) -> str:
    if vaes.folder is not None and path.is_relative_to(vaes.folder):
        return path.relative_to(vaes.folder).as_posix()
    return path.name


def _check_extras(body: ExtrasOptions, upscalers: UpscalerLibrary) -> None:
    """Everything refused before any image is decoded: the names, the scale, face restoration."""
    upscalers.resolve(body.upscaler_1, "upscaler_1")
    visibility = body.extras_upscaler_2_visibility
    if not 0 <= visibility <= 1:
        raise InvalidRequest(f"extras_upscaler_2_visibility must be from 0 to 1, got {visibility}")
    if _second_upscaler(body):
        upscalers.resolve(body.upscaler_2, "upscaler_2")
    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if getattr(body, name) > 0:
            raise InvalidRequest(f"{name}={getattr(body, name)!r} is not supported: this server has no face restorer")
    if body.resize_mode not in (0, 1):
        raise InvalidRequest(f"resize_mode must be 0 (scale) or 1 (to a size), got {body.resize_mode!r}")
    if body.resize_mode == 0 and not 0 < body.upscaling_resize <= MAX_EXTRAS_SCALE:
        raise InvalidRequest(
            f"upscaling_resize must be above 0 and at most {MAX_EXTRAS_SCALE}, got {body.upscaling_resize}"
        )


def _second_upscaler(body: ExtrasOptions) -> bool:
    return body.upscaler_2 != "None" and body.extras_upscaler_2_visibility > 0


def _check_sizes(images: list[Image.Image], body: ExtrasOptions, upscalers: UpscalerLibrary, max_pixels: int) -> None:
    """Every image's result size, and every model pass on the way to it, before the first image is upscaled."""
    names = [("upscaler_1", body.upscaler_1)] + ([("upscaler_2", body.upscaler_2)] if _second_upscaler(body) else [])
    for image in images:
        size = _upscaled_size(image, body, max_pixels)
        for what, name in names:
            upscalers.check(name, image.size, size, what)


def _upscaled_size(image: Image.Image, body: ExtrasOptions, max_pixels: int) -> tuple[int, int]:
    """The size the upscalers make: the target, or with resize_mode 1 and cropping the size that covers the target
    keeping the aspect ratio (cropped to the target after)."""
    if body.resize_mode == 0:
        size = (round(image.width * body.upscaling_resize), round(image.height * body.upscaling_resize))
    else:
        size = (body.upscaling_resize_w, body.upscaling_resize_h)
    if min(size) < 1 or size[0] * size[1] > max_pixels:
        raise InvalidRequest(
            f"the upscaled size {size[0]}x{size[1]} must be at least 1x1 and at most {max_pixels} pixels"
        )
    if body.resize_mode == 1 and body.upscaling_crop:
        scale = max(size[0] / image.width, size[1] / image.height)
        size = (max(size[0], round(image.width * scale)), max(size[1], round(image.height * scale)))
    return size


def _upscale(image: Image.Image, body: ExtrasOptions, upscalers: UpscalerLibrary) -> str:
    """A1111's extras upscale: upscaler_1 to the size, upscaler_2's result blended in by its visibility, then (resize
    mode 1 with cropping) the centre cut to the target. upscaler_1 'None' leaves the image as it is, as in A1111."""
    image = image.convert("RGBA" if image.mode in ("RGBA", "LA", "P") else "RGB")
    if upscalers.resolve(body.upscaler_1).name == "None":
        return encode_png_base64(image)
    size = _upscaled_size(image, body, math.inf)
    result = upscalers.upscale(image, body.upscaler_1, size)
    if _second_upscaler(body):
        second = upscalers.upscale(image, body.upscaler_2, size)
        result = Image.blend(result, second, body.extras_upscaler_2_visibility)
    if body.resize_mode == 1 and body.upscaling_crop:
        width, height = body.upscaling_resize_w, body.upscaling_resize_h
        left, top = (result.width - width) // 2, (result.height - height) // 2
        result = result.crop((left, top, left + width, top + height))
    return encode_png_base64(result)


def _html_info(body: ExtrasOptions) -> str:
    second = f", Postprocess upscaler 2: {body.upscaler_2}" if _second_upscaler(body) else ""
    return f"<p>Postprocess upscaler: {body.upscaler_1}{second}</p>"


def _ram() -> dict:
    page = os.sysconf("SC_PAGE_SIZE")
    total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    return {"free": free, "used": total - free, "total": total}


def _cuda(device: torch.device) -> dict:
    """A1111's shape: system free/used/total and torch's allocator counters; an error text without CUDA."""
    if device.type != "cuda":
        return {"error": f"the model runs on {device.type}, not CUDA"}
    free, total = torch.cuda.mem_get_info(device)
    stats = torch.cuda.memory_stats(device)

    def pair(name: str) -> dict:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }
