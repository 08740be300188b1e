"""AUTOMATIC1111's web API (/sdapi/v1/...): the request and response shapes its clients already send and read."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image, ImageOps
from pydantic import BaseModel, Field
from safetensors import SafetensorError, safe_open

import ldmkit
from ldmkit.embeddings import embedding_shape
from ldmkit.errors import InvalidRequest, LdmError
from ldmkit.lora import LORA_SUFFIX
from ldmkit.metadata import PARAMETERS_KEY, parse_infotext
from ldmkit.params import MAX_SIDE, MAX_STEPS, GenerationParams, HiresFix
from ldmkit.pipeline import GenerationResult, Pipeline
from ldmkit.previews import make_grid, preview_images
from ldmkit.samplers import ALGORITHMS, get_sampler
from ldmkit.schedules import SCHEDULE_TYPES
from ldmkit.server import a1111_fields, a1111_misc, a1111_xyz
from ldmkit.server.a1111_fields import ServerOptions
from ldmkit.server.controlnet_api import detected_maps, units_from_scripts
from ldmkit.server.imaging import MAX_INPUT_PIXELS, decode_base64_image, encode_all, encode_png_base64
from ldmkit.server.models import model_file, with_refiner
from ldmkit.server.queue import GenerationQueue, Job, wait_for_result
from ldmkit.styles import StyleLibrary
from ldmkit.upscalers import UpscalerInfo
from ldmkit.vae import vae_infotext
from ldmkit.xyz import PlotResult

DEFAULT_HR_STRENGTH = 0.7  # A1111's default denoising strength for the hires fix
# A1111's hires upscaler names -> ldmkit's built-in two. Every latent mode is bilinear here (the image's parameters
# say 'Latent'); 'None' is a plain Lanczos resize in A1111 too. Any other name is one of /upscalers (pipe.upscalers).
HR_UPSCALERS = {
    **dict.fromkeys(
        [
            "Latent",
            "Latent (antialiased)",
            "Latent (bicubic)",
            "Latent (bicubic antialiased)",
            "Latent (nearest)",
            "Latent (nearest-exact)",
        ],
        "latent",
    ),
    **dict.fromkeys(["None", "Lanczos"], "pixel"),
}
MAX_SETTINGS_DEPTH = 8  # A1111's settings are numbers, strings and lists of them: depth 2 at most


# Field names and defaults are AUTOMATIC1111 1.10's (its /sdapi/v1 request models). Every field is implemented,
# or accepted only at a value that changes nothing (A1111's default): a1111_fields refuses the others by name.
# Fields outside A1111's models are ignored, as A1111 ignores them.
class ProcessingRequest(BaseModel):
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = Field(
        None, description="names of /sdapi/v1/prompt-styles, applied in order; an unknown one is refused"
    )
    seed: int = Field(-1, description="-1: random; image i of the request uses seed + i")
    subseed: int = Field(-1, description="variation seed (-1: random); image i uses subseed + i")
    subseed_strength: float = Field(0, description="0 to 1: slerp from the seed's noise to the variation seed's")
    seed_resize_from_h: int = Field(-1, description="draw the seed's noise at this height, centred (<= 0: off)")
    seed_resize_from_w: int = Field(-1, description="draw the seed's noise at this width, centred (<= 0: off)")
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = Field(
        None,
        description="A1111 1.9+'s schedule type, by label or name ('Karras', 'sgm_uniform'); see /sdapi/v1/schedulers."
        " An unknown one, or one the sampler cannot run exactly, is refused (A1111 falls back to Automatic)",
    )
    batch_size: int = 1
    n_iter: int = Field(1, description="batches; they continue the seed sequence")
    steps: int = 50
    cfg_scale: float | None = Field(
        None, description="omitted: the model's default guidance where its folder names one (ldmkit.json), else 7"
    )
    width: int = 512
    height: int = 512
    restore_faces: bool | None = Field(None, description="false only: no face restorer here")
    tiling: bool | None = Field(None, description="seamless textures: circular padding in the UNet and VAE decoder")
    do_not_save_samples: bool = Field(False, description="any: the server saves no files")
    do_not_save_grid: bool = Field(False, description="any: the server saves no files")
    eta: float | None = Field(
        None, description="DDIM and Euler a: 0 to 1; other ancestral/SDE samplers: their default 1 only; others: none"
    )
    s_min_uncond: float | None = Field(None, description="0 only")
    s_churn: float | None = Field(None, description="Euler: Karras' churn; Heun, DPM2: 0 only; others: no effect")
    s_tmax: float | None = Field(None, description="Euler: churn up to this sigma (0: infinity)")
    s_tmin: float | None = Field(None, description="Euler: churn from this sigma")
    s_noise: float | None = Field(None, description="Euler: scale of the churn noise")
    override_settings: dict[str, Any] = Field(
        default_factory=dict,
        description="CLIP_stop_at_last_layers (clip skip), sd_model_checkpoint (the loaded model), sd_vae"
        " (Automatic, None or a name of /sdapi/v1/sd-vae), eta_noise_seed_delta (ENSD); over the server's options"
        " for this request; other keys are refused",
    )
    override_settings_restore_afterwards: bool = Field(
        True, description="false: the override_settings stay, as POST /sdapi/v1/options sets them"
    )
    disable_extra_networks: bool = Field(False, description="false only")
    firstpass_image: str | None = Field(None, description="refused")
    comments: dict[str, Any] | None = Field(None, description="any: shown in A1111's UI only")
    script_name: str | None = Field(None, description="'x/y/z plot' (any case) only: docs/xyz.md")
    script_args: list = Field(
        default_factory=list, description="the X/Y/Z plot's inputs as A1111 1.10's script takes them; else no effect"
    )
    send_images: bool = True
    save_images: bool = Field(
        False, description="any: the images come back in the answer; the server keeps no files (SillyTavern sends true)"
    )
    alwayson_scripts: dict[str, Any] = Field(
        default_factory=dict, description="controlnet: {'args': [units]} as the ControlNet extension takes them"
    )
    force_task_id: str | None = Field(None, description="any: A1111's progress id")
    infotext: str | None = Field(None, description="refused: send the fields")
    refiner_checkpoint: str | None = Field(None, description="a model of /sdapi/v1/sd-models to finish the denoising")
    refiner_switch_at: float | None = Field(None, description="with refiner_checkpoint: the fraction of steps (0.8)")


class Txt2ImgRequest(ProcessingRequest):
    denoising_strength: float | None = Field(
        None, description=f"of the hires fix's second pass (default {DEFAULT_HR_STRENGTH})"
    )
    enable_hr: bool = Field(False, description="hires fix: generate at width x height, upscale, repaint with img2img")
    firstphase_width: int = Field(0, description="any: A1111 1.x ignores it")
    firstphase_height: int = Field(0, description="any: A1111 1.x ignores it")
    hr_scale: float = Field(2.0, description="1 to 4; 1 runs the second pass at the same size")
    hr_upscaler: str | None = Field(
        None, description="Latent (any 'Latent (...)' mode), or an upscaler of /sdapi/v1/upscalers (a model: ESRGAN...)"
    )
    hr_second_pass_steps: float = Field(0, description="0: as many as steps; a fraction is truncated as A1111 does")
    hr_resize_x: int = Field(0, description="target width instead of hr_scale (0: from hr_resize_y or hr_scale)")
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = Field(None, description="the loaded model only")
    hr_sampler_name: str | None = Field(None, description="the second pass's sampler; empty: the first pass's")
    hr_scheduler: str | None = Field(None, description="the second pass's schedule type; empty: the first pass's")
    hr_prompt: str = Field("", description="the second pass's prompt; empty: the prompt")
    hr_negative_prompt: str = Field("", description="the second pass's negative prompt; empty: the negative prompt")


class Img2ImgRequest(ProcessingRequest):
    init_images: list[str] | None = Field(None, description="one base64 image, with or without a data: prefix")
    resize_mode: int = Field(
        0, description="0 just resize, 1 crop and resize, 2 resize and fill, 3 latent upscale (not with a mask)"
    )
    image_cfg_scale: float | None = Field(None, description="any: for instruct-pix2pix models only")
    denoising_strength: float = 0.75
    mask: str | None = Field(
        None, description="inpainting: base64 image, white = repaint (an RGBA one with transparency: its opaque part)"
    )
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = Field(None, description="sets mask_blur_x and _y; they must agree")
    mask_round: bool = Field(True, description="true only")
    inpainting_fill: int = Field(0, description="masked content: 0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool = Field(True, description="true: 'only masked' (the mask's box at the size, pasted back)")
    inpaint_full_res_padding: int = Field(0, description="'only masked': pixels around the mask's box")
    inpainting_mask_invert: int = Field(0, description="1: repaint the black part instead")
    initial_noise_multiplier: float | None = Field(None, description="1 only")
    latent_mask: str | None = Field(None, description="refused")
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


# AUTOMATIC1111 1.9+ names the schedule type apart from the sampler; the infotext and `info` name them
# together ("DPM++ 2M Karras"), as older AUTOMATIC1111 did and 1.9+ still reads.
_DEFAULT_RHO = {"Karras": 7.0, "Polyexponential": 1.0}  # A1111's values; its other types have none
SCHEDULERS = [
    SchedulerItem(
        name=s.name,
        label=s.label,
        aliases=list(s.aliases) or None,
        default_rho=_DEFAULT_RHO.get(s.label),
        need_inner_model=None,
    )
    for s in SCHEDULE_TYPES.values()
]


class LoraItem(BaseModel):
    name: str
    alias: str
    path: str
    metadata: dict = Field(description="the file's safetensors metadata (kohya's ss_* training fields)")


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int = Field(description="size of one vector")
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


def create_router(queue: GenerationQueue, styles: StyleLibrary, options: ServerOptions) -> APIRouter:
    pipe = queue.pipe
    router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

    @router.post("/txt2img", response_model=ImagesResponse)
    async def txt2img(body: Txt2ImgRequest, request: Request):
        generation = _generation_request(body, options, styles, pipe)
        a1111_fields.check_txt2img(body, get_sampler(generation.sampler), pipe.model_name)
        if body.enable_hr:
            generation = dataclasses.replace(generation, hires=_hires(body, pipe))
        return await _generate(queue, body, request, generation, a1111_xyz.TXT2IMG)

    @router.post("/img2img", response_model=ImagesResponse)
    async def img2img(body: Img2ImgRequest, request: Request):
        if not body.init_images:
            raise InvalidRequest("img2img needs init_images: one base64 image")
        if len(body.init_images) > 1:
            raise InvalidRequest(f"img2img takes one init image, got {len(body.init_images)}")
        if body.inpainting_mask_invert not in (0, 1):
            raise InvalidRequest(f"inpainting_mask_invert must be 0 or 1, got {body.inpainting_mask_invert}")
        generation = _generation_request(body, options, styles, pipe)
        a1111_fields.check_img2img(body, get_sampler(generation.sampler))
        mask_blur = a1111_fields.mask_blur(body)
        init_image = await asyncio.to_thread(
            lambda: decode_base64_image(body.init_images[0], "init_images[0]", queue.limits.max_input_pixels).convert(
                "RGB"
            )
        )
        mask_image = None
        if body.mask:
            mask_image = await asyncio.to_thread(
                _decode_mask, body.mask, bool(body.inpainting_mask_invert), queue.limits.max_input_pixels
            )
        generation = dataclasses.replace(
            generation,
            init_image=init_image,
            strength=body.denoising_strength,
            mask_image=mask_image,
            mask_blur=mask_blur,
            **a1111_fields.inpainting_fields(body),
        )
        response = await _generate(queue, body, request, generation, a1111_xyz.IMG2IMG)
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
            current_image = await asyncio.to_thread(
                lambda: encode_png_base64(make_grid(preview_images(pipe, step, "fast")))
            )
        return ProgressResponse(
            progress=job.progress(), eta_relative=job.eta(), state=_state(job), current_image=current_image
        )

    @router.post("/interrupt")
    async def interrupt():
        queue.interrupt()
        return {}

    @router.get("/samplers", response_model=list[SamplerItem])
    async def samplers():
        return [
            SamplerItem(name=a.name, aliases=list(a.aliases), options=_sampler_options(a.default_schedule))
            for a in ALGORITHMS
        ]

    @router.get("/schedulers", response_model=list[SchedulerItem])
    async def schedulers():
        return SCHEDULERS

    @router.get("/upscalers", response_model=list[UpscalerItem])
    async def upscalers():
        """The resizes, then the model files of --upscalers-dir (their path within it; the scale once loaded)."""
        return [_upscaler_item(info, pipe.upscalers.folder) for info in await asyncio.to_thread(pipe.upscalers.entries)]

    @router.get("/latent-upscale-modes")
    async def latent_upscale_modes() -> list[dict]:
        return [{"name": name} for name, kind in HR_UPSCALERS.items() if kind == "latent"]

    @router.get("/loras", response_model=list[LoraItem])
    async def loras():
        return await asyncio.to_thread(list_loras, pipe.lora_dir)

    @router.get("/embeddings", response_model=EmbeddingsResponse)
    async def embeddings():
        loaded = await asyncio.to_thread(
            lambda: {name: _embedding_item(path) for name, path in pipe.embeddings.items()}
        )
        return EmbeddingsResponse(loaded=loaded, skipped={})

    @router.get("/sd-models", response_model=list[SDModelItem])
    async def sd_models():
        return [  # the served model, then the refiners (`ldm serve --refiner`)
            SDModelItem(
                title=m.model_name, model_name=m.model_name, hash=None, sha256=None, filename=model_file(m), config=None
            )
            for m in queue.models
        ]

    # Clients (Open WebUI, webuiapi, SillyTavern) read and set the model, clip skip and VAE through the options.
    @router.get("/options")
    async def get_options() -> dict:
        return options.as_dict()

    @router.post("/options")
    async def set_options(values: dict[str, Any]) -> None:
        """Kept for the server's life; a key this server does not have is refused by name (A1111 ignores it)."""
        _check_nesting(values, "options", MAX_SETTINGS_DEPTH)
        options.update(values)

    @router.post("/png-info", response_model=PngInfoResponse)
    async def png_info(body: PngInfoRequest):
        image = await asyncio.to_thread(decode_base64_image, body.image, "image", queue.limits.max_input_pixels)
        items = {key: value for key, value in image.info.items() if isinstance(value, str)}
        info = items.pop(PARAMETERS_KEY, "")
        return PngInfoResponse(info=info, items=items, parameters=parse_infotext(info) if info else {})

    a1111_misc.add_routes(router, queue, styles)
    return router


