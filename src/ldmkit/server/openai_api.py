"""OpenAI's Images API (/v1/images/generations, edits, variations) and /v1/models, so the official `openai` client
works with base_url set here. Every parameter is implemented or refused with a 400 naming it, in OpenAI's shape."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from ldmkit.errors import InvalidRequest
from ldmkit.metadata import png_info
from ldmkit.params import GenerationParams
from ldmkit.server.imaging import decode_image
from ldmkit.server.queue import GenerationQueue, wait_for_result

_SIZE_RE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")  # bounded: int() refuses numbers of 4300+ digits
# OpenAI's quality -> denoising steps (ldmkit's default, 25, for auto/standard). The sampler is ldmkit's default.
QUALITY_STEPS = {"auto": None, "standard": None, "low": 10, "medium": 20, "high": 40, "hd": 40}
EDIT_STRENGTH = 0.75  # an edit without a mask repaints the whole image this much (img2img)
MASKED_EDIT_STRENGTH = 1.0  # the transparent part of a mask is generated anew, as OpenAI's edits do
VARIATION_STRENGTH = 0.6  # a variation keeps the composition and colours, redraws the details
MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


class ImageOptions(BaseModel):
    """The parameters generations, edits and variations share. Unknown ones are refused, as OpenAI refuses them."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="any name; the loaded model answers")
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field("auto", description="'auto' or WIDTHxHEIGHT, multiples of 8")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="default b64_json; 'url' gives a data: URL (the server keeps no files)"
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="default png")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality (default 100)")
    user: str | None = Field(None, description="any: not recorded")


class ImageGenerationRequest(ImageOptions):
    prompt: str
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(
        None, description="steps: low 10, medium 20, high/hd 40, auto/standard ldmkit's default (25)"
    )
    background: Literal["auto", "opaque"] | None = Field(None, description="'transparent' is not supported")
    moderation: Literal["auto", "low"] | None = Field(None, description="any: this server filters nothing")
    style: str | None = Field(None, description="DALL-E 3's vivid/natural: refused (no such model here)")
    stream: Literal[False] | None = None
    partial_images: Literal[0] | None = None


class ImageEditFields(ImageGenerationRequest):
    input_fidelity: Literal["low"] | None = Field(None, description="'high' is not supported")


class ImageVariationFields(ImageOptions):
    pass


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str
    quality: str | None = None
    background: str | None = None


class ModelItem(BaseModel):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "ldmkit"


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelItem]


