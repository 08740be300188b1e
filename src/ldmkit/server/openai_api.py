"""OpenAI's Images API (POST /v1/images/generations), so the official `openai` client works with base_url set here."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ldmkit.errors import InvalidRequest
from ldmkit.params import GenerationParams
from ldmkit.server.imaging import encode_all
from ldmkit.server.queue import GenerationQueue, wait_for_result

_SIZE_RE = re.compile(r"([0-9]{1,6})x([0-9]{1,6})")  # bounded: int() refuses numbers of 4300+ digits


# OpenAI's parameters this server cannot honour differently (quality, style, background,
# moderation, user...) are accepted and ignored, as OpenAI itself ignores them for some models.
class ImageGenerationRequest(BaseModel):
    prompt: str
    model: str | None = Field(None, description="any name; the loaded model answers")
    n: int = Field(1, ge=1, le=10)
    size: str | None = Field("auto", description="'auto' (the model's native size) or WIDTHxHEIGHT, multiples of 8")
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="default b64_json; 'url' gives a data: URL"
    )
    output_format: Literal["png"] | None = None
    stream: Literal[False] | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str = "png"
    size: str


def create_router(queue: GenerationQueue) -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["OpenAI"])

    @router.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True)
    async def generate_images(body: ImageGenerationRequest, request: Request):
        width, height = parse_size(body.size)
        # OpenAI's clients cannot choose the steps: ldmkit's default, or fewer where the server allows fewer.
        steps = min(GenerationParams.steps, queue.limits.max_steps)
        generation = GenerationParams(prompt=body.prompt, steps=steps, width=width, height=height, num_images=body.n)
        job = queue.submit(generation)
        result = await wait_for_result(queue, job, request.is_disconnected)
        encoded = await asyncio.to_thread(encode_all, result)
        if body.response_format == "url":
            data = [ImageData(url=f"data:image/png;base64,{b64}") for b64 in encoded]
        else:
            data = [ImageData(b64_json=b64) for b64 in encoded]
        r = job.request
        return ImagesResponse(created=int(time.time()), data=data, size=f"{r.width}x{r.height}")

    return router


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "auto"):
        return None, None
    match = _SIZE_RE.fullmatch(size)
    if match is None:
        raise InvalidRequest(f"size must be 'auto' or WIDTHxHEIGHT such as 512x512, got {size!r}")
    return int(match[1]), int(match[2])