def server_options(pipe: Pipeline) -> ServerOptions:
    """The A1111 settings of a server over `pipe`: clip skip checked against its model, sd_vae against its VAEs."""
    return ServerOptions(
        pipe.model_name, check_clip_skip=lambda n: check_clip_skip(pipe, n), vae_names=lambda: pipe.vaes.names()
    )


def vae_setting(pipe: Pipeline, sd_vae: str) -> str | None:
    """A1111's sd_vae value -> GenerationParams.vae: "Automatic" the --vae one (or the model's own), "None" the
    model's own, else a name of the server's VAEs."""
    if sd_vae == "Automatic":
        return None if pipe.vaes.automatic is None else str(pipe.vaes.automatic)
    return None if sd_vae == "None" else sd_vae


def check_clip_skip(pipe: Pipeline, clip_skip: int) -> None:
    """The model's range for clip skip, checked when an option sets it rather than at every later request."""
    pipe.family.check(pipe.state, GenerationParams(prompt="", clip_skip=clip_skip))


def _generation_request(
    body: ProcessingRequest, options: ServerOptions, styles: StyleLibrary, pipe: Pipeline
) -> GenerationParams:
    """The fields txt2img and img2img share, under the server's options (override_settings win over them)."""
    prompt, negative_prompt = styles.apply(body.styles or [], body.prompt, body.negative_prompt)
    _check_nesting(body.override_settings, "override_settings", MAX_SETTINGS_DEPTH)
    settings = options.for_request(body.override_settings, keep=not body.override_settings_restore_afterwards)
    return GenerationParams(
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=body.steps,
        guidance=a1111_fields.cfg_scale(body, pipe.components.default_guidance),
        sampler=_sampler(body.sampler_name or body.sampler_index, body.scheduler),
        seed=None if body.seed == -1 else body.seed,
        width=body.width,
        height=body.height,
        num_images=body.batch_size,
        batch_count=body.n_iter,
        clip_skip=settings[a1111_fields.CLIP_SKIP_SETTING],
        vae=vae_setting(pipe, settings[a1111_fields.VAE_SETTING]),
        subseed=None if body.subseed == -1 else body.subseed,
        subseed_strength=body.subseed_strength,
        seed_resize_from=a1111_fields.seed_resize_from(body),
        eta=body.eta,
        s_churn=body.s_churn or 0.0,
        s_tmin=body.s_tmin or 0.0,
        s_tmax=a1111_fields.s_tmax(body),
        s_noise=1.0 if body.s_noise is None else body.s_noise,
        eta_noise_seed_delta=settings[a1111_fields.ENSD_SETTING],
        tiling=bool(body.tiling),
    )