def create_router(queue: GenerationQueue) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"])
    pipe = queue.pipe

    async def generate(options: ImageOptions, request: Request, generation: GenerationParams) -> ImagesResponse:
        if getattr(options, "style", None) is not None:
            raise InvalidRequest(f"style={options.style!r} is not supported: it is DALL-E 3's; leave it out")
        job = queue.submit(generation)
        result = await wait_for_result(queue, job, request.is_disconnected)
        output_format = options.output_format or "png"
        encoded = await asyncio.to_thread(
            lambda: [
                encode(image, text, output_format, options.output_compression)
                for image, text in zip(result.images, result.infotexts)
            ]
        )
        if options.response_format == "url":
            data = [ImageData(url=f"data:{MIME[output_format]};base64,{b64}") for b64 in encoded]
        else:
            data = [ImageData(b64_json=b64) for b64 in encoded]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=output_format,
            size="{}x{}".format(*job.delivered_size),
            quality=getattr(options, "quality", None),
            background=getattr(options, "background", None),
        )

    @router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
    async def generate_images(body: ImageGenerationRequest, request: Request):
        check_compression(body)
        width, height = parse_size(body.size)
        generation = GenerationParams(
            prompt=body.prompt, steps=steps_for(body.quality, queue), width=width, height=height, num_images=body.n
        )
        return await generate(body, request, generation)

    @router.post("/images/edits", response_model=ImagesResponse, response_model_exclude_none=True)
    async def edit_images(request: Request):
        """multipart/form-data: image (one), optional mask (transparent = repaint), prompt and the options."""
        fields, files = await read_form(request, ("image", "mask"))
        body = validated(ImageEditFields, fields)
        check_compression(body)
        limit = queue.limits.max_input_pixels
        image = await asyncio.to_thread(decode_upload, files, "image", limit)
        mask = await asyncio.to_thread(decode_upload, files, "mask", limit) if "mask" in files else None
        repaint = edit_region(image, mask)
        width, height = parse_size(body.size)
        generation = GenerationParams(
            prompt=body.prompt,
            steps=steps_for(body.quality, queue),
            width=width,
            height=height,
            num_images=body.n,
            init_image=image.convert("RGB"),
            strength=EDIT_STRENGTH if repaint is None else MASKED_EDIT_STRENGTH,
            mask_image=repaint,
            mask_blur=0,  # OpenAI's mask is exact
        )
        return await generate(body, request, generation)

    @router.post("/images/variations", response_model=ImagesResponse, response_model_exclude_none=True)
    async def image_variations(request: Request):
        """multipart/form-data: image (one) and the options; img2img with an empty prompt."""
        fields, files = await read_form(request, ("image",))
        body = validated(ImageVariationFields, fields)
        check_compression(body)
        image = await asyncio.to_thread(decode_upload, files, "image", queue.limits.max_input_pixels)
        width, height = parse_size(body.size)
        generation = GenerationParams(
            prompt="",
            steps=steps_for(None, queue),
            width=width,
            height=height,
            num_images=body.n,
            init_image=image.convert("RGB"),
            strength=VARIATION_STRENGTH,
        )
        return await generate(body, request, generation)

    @router.get("/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelItem(id=pipe.model_name)])

    @router.get("/models/{model_id:path}", response_model=ModelItem)
    async def model(model_id: str):
        if model_id != pipe.model_name:
            raise NotFound(f"The model '{model_id}' does not exist; this server has '{pipe.model_name}'", "model")
        return ModelItem(id=model_id)

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown(path: str, request: Request):
        """Under /v1 every answer is OpenAI's shape, a wrong path or method included (not FastAPI's or Gradio's)."""
        full = request.url.path
        allowed = sorted(
            method
            for route in router.routes
            if route.path != "/v1/{path:path}" and route.path_regex.match(full)
            for method in route.methods
        )
        if allowed:
            raise MethodNotAllowed(f"{request.method} {full} is not allowed; use {', '.join(allowed)}", allowed)
        raise NotFound(f"Unknown path {request.method} {full}", None)

    return router


class NotFound(InvalidRequest):
    status = 404

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param


class MethodNotAllowed(InvalidRequest):
    status = 405

    def __init__(self, message: str, allowed: list[str]):
        super().__init__(message)
        self.allowed = allowed


def steps_for(quality: str | None, queue: GenerationQueue) -> int:
    """OpenAI's clients cannot choose the steps: quality picks them; without it ldmkit's default, or fewer where
    the server allows fewer (an explicit quality over the server's limit is refused by the limit's check)."""
    steps = QUALITY_STEPS.get(quality or "auto")
    return min(GenerationParams.steps, queue.limits.max_steps) if steps is None else steps


def check_compression(body: ImageOptions) -> None:
    if body.output_compression is not None and (body.output_format or "png") == "png":
        raise InvalidRequest("output_compression is for output_format jpeg or webp; png is lossless")


def encode(image: Image.Image, infotext: str, output_format: str, compression: int | None) -> str:
    """Base64 of the image in the format asked; PNG carries the parameters chunk, JPEG/WebP their EXIF comment."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", pnginfo=png_info(infotext))
    else:
        exif = Image.Exif()
        exif[0x9286] = b"UNICODE\0" + infotext.encode("utf-16-be")  # UserComment, where A1111 writes it for JPEG
        quality = 100 if compression is None else compression
        image.convert("RGB").save(buffer, format=output_format.upper(), quality=quality, exif=exif.tobytes())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def read_form(request: Request, file_fields: tuple[str, ...]) -> tuple[dict[str, str], dict[str, bytes]]:
    """The form's text fields and its files (OpenAI's clients send a list of images as 'image[]')."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("this endpoint takes multipart/form-data (image files and fields)")
    form = await request.form()
    fields, files = {}, {}
    for key in set(form.keys()):
        name = key.removesuffix("[]")
        values = form.getlist(key)
        if name in file_fields:
            if len(values) != 1 or name in files:
                raise InvalidRequest(f"{name}: send one image, got {len(values)}")
            if not isinstance(values[0], UploadFile):
                raise InvalidRequest(f"{name} must be an uploaded file")
            files[name] = await values[0].read()
        elif len(values) != 1 or isinstance(values[0], UploadFile):
            raise InvalidRequest(f"{key} must be one text value")
        else:
            fields[key] = values[0]
    if "image" not in files:
        raise InvalidRequest("image is required: one image file")
    return fields, files


def validated(model: type[BaseModel], fields: dict[str, str]):
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        reasons = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidRequest(reasons) from None


def decode_upload(files: dict[str, bytes], name: str, max_pixels: int) -> Image.Image:
    return decode_image(files[name], name, max_pixels)


def edit_region(image: Image.Image, mask: Image.Image | None) -> Image.Image | None:
    """OpenAI's mask: where it is fully transparent is generated anew. Without one, an image's own fully
    transparent part is (DALL-E 2's edits); an opaque image without a mask is repainted whole (None)."""
    source = mask if mask is not None else image
    if mask is not None and mask.size != image.size:
        raise InvalidRequest(
            f"mask is {mask.width}x{mask.height}; it must have the image's size {image.width}x{image.height}"
        )
    if "A" not in source.getbands() and not (source.mode == "P" and "transparency" in source.info):
        if mask is not None:
            raise InvalidRequest("mask must have an alpha channel: its fully transparent part is what is repainted")
        return None
    alpha = source.convert("RGBA").getchannel("A")
    region = alpha.point(lambda a: 255 if a == 0 else 0)
    if region.getextrema() == (0, 0):
        if mask is not None:
            raise InvalidRequest("mask has no fully transparent pixel: nothing to repaint")
        return None
    return region


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "auto"):
        return None, None
    match = _SIZE_RE.fullmatch(size)
    if match is None:
        raise InvalidRequest(f"size must be 'auto' or WIDTHxHEIGHT such as 512x512, got {size!r}")
    return int(match[1]), int(match[2])
