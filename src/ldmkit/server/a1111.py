"""AUTOMATIC1111's web API (/sdapi/v1/...): the request and response shapes its clients already send and read."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

import ldmkit
from ldmkit.errors import InvalidRequest
from ldmkit.metadata import PARAMETERS_KEY, parse_infotext
from ldmkit.pipeline import GenerationResult
from ldmkit.previews import make_grid, preview_images
from ldmkit.samplers import SAMPLERS
from ldmkit.server.imaging import decode_base64_image, encode_all, encode_png_base64
from ldmkit.server.queue import GenerationQueue, GenerationRequest, Job, wait_for_result


# Field names and defaults are AUTOMATIC1111's (modules/api/models.py, StableDiffusionProcessing);
# fields of A1111 features ldmkit lacks (hires fix, scripts, styles...) are accepted and ignored.
class Txt2ImgRequest(BaseModel):
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = Field(-1, description="-1: random; image i of the request uses seed + i")
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = Field(None, description="A1111 1.9+: 'Automatic' or 'Karras' (as in 'DPM++ 2M' + 'Karras')")
    batch_size: int = 1
    n_iter: int = Field(1, description="batches; they continue the seed sequence")
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    denoising_strength: float | None = None
    send_images: bool = True


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = Field(None, description="one base64 image, with or without a data: prefix")
    denoising_strength: float = 0.75
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs carrying the 'parameters' chunk")
    parameters: dict
    info: str = Field(description="JSON: seed, all_seeds, infotexts, ...")


class PngInfoRequest(BaseModel):
    image: str = Field(description="base64 PNG")


class PngInfoResponse(BaseModel):
    info: str
    items: dict
    parameters: dict


class ProgressResponse(BaseModel):
    progress: float = Field(description="0..1")
    eta_relative: float
    state: dict
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float | None
    need_inner_model: bool | None


# AUTOMATIC1111 1.9+ names the noise schedule apart from the sampler; ldmkit's registry names them
# together ("DPM++ 2M Karras"), as older AUTOMATIC1111 did. Automatic: the sampler's own schedule.
SCHEDULERS = [
    SchedulerItem(name="automatic", label="Automatic", aliases=None, default_rho=None, need_inner_model=None),
    SchedulerItem(name="karras", label="Karras", aliases=None, default_rho=7.0, need_inner_model=None),
]


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


def create_router(queue: GenerationQueue) -> APIRouter:
    pipe = queue.pipe
    router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

    @router.post("/txt2img", response_model=ImagesResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request):
        return await _generate(queue, body, request)

    @router.post("/img2img", response_model=ImagesResponse)
    async def img2img(body: Img2ImgRequest, request: Request):
        if not body.init_images:
            raise InvalidRequest("img2img needs init_images: one base64 image")
        if len(body.init_images) > 1:
            raise InvalidRequest(f"img2img takes one init image, got {len(body.init_images)}")
        init_image = await asyncio.to_thread(lambda: decode_base64_image(body.init_images[0], "init_images[0]").convert("RGB"))
        response = await _generate(queue, body, request, init_image, body.denoising_strength)
        if not body.include_init_images:
            response["parameters"]["init_images"] = None
        return response

    @router.get("/progress", response_model=ProgressResponse)
    async def progress(skip_current_image: bool = False):
        job = queue.current
        if job is None:
            return ProgressResponse(progress=0, eta_relative=0, state=_state(None))
        step = job.step
        current_image = None
        if step is not None and not skip_current_image:
            current_image = await asyncio.to_thread(lambda: encode_png_base64(make_grid(preview_images(pipe, step, "fast"))))
        return ProgressResponse(progress=job.progress(), eta_relative=job.eta(), state=_state(job), current_image=current_image)

    @router.post("/interrupt")
    async def interrupt():
        queue.interrupt()
        return {}

    @router.get("/samplers", response_model=list[SamplerItem])
    async def samplers():
        return [SamplerItem(name=name, aliases=[], options={}) for name in SAMPLERS]

    @router.get("/schedulers", response_model=list[SchedulerItem])
    async def schedulers():
        return SCHEDULERS

    @router.get("/sd-models", response_model=list[SDModelItem])
    async def sd_models():
        name = pipe.model_name
        return [SDModelItem(title=name, model_name=name, hash=None, sha256=None, filename=pipe.source, config=None)]

    # Clients (Open WebUI, webuiapi) read and set the model through the options.
    @router.get("/options")
    async def get_options() -> dict:
        return {"sd_model_checkpoint": pipe.model_name}

    @router.post("/options")
    async def set_options(options: dict[str, Any]) -> None:
        wanted = options.get("sd_model_checkpoint", pipe.model_name)
        if wanted != pipe.model_name:
            raise InvalidRequest(f"model {wanted!r} is not loaded; this server serves {pipe.model_name!r} only")

    @router.post("/png-info", response_model=PngInfoResponse)
    async def png_info(body: PngInfoRequest):
        image = await asyncio.to_thread(decode_base64_image, body.image)
        items = {key: value for key, value in image.info.items() if isinstance(value, str)}
        info = items.pop(PARAMETERS_KEY, "")
        return PngInfoResponse(info=info, items=items, parameters=parse_infotext(info) if info else {})

    return router


async def _generate(queue: GenerationQueue, body: Txt2ImgRequest, request: Request, init_image=None, strength=0.75) -> dict:
    job = queue.submit(
        GenerationRequest(
            prompt=body.prompt,
            negative_prompt=body.negative_prompt,
            steps=body.steps,
            guidance=body.cfg_scale,
            sampler=_sampler(body.sampler_name or body.sampler_index, body.scheduler),
            seed=None if body.seed == -1 else body.seed,
            width=body.width,
            height=body.height,
            batch_size=body.batch_size,
            n_iter=body.n_iter,
            init_image=init_image,
            strength=strength,
        )
    )
    result = await wait_for_result(queue, job, request.is_disconnected)
    images = await asyncio.to_thread(encode_all, result)
    return {
        "images": images if body.send_images else [],
        "parameters": body.model_dump(),
        "info": json.dumps(_info(job, result, queue.pipe.model_name)),
    }


def _sampler(name: str, scheduler: str | None) -> str:
    """A1111 1.9+'s sampler + scheduler pair -> a name of ldmkit's registry."""
    if scheduler is None or scheduler.lower() == "automatic":
        return name
    if scheduler.lower() == "karras":
        return name if name.lower().endswith(" karras") else f"{name} Karras"
    labels = ", ".join(item.label for item in SCHEDULERS)
    raise InvalidRequest(f"unknown scheduler {scheduler!r}; this server has: {labels}")


def _info(job: Job, result: GenerationResult, model_name: str) -> dict:
    """The JSON AUTOMATIC1111's Processed.js() returns, for the fields ldmkit has."""
    r, count = job.request, len(result.images)
    return {
        "prompt": r.prompt,
        "all_prompts": [r.prompt] * count,
        "negative_prompt": r.negative_prompt,
        "all_negative_prompts": [r.negative_prompt] * count,
        "seed": r.seed,
        "all_seeds": result.seeds,
        "subseed": -1,
        "all_subseeds": [-1] * count,
        "subseed_strength": 0,
        "width": r.width,
        "height": r.height,
        "sampler_name": r.sampler,
        "cfg_scale": r.guidance,
        "steps": r.steps,
        "batch_size": r.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name,
        "sd_model_hash": None,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": r.strength if r.init_image is not None else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": result.infotexts,
        "styles": [],
        "job_timestamp": _timestamp(job.created),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "version": ldmkit.__version__,
    }


def _state(job: Job | None) -> dict:
    """AUTOMATIC1111's shared.state.dict()."""
    step = job.step if job is not None else None
    return {
        "skipped": False,
        "interrupted": job is not None and job.stop == "interrupt",
        "stopping_generation": False,
        "job": "" if job is None else "img2img" if job.request.init_image is not None else "txt2img",
        "job_count": 0 if job is None else job.request.n_iter,
        "job_timestamp": "0" if job is None else _timestamp(job.created),
        "job_no": 0 if job is None else job.batch,
        "sampling_step": 0 if step is None else step.step + 1,
        "sampling_steps": 0 if step is None else step.total,
    }


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(seconds))