async def _generate(
    queue: GenerationQueue, body: ProcessingRequest, request: Request, generation: GenerationParams, tab: str
) -> dict:
    controls, save_maps = await asyncio.to_thread(
        units_from_scripts, body.alwayson_scripts, queue.pipe.controlnets, queue.limits.max_input_pixels
    )
    generation = with_refiner(generation, body.refiner_checkpoint, body.refiner_switch_at, queue.models)
    generation = dataclasses.replace(generation, controls=controls)
    if a1111_xyz.is_xyz_script(body.script_name):
        if any(save_maps):
            raise InvalidRequest(
                "save_detected_map is not supported with the X/Y/Z plot (it answers the grid and its cells only); "
                "send save_detected_map: false"
            )
        script = a1111_xyz.plot_from_script_args(body.script_args, tab, generation)
        return await _generate_plot(queue, body, request, script)
    job = queue.submit(generation)
    result = await wait_for_result(queue, job, request.is_disconnected)
    images = await asyncio.to_thread(lambda: encode_all(result) + detected_maps(result, save_maps))
    return {
        "images": images if body.send_images else [],
        "parameters": _parameters(body, queue.pipe),
        "info": json.dumps(_info(job, result, queue.pipe, body)),
    }


async def _generate_plot(
    queue: GenerationQueue, body: ProcessingRequest, request: Request, script: a1111_xyz.ScriptRequest
) -> dict:
    """A1111's X/Y/Z plot answer: the grid, the sub-grids and cells if asked, `info` describing the cells."""
    job = queue.submit_plot(script.plot)
    plot: PlotResult = await wait_for_result(queue, job, request.is_disconnected)
    images, infotexts, seeds = plot.outputs(script.include_sub_grids, script.include_cells)
    encoded = await asyncio.to_thread(lambda: [encode_png_base64(i, t) for i, t in zip(images, infotexts)])
    info = _info(job, GenerationResult(images, seeds, infotexts, plot.interrupted), queue.pipe, body)
    cells = job.cells[: len(seeds)]
    info.update(
        all_prompts=[cell.prompt for cell in cells],
        all_negative_prompts=[cell.negative_prompt for cell in cells],
        all_subseeds=[-1] * len(cells),
        index_of_first_image=1 + (len(plot.sub_grids) if script.include_sub_grids else 0),
    )
    return {
        "images": encoded if body.send_images else [],
        "parameters": _parameters(body, queue.pipe),
        "info": json.dumps(info),
    }


def _parameters(body: ProcessingRequest, pipe: Pipeline) -> dict:
    """The request as A1111 echoes it: with the cfg_scale used where it was omitted, as A1111 shows its default."""
    return body.model_dump() | {"cfg_scale": a1111_fields.cfg_scale(body, pipe.components.default_guidance)}


def _sampler(name: str, scheduler: str | None) -> str:
    """A1111 1.9+'s sampler + scheduler pair -> the registry's label for it ('DPM++ 2M Karras')."""
    return get_sampler(name, scheduler).name


def _sampler_options(default_schedule: str) -> dict:
    """A1111's sampler options: the schedule type its 'Automatic' runs, by API name."""
    schedule = SCHEDULE_TYPES[default_schedule]
    return {} if schedule.sigmas is None else {"scheduler": schedule.name}


def _check_nesting(value: Any, name: str, max_depth: int) -> None:
    """Refuse JSON nested deeper than max_depth: the response echoes the request, and pydantic cannot
    serialize past ~250 levels (which used to be a 500 after the whole generation had run)."""
    level, depth = [value], 0
    while level:
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
        if level and (depth := depth + 1) > max_depth:
            raise InvalidRequest(f"{name} is nested more than {max_depth} levels deep")


def _upscaler_item(info: UpscalerInfo, folder: Path | None) -> UpscalerItem:
    if not info.is_model:
        return UpscalerItem(name=info.name)
    path = info.path.relative_to(folder).as_posix()  # where the folder is on disk is not a client's business
    return UpscalerItem(name=info.name, model_name=info.name, model_path=path, scale=info.scale)


def _hires(body: Txt2ImgRequest, pipe: Pipeline) -> HiresFix:
    """A1111's hires fields -> ldmkit's HiresFix; hr_resize_x/y, when given, set the scale."""
    upscaler_name = body.hr_upscaler or "Latent"
    upscaler = HR_UPSCALERS.get(upscaler_name) or pipe.upscalers.resolve(upscaler_name, "hr_upscaler").name
    if not 0 <= body.hr_second_pass_steps <= MAX_STEPS:
        raise InvalidRequest(
            f"hr_second_pass_steps must be from 0 (as steps) to {MAX_STEPS}, got {body.hr_second_pass_steps}"
        )
    second_pass_steps = int(body.hr_second_pass_steps)  # A1111 truncates 7.5 to 7
    strength = DEFAULT_HR_STRENGTH if body.denoising_strength is None else body.denoising_strength
    scale, crop_to = body.hr_scale, None
    if body.hr_resize_x or body.hr_resize_y:
        scale, crop_to = _resize_scale(body.width, body.height, body.hr_resize_x, body.hr_resize_y)
    return HiresFix(
        scale,
        strength,
        second_pass_steps or None,
        upscaler,
        prompt=body.hr_prompt,
        negative_prompt=body.hr_negative_prompt,
        sampler=a1111_fields.hires_sampler(body),
        crop_to=crop_to,
    )


def _resize_scale(
    width: int, height: int, target_width: int, target_height: int
) -> tuple[float, tuple[int, int] | None]:
    """(scale, crop) that take width x height to the target: a missing side keeps the aspect ratio; two sides of
    another aspect ratio upscale to cover the target and cut it from the middle, as A1111 does."""
    if not (
        0 <= target_width <= MAX_SIDE
        and 0 <= target_height <= MAX_SIDE
        and 0 < width <= MAX_SIDE
        and 0 < height <= MAX_SIDE
    ):
        raise InvalidRequest(
            f"hr_resize_x/y and the size must be from 1 to {MAX_SIDE}, "
            f"got {target_width}x{target_height} from {width}x{height}"
        )
    if target_width % 8 or target_height % 8:
        raise InvalidRequest(
            f"hr_resize {target_width}x{target_height} from {width}x{height}: give sides that are multiples of 8"
        )
    if target_width and target_height and target_width * height != target_height * width:
        ratio = max(target_width / width, target_height / height)  # cover the target, then cut it out
        crop = (target_width, target_height)
    else:
        ratio, crop = (target_width / width if target_width else target_height / height), None
    scale = math.ceil(ratio * 1e6) / 1e6  # just above the ratio, so HiresFix's rounding down lands on the target
    covered = HiresFix(scale).upscaled_size(width, height)
    wanted = crop or (target_width or covered[0], target_height or covered[1])
    if covered[0] < wanted[0] or covered[1] < wanted[1] or (crop is None and covered != wanted):
        raise InvalidRequest(
            f"hr_resize {target_width}x{target_height} from {width}x{height}: give sides that are multiples of 8"
        )
    return scale, crop


def _decode_mask(text: str, invert: bool, max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    mask = mask_from_image(decode_base64_image(text, "mask", max_pixels))
    return ImageOps.invert(mask) if invert else mask


def mask_from_image(image: Image.Image) -> Image.Image:
    """A1111's reading of a mask: an RGBA one with transparency is its alpha channel (rounded to 0/255); else grey."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        return image.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    return image.convert("L")


def list_loras(lora_dir: str | Path | None) -> list[LoraItem]:
    """A1111's /loras entries: every LoRA file a <lora:NAME> tag can name."""
    if lora_dir is None:
        return []
    lora_dir = Path(lora_dir)
    files = sorted(p for p in lora_dir.rglob(f"*{LORA_SUFFIX}") if p.is_file())
    # The path within the LoRA folder: where the folder is on disk is not a client's business.
    return [
        LoraItem(name=p.stem, alias=p.stem, path=p.relative_to(lora_dir).as_posix(), metadata=_safetensors_metadata(p))
        for p in files
    ]


def _safetensors_metadata(path: Path) -> dict:
    try:
        with safe_open(path, "pt") as file:
            return file.metadata() or {}
    except (OSError, SafetensorError):
        return {}  # listed anyway: the request that names it gets the reason


def _embedding_item(path: Path) -> EmbeddingItem:
    try:
        count, width = embedding_shape(path)
    except LdmError:
        return EmbeddingItem(shape=0, vectors=0)
    return EmbeddingItem(shape=width, vectors=count)


def _info(job: Job, result: GenerationResult, pipe: Pipeline, body: ProcessingRequest) -> dict:
    """The JSON AUTOMATIC1111's Processed.js() returns, for the fields ldmkit has; as there, prompt and
    negative_prompt are the request's and the all_* lists hold them with the styles applied."""
    r, count = job.request, len(result.images)
    vae = vae_infotext(pipe.check_vae(r))
    return {
        "prompt": body.prompt,
        "all_prompts": [r.prompt] * count,
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [r.negative_prompt] * count,
        "seed": r.seed,
        "all_seeds": result.seeds,
        "subseed": r.subseed if r.uses_variation else -1,
        "all_subseeds": r.image_subseeds()[:count] if r.uses_variation else [-1] * count,
        "subseed_strength": r.subseed_strength,
        "width": r.width,
        "height": r.height,
        "sampler_name": r.sampler,
        "cfg_scale": r.guidance,
        "steps": r.steps,
        "batch_size": r.num_images,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": pipe.model_name,
        "sd_model_hash": None,
        "sd_vae_name": vae.get("VAE"),
        "sd_vae_hash": vae.get("VAE hash"),
        "seed_resize_from_w": r.seed_resize_from[0] if r.seed_resize_from else -1,
        "seed_resize_from_h": r.seed_resize_from[1] if r.seed_resize_from else -1,
        "denoising_strength": r.hires.strength if r.hires else r.strength if r.init_image is not None else None,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": result.infotexts,
        "styles": body.styles or [],
        "job_timestamp": _timestamp(job.created),
        "clip_skip": r.clip_skip,
        "is_using_inpainting_conditioning": r.mask_image is not None and pipe.is_inpainting_model,
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
        "job_count": 0 if job is None else len(job.cells) or job.request.batch_count,
        "job_timestamp": "0" if job is None else _timestamp(job.created),
        "job_no": 0 if job is None else job.cell if job.plot is not None else job.batch,
        "sampling_step": 0 if step is None else step.step + 1,
        "sampling_steps": 0 if step is None else step.total,
    }


def _timestamp(seconds: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime(seconds))
