"""The latent diffusion workflow: prompt -> CLIP embeddings -> denoised latents -> VAE decode -> images.

`Pipeline.run` reads as numbered stages, each one named method, like a diffusers pipeline's `__call__`;
`Pipeline.generate` is its keyword form. The request is a GenerationParams (ldmkit.params), the loop is
ldmkit.denoise's, what differs per model family is ldmkit.families'; the components (UNet, VAE, CLIP,
schedulers) are diffusers' and transformers' own (docs/architecture.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit import loading, tiled_vae
from ldmkit.control_units import ControlUnit
from ldmkit.controlnet import ControlNetLibrary, Controls, check_controls, prepare_controls
from ldmkit.denoise import Denoiser, Sampled, Schedule, StepInfo, sample
from ldmkit.embeddings import load_embeddings, ti_hashes_infotext
from ldmkit.errors import InvalidRequest
from ldmkit.families import Conditioning, family_of, scheduler_from_config
from ldmkit.hires import upscale
from ldmkit.images import pil_to_tensor, tensor_to_pil
from ldmkit.inpainting import KnownRegion, prepare_mask
from ldmkit.loading import Components
from ldmkit.lora import applied_loras, check_lora_file, lora_hashes_infotext, resolve_lora
from ldmkit.memory import Footprint, check_memory
from ldmkit.metadata import format_infotext
from ldmkit.model_state import ModelState
from ldmkit.params import HIRES_UPSCALERS, GenerationParams, HiresFix, RequestLimits
from ldmkit.previews import fast_preview, latent_rgb_projection
from ldmkit.prompts import MAX_PROMPT_CHUNKS, check_prompt_chunks, clip_skip_infotext
from ldmkit.refiner import DEFAULT_SWITCH, check_refiner, checkpoint_shorthash, refiner_infotext
from ldmkit.samplers import DEFAULT_SAMPLER, get_sampler
from ldmkit.upscalers import UpscalerLibrary


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]  # image i used seeds[i] (seed + i unless a seed per image was given)
    infotexts: list[str]  # AUTOMATIC1111-style 'parameters' text, one per image
    interrupted: bool = False  # stopped early: the images are those formed so far (none if it stopped first)
    control_maps: list[Image.Image] = dataclasses.field(default_factory=list)  # each ControlNet unit's map, per pass


@dataclass
class Formed:
    """One batch's latents as sampling left them."""

    seeds: list[int]
    latents: torch.Tensor | None  # None: stopped before an image formed
    interrupted: bool = False
    hires_done: bool = True  # False: the latents are the base pass's (stopped before the hires pass ran)
    refined: bool = False  # the refiner took over: its VAE decodes them


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' picks CUDA, then MPS, then the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidRequest(f"unknown device {device!r}; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("device 'cuda' requested but no CUDA GPU is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidRequest("device 'mps' requested but MPS is not available")
    return device


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto'/None: fp16 on accelerators, fp32 on the CPU (where fp16 is slow)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.float16
    if dtype not in _DTYPES:
        raise InvalidRequest(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class Pipeline:
    """Text-to-image and image-to-image with classifier-free guidance over one loaded model."""

    def __init__(
        self,
        components: Components,
        device: torch.device,
        dtype: torch.dtype,
        lora_dir=None,
        embeddings_dir=None,
        controlnet_dir=None,
        upscalers_dir=None,
    ):
        self.components = components
        self.family = family_of(components)  # what differs between SD 1.x/2.x and other families
        self.scheduler_config = components.scheduler_config
        self._state = ModelState(
            tokenizer=components.tokenizer,
            text_encoder=_place(components.text_encoder, device, dtype),
            unet=_place(components.unet, device, dtype),
            vae=_place(components.vae, device, dtype),
            device=device,
            dtype=dtype,
            tokenizer_2=components.tokenizer_2,
            text_encoder_2=_place(components.text_encoder_2, device, dtype),
            pipeline_config=components.pipeline_config,
        )
        self.latent_channels = self.vae.config.latent_channels
        # SD inpainting UNets also take the mask and the masked image's latents: 4 + 1 + 4 channels.
        self.is_inpainting_model = self.unet.config.in_channels == 2 * self.latent_channels + 1
        self.lora_dir = lora_dir  # where <lora:NAME:W> prompt tags are looked up
        self.controlnets = ControlNetLibrary(controlnet_dir)  # ControlNets by name (and any by path)
        self.upscalers = UpscalerLibrary(upscalers_dir, device, dtype)  # hires fix's (and the server's) upscalers
        self.embeddings = {}  # textual inversion name -> file, usable as words in prompts
        if embeddings_dir is not None:
            if components.text_encoder_2 is not None:  # SDXL files hold a vector per encoder (clip_l, clip_g)
                raise InvalidRequest("textual-inversion embeddings are not supported for SDXL models yet")
            self.embeddings = load_embeddings(embeddings_dir, self.tokenizer, self.text_encoder)

    @classmethod
    def from_pretrained(
        cls,
        source=None,
        device="cpu",
        dtype=None,
        config=None,
        *,
        fast=False,
        vae_tiling=False,
        offload=False,
        lora_dir=None,
        embeddings_dir=None,
        controlnet_dir=None,
        upscalers_dir=None,
    ) -> Pipeline:
        """Load a diffusers folder, a cached Hub repo id, an original single file, or (None) the default model.

        fast=True applies the measured exact GPU speed-ups of ldmkit.fast (fp16, channels_last, fused
        QKV, torch.compile with CUDA graphs); the first image of a size then includes the compile time, or,
        once an earlier process saved it (ldmkit.precompile), the time to load it.
        vae_tiling=True encodes and decodes images larger than a tile (512 px for SD) in tiles that share
        GroupNorm statistics (ldmkit.tiled_vae), so the VAE's memory stays that of one tile, without seams.
        offload=True keeps the models in CPU memory and moves each to the GPU only while it runs (ldmkit.offload).
        upscalers_dir: upscaler model files (ESRGAN...) hires fix can name besides latent and Lanczos (upscalers.py).
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        components = loading.load_components(source, config=config)
        pipe = cls(components, device, dtype, lora_dir, embeddings_dir, controlnet_dir, upscalers_dir)
        if vae_tiling:
            pipe.enable_vae_tiling()
        if offload:
            pipe.enable_offload()
        if fast:
            pipe.make_fast()
        return pipe

    # -- the models, as they are now ----------------------------------------------------------------

    @property
    def state(self) -> ModelState:
        """The models this pipeline runs and the transforms applied to them (read-only: change it with `apply`)."""
        return self._state

    def apply(self, transform: Callable[[ModelState], ModelState]) -> None:
        """Run the models as transform(state) from now on: the one way they change (fast path, VAE tiling...)."""
        self._state = transform(self._state)

    def make_fast(self, **options) -> None:
        """ldmkit.fast's exact speed-ups (fp16 on CUDA, fused QKV, channels_last, compile); see fast.make_fast."""
        from ldmkit import fast

        self.apply(functools.partial(fast.make_fast, **options))

    def enable_vae_tiling(self, tile_px: int | None = None) -> None:
        """Encode and decode images larger than `tile_px` (default: ldmkit.tiled_vae.default_tile_px) in tiles."""
        tile_px = tile_px or tiled_vae.default_tile_px(self.vae)
        self.apply(lambda state: state.with_transform(f"vae_tiling:{tile_px}", vae_tile_px=tile_px))

    def enable_offload(self) -> None:
        """Model CPU offload on a CUDA device (ldmkit.offload): less GPU memory, a copy per model per request."""
        from ldmkit.offload import offload

        self.apply(offload)

    @property
    def device(self) -> torch.device:
        return self._state.device

    @property
    def dtype(self) -> torch.dtype:
        return self._state.dtype

    @property
    def tokenizer(self):
        return self._state.tokenizer

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self._state.text_encoder

    @property
    def unet(self) -> torch.nn.Module:
        return self._state.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self._state.vae

    @property
    def vae_scale_factor(self) -> int:
        return self._state.vae_scale_factor

    def memory_footprint(self) -> Footprint:
        return Footprint(
            dtype=self.dtype,
            vae_scale_factor=self.vae_scale_factor,
            unet_channels=self.unet.config.block_out_channels[0],
            vae_channels=self.vae.config.block_out_channels[0],
            context_dim=self.unet.config.cross_attention_dim,
            attention_width=self.unet.config.block_out_channels[-1],
            vae_tile_px=self._state.vae_tile_px,
        )

    @property
    def source(self) -> str:
        return self.components.source

    @property
    def model_name(self) -> str:
        return self.components.name

    @property
    def model_hash(self) -> str | None:
        """A1111's short hash of a single-file model (sha256, first 10 hex digits); None for a folder."""
        return checkpoint_shorthash(self.source) if Path(self.source).is_file() else None

    @property
    def default_size(self) -> int:
        return self.family.default_size(self._state)

    @property
    def max_clip_skip(self) -> int:
        """The largest clip skip every text encoder of the model takes (the SDXL refiner has bigG alone)."""
        encoders = (self._state.text_encoder, self._state.text_encoder_2)
        return min(encoder.config.num_hidden_layers for encoder in encoders if encoder is not None)

    @torch.inference_mode()
    def generate(
        self,
        prompt: str | list[str],
        negative_prompt: str = "",
        steps: int = 25,
        guidance: float = 7.5,
        sampler: str = DEFAULT_SAMPLER,
        seed: int | list[int] | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        init_image: Image.Image | None = None,
        strength: float = 0.75,
        callback: Callable[[StepInfo], None] | None = None,
        *,
        mask_image: Image.Image | None = None,
        mask_blur: int = 4,
        hires: HiresFix | None = None,
        clip_skip: int = 1,
        loras: list[tuple[str, float]] | None = None,
        batch_count: int = 1,
        should_stop: Callable[[], bool] | None = None,
        controls: list[ControlUnit] | None = None,
        refiner: Pipeline | Components | None = None,
        refiner_switch: float = DEFAULT_SWITCH,
    ) -> GenerationResult:
        """Images for a prompt (or a list of prompts: num_images of each); GenerationParams describes each argument.

        `refiner` (a Pipeline, or Components to place as this one's models are) finishes the denoising from
        `refiner_switch` of the schedule on (ldmkit.refiner)."""
        if isinstance(refiner, Components):
            refiner = Pipeline(refiner, self.device, self.dtype)
        params = GenerationParams(
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance=guidance,
            sampler=sampler,
            seed=seed,
            width=width,
            height=height,
            num_images=num_images,
            batch_count=batch_count,
            init_image=init_image,
            strength=strength,
            mask_image=mask_image,
            mask_blur=mask_blur,
            hires=hires,
            clip_skip=clip_skip,
            loras=tuple(loras or ()),
            controls=tuple(controls or ()),
            refiner=refiner,
            refiner_switch=refiner_switch,
        )
        return self.run(params, callback, should_stop)

    @torch.inference_mode()
    def run(
        self,
        params: GenerationParams,
        callback: Callable[[StepInfo], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Run one request: its batches one after another, each from the prompt to images.

        should_stop() is asked before each LoRA file, batch, pass, denoising step and decode. True interrupts:
        no more forming, and the result holds the images formed so far, as they look at that step (decoded,
        described as what they are). To abandon the run instead (cancel, shutdown), should_stop raises.
        """
        stop = _Stop(should_stop)
        # 1. Check the request against this model, before any compute.
        p = self.prepare(params)
        lora_files = self.lora_files(p)
        controls = self.prepare_controls(p)
        # 2. LoRAs, applied for this request only.
        formed = []
        with self.loras_applied(lora_files, stop):
            # 3-5. Each batch: prompt -> conditioning -> base pass -> hires pass.
            for batch, seeds in enumerate(p.batch_seeds()):
                if stop():
                    break
                formed.append(self.sample_batch(p, seeds, batch, callback, stop, controls))
                if formed[-1].interrupted:
                    break
        # 6. Decode and describe.
        result = self.finish(p, lora_files, formed, stop)
        for model in (self, p.refiner):  # with offload, the GPU is left empty between requests
            if model is not None:
                model.state.release()
        if controls is not None:
            result.control_maps = controls.control_maps()
        return result

    def prepare(self, params: GenerationParams, limits: RequestLimits | None = None) -> GenerationParams:
        """The request made concrete for this model (size, sampler name, seed) and checked, before any compute.

        `limits` adds a server's limits to GenerationParams.validate; the model's own checks follow: its family's
        (clip skip), a mask for an inpainting model, LoRA files, and the memory the request needs.
        """
        params.validate(limits)
        p = params.resolved(self.default_size)
        p.validate(limits)  # again, with the size known
        self.family.check(self._state, p)
        if p.hires is not None and p.hires.upscaler not in HIRES_UPSCALERS:  # the name as the folder spells it
            info = self.upscalers.check(p.hires.upscaler, (p.width, p.height), p.final_size, "hires upscaler")
            p = dataclasses.replace(p, hires=dataclasses.replace(p.hires, upscaler=info.name))
        max_chunks = MAX_PROMPT_CHUNKS if limits is None else limits.max_prompt_chunks
        for text in p.text_prompts():  # before any LoRA file is read or any text encoded
            check_prompt_chunks(self._state.tokenizer or self._state.tokenizer_2, text, p.negative_prompt, max_chunks)
        if self.is_inpainting_model and p.mask_image is None:
            raise InvalidRequest("this is an inpainting model: give an init image and a mask")
        self.lora_files(p)
        check_controls(p.controls, self.controlnets, self._state)
        if p.refiner is not None:
            if not isinstance(p.refiner, Pipeline):
                raise InvalidRequest(f"refiner must be a loaded Pipeline, not {type(p.refiner).__name__}")
            check_refiner(self, p.refiner, p)
        context_tokens = self.family.context_tokens(self._state, [*p.text_prompts(), p.negative_prompt])
        check_memory(self.memory_footprint(), self.device, *p.final_size, p.batch_size, p.use_guidance, context_tokens)
        return p

    def sample_batch(
        self, p: GenerationParams, seeds: list[int], batch: int, callback, stop: _Stop, controls: Controls | None = None
    ) -> Formed:
        """Stages 3-5 for one batch: prompt -> conditioning -> the base pass -> (hires) the img2img pass again.

        `controls` (ControlNets) add their residuals to the UNet call of each pass they guide.
        """
        # Image i owns a CPU generator seeded seeds[i]: the same seed gives the same image on any
        # device and in any batch; it also feeds the VAE posterior samples and ancestral noise.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        sampler = get_sampler(p.sampler)
        # 3. Prompt -> conditioning (unconditional half first, as in diffusers), in the denoiser.
        conditioning = self.encode_prompt(p)
        if stop():
            return Formed(seeds, None, interrupted=True)
        prediction_type = self.scheduler_config["prediction_type"]
        denoiser = Denoiser(
            self._state.run_unet, conditioning.context, p.guidance, prediction_type, conditioning.unet_kwargs
        )
        base = Schedule.make(sampler, self.scheduler_config, p.steps, None if p.init_image is None else p.strength)
        second = None
        if p.hires is not None:
            second = Schedule.make(sampler, self.scheduler_config, p.hires.pass_steps(p.steps), p.hires.strength)
        elif p.refiner is not None:  # the refiner runs the schedule's steps below the switch point
            base = base.until(p.refiner_switch)
            second = Schedule.make_after(sampler, p.refiner.scheduler_config, p.steps, p.refiner_switch)
        steps = _Steps(callback, batch, len(base) + (len(second) if second else 0))  # one count over both passes
        noise_generators = generators if sampler.stochastic else None
        unguided = denoiser
        if controls is not None:
            denoiser = controls.guide(unguided, len(base), (p.width, p.height))

        # 4. The base pass: txt2img from noise, img2img from the init image noised to `strength`, or inpainting.
        if p.mask_image is not None:
            latents, hook, extra_channels = self.prepare_inpainting(p, generators, base)
            inpainting = dataclasses.replace(denoiser, extra_channels=extra_channels)
            done = sample(inpainting, base, latents, noise_generators, hook, steps.callback, stop)
        elif p.init_image is not None:
            image_latents = self.encode_samples(self.image_to_tensor(p.init_image, p.width, p.height), generators)
            done = self.img2img(denoiser, base, image_latents, generators, noise_generators, steps.callback, stop)
        else:
            latents = self.prepare_latents(generators, p.height, p.width) * base.scheduler.init_noise_sigma
            done = sample(denoiser, base, latents, noise_generators, None, steps.callback, stop)
        if not second or done.interrupted or stop():
            handed_over = p.refiner is not None and not done.interrupted  # its latents are still noisy
            latents = done.clean if handed_over else done.latents
            return Formed(seeds, latents, done.interrupted or stop.requested, hires_done=False)
        if p.refiner is not None:
            steps.before = len(base)
            self._state.release()  # with offload, this model's UNet leaves the GPU to the refiner
            refined = p.refiner.refine(p, second, done.latents, noise_generators, steps.callback, stop)
            if refined.latents is None:  # stopped before its first step: the base's prediction is the image
                return Formed(seeds, done.clean, interrupted=True)
            return Formed(seeds, refined.latents, refined.interrupted, refined=True)

        # 5. Hires fix: upscale, then the img2img stage again at the larger size (which size-conditioned families
        # such as SDXL are told, as AUTOMATIC1111 tells them).
        conditioning = self.encode_prompt(p, p.hires.target_size(p.width, p.height))
        denoiser = dataclasses.replace(denoiser, context=conditioning.context, unet_kwargs=conditioning.unet_kwargs)
        upscaled = upscale(
            p.hires,
            done.latents,
            self.vae_scale_factor,
            self.latents_to_images,
            self.images_to_latents,
            self.upscalers.upscale,
        )
        steps.before = len(base)
        if controls is not None:
            denoiser = controls.guide(unguided, len(second), p.final_size, hires=True)
        hires = self.img2img(denoiser, second, upscaled, generators, noise_generators, steps.callback, stop)
        if hires.latents is None:  # stopped before its first step: the base pass's image is the one formed
            return Formed(seeds, done.latents, interrupted=True, hires_done=False)
        return Formed(seeds, hires.latents, hires.interrupted, hires_done=True)

    def refine(self, p: GenerationParams, schedule: Schedule, latents, noise_generators, callback, stop) -> Sampled:
        """As a refiner: go on denoising latents another model left at the start of `schedule`, with this model's
        own conditioning of the request's prompts."""
        conditioning = self.encode_prompt(p)
        prediction_type = self.scheduler_config["prediction_type"]
        denoiser = Denoiser(
            self._state.run_unet, conditioning.context, p.guidance, prediction_type, conditioning.unet_kwargs
        )
        return sample(denoiser, schedule, latents.to(self.dtype), noise_generators, None, callback, stop)

    def img2img(self, denoiser, schedule, clean_latents, generators, noise_generators, callback, stop) -> Sampled:
        """Noise clean latents to the schedule's first step, then denoise them (img2img, and hires fix's 2nd pass)."""
        noise = self.prepare_latents(generators, *clean_latents.shape[-2:], in_latent_space=True)
        latents = schedule.add_noise(clean_latents, noise)
        return sample(denoiser, schedule, latents, noise_generators, None, callback, stop)

    def finish(self, p: GenerationParams, lora_files, formed: list[Formed], stop: _Stop) -> GenerationResult:
        """Stage 6: decode every image formed, one at a time, and describe each as what it is."""
        result = GenerationResult(images=[], seeds=[], infotexts=[], interrupted=stop.requested)
        stop.ask()  # a cancel still leaves before the embeddings' hashes and the decodes
        extra = self.infotext_params(p, lora_files)
        prompts = [prompt for prompt in p.prompts for _ in range(p.num_images)]
        for batch in formed:
            if batch.latents is None:
                continue
            # An image interrupted before its hires pass (or its refiner) is the base pass's: its size and
            # parameters say so, and this model's VAE decodes it.
            described = p if batch.hires_done or p.hires is None else dataclasses.replace(p, hires=None)
            if p.refiner is not None and not batch.refined:
                described = dataclasses.replace(p, refiner=None)
            batch_extra = extra if described is p else self.infotext_params(described, lora_files)
            decoder = p.refiner if batch.refined else self
            for latents, prompt, seed in zip(batch.latents.split(1), prompts, batch.seeds):
                stop.ask()
                result.images += decoder.latents_to_images(latents)
                result.seeds.append(seed)
                result.infotexts.append(self.infotext(described, prompt, seed, batch_extra))
        return result

    def prepare_controls(self, p: GenerationParams) -> Controls | None:
        """The request's ControlNets on this pipeline's device, with their control maps at each pass's size."""
        if not p.controls:
            return None
        sizes = [(p.width, p.height)] + ([p.final_size] if p.hires is not None else [])
        return prepare_controls(p.controls, self.controlnets, self.unet, sizes, p.init_image, self.device, self.dtype)

    def lora_files(self, p: GenerationParams) -> list[tuple[str, Path, float]]:
        """(name as written, file, weight) of every LoRA the request asks for: its prompt tags, then `loras`."""
        tags = p.prompt_loras()
        if (tags or p.loras) and self._state.has("offload"):
            # diffusers' LoRA loader takes offload hooks off and puts its own back; not verified on a GPU yet.
            raise InvalidRequest("LoRAs are not supported with --offload yet; load the model without it")
        if tags and self.lora_dir is None:
            raise InvalidRequest("the prompt has <lora:...> tags but no LoRA folder is set (--lora-dir)")
        files = [(name, resolve_lora(name, self.lora_dir), weight) for name, weight in tags]
        for path, weight in p.loras:
            path = Path(path)
            if not path.is_file():
                raise InvalidRequest(f"LoRA file not found: {path}")
            files.append((path.stem, path, weight))
        for _, path, _ in files:
            check_lora_file(path)
        if files and self._state.has("fused_qkv"):
            # fast.make_fast fused q/k/v into one projection, which a LoRA's q/k/v layers would bypass.
            raise InvalidRequest("LoRAs are not supported on the fast path (fused QKV); load the model without --fast")
        return files

    @contextlib.contextmanager
    def loras_applied(self, lora_files: list[tuple[str, Path, float]], should_stop: Callable[[], bool] | None = None):
        """The LoRAs in the models, and on record in the state, while the context is open (one request's);
        should_stop is asked before each file is read (lora.applied_loras)."""
        if not lora_files:
            yield
            return
        host = self.family.diffusers_pipeline(self._state, scheduler_from_config(self.scheduler_config))
        with applied_loras(host, [(path, weight) for _, path, weight in lora_files], should_stop):
            before = self._state
            record = "loras:" + ",".join(f"{name}@{weight}" for name, _, weight in lora_files)
            self._state = before.with_transform(record)
            try:
                yield
            finally:
                self._state = before

    # -- stages ---------------------------------------------------------------------------------

    def encode_prompt(self, p: GenerationParams, size: tuple[int, int] | None = None) -> Conditioning:
        """The prompts (without LoRA tags) -> the UNet's conditioning for images of `size` (the request's unless
        given), the model family's way."""
        prompts, size = p.text_prompts(), size or (p.width, p.height)
        return self.family.encode_prompt(
            self._state, prompts, p.negative_prompt, p.num_images, p.use_guidance, p.clip_skip, size
        )

    def prepare_latents(
        self, generators: list[torch.Generator], height: int, width: int, in_latent_space: bool = False
    ) -> torch.Tensor:
        """(B, C, H/f, W/f) unit Gaussian noise, image i drawn on the CPU from its own generator."""
        f = 1 if in_latent_space else self.vae_scale_factor
        shape = (1, self.latent_channels, height // f, width // f)
        noise = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(noise).to(self.device, self.dtype)

    def encode_samples(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(B, C, h, w) scaled latents: one posterior sample of the (1, 3, H, W) image per generator."""
        posterior = self.encode_posterior(pixels)
        samples = [posterior.sample(generator=g) for g in generators]
        return self.family.to_latents(self.vae, torch.cat(samples)).to(self.dtype)

    def images_to_latents(self, images: list[Image.Image]) -> torch.Tensor:
        """(B, C, h, w) scaled latents: the posterior's mode of each image (at its own size)."""
        pixels = torch.cat([self.image_to_tensor(image, *image.size) for image in images])
        return self.family.to_latents(self.vae, self.encode_posterior(pixels).mode()).to(self.dtype)

    def encode_posterior(self, pixels: torch.Tensor):
        """The VAE's posterior of (B, 3, H, W) pixels in [-1, 1]; an fp16 encode that overflows (the SDXL VAE's
        does, as its config's force_upcast says) is redone in fp32, as the decode is."""
        posterior = self._state.encode(pixels)
        if self.vae.dtype == torch.float16 and not torch.isfinite(posterior.parameters).all():
            with self._vae_in_fp32():
                posterior = self._state.encode(pixels.float())
        return posterior

    @contextlib.contextmanager
    def _vae_in_fp32(self):
        """The VAE's weights in fp32 for one retry, then back in the pipeline's dtype."""
        self.vae.to(torch.float32)
        try:
            yield
        finally:
            self.vae.to(self.dtype)

    def prepare_inpainting(
        self, p: GenerationParams, generators: list[torch.Generator], schedule: Schedule
    ) -> tuple[torch.Tensor, KnownRegion | None, torch.Tensor | None]:
        """Start latents, and how the unmasked region is kept: a per-step hook putting it back (regular models), or
        the mask and the masked image's latents as extra input channels (inpainting models).

        Randomness is drawn as diffusers draws it, per image: the init image's posterior sample (needed to blend for
        regular models, or to start from when strength < 1), the start noise, then the masked image's sample.
        """
        pixels = self.image_to_tensor(p.init_image, p.width, p.height)
        soft_mask, binary_mask = prepare_mask(p.mask_image, p.width, p.height, p.mask_blur)  # (1, 1, H, W) each
        latent_size = (p.height // self.vae_scale_factor, p.width // self.vae_scale_factor)
        full_strength = p.strength >= 1.0
        image_latents = None
        if not self.is_inpainting_model or not full_strength:
            image_latents = self.encode_samples(pixels, generators)
        noise = self.prepare_latents(generators, p.height, p.width)
        if full_strength:
            start = noise * schedule.scheduler.init_noise_sigma
        else:
            start = schedule.add_noise(image_latents, noise)
        if self.is_inpainting_model:
            masked_latents = self.encode_samples(pixels * (binary_mask < 0.5).to(pixels.dtype), generators)
            mask = F.interpolate(binary_mask, size=latent_size).to(self.device, self.dtype)
            return start, None, torch.cat([mask.expand(len(generators), -1, -1, -1), masked_latents], dim=1)
        mask = F.interpolate(soft_mask, size=latent_size).to(self.device, self.dtype)
        return start, KnownRegion(image_latents, noise, mask.expand(len(generators), -1, -1, -1), schedule), None

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] as float32; an fp16 decode that overflows is redone in fp32."""
        latents = self.family.from_latents(self.vae, latents)
        image = self._state.decode(latents.to(self.vae.dtype))
        if self.vae.dtype == torch.float16 and not torch.isfinite(image).all():
            # The SD VAE overflows fp16 on some latents and would give a black image.
            with self._vae_in_fp32():
                image = self._state.decode(latents.float())
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def latents_to_images(self, latents: torch.Tensor) -> list[Image.Image]:
        return tensor_to_pil(self.decode_latents(latents))

    def latent_rgb_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (C, 3) weight and (3,) bias of fast previews for this VAE (fitted once, then cached)."""
        return latent_rgb_projection(self.vae, lambda z: self.family.to_latents(self.vae, z))

    @torch.inference_mode()
    def fast_preview(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) in [0, 1] through a linear map: a preview without the VAE."""
        return fast_preview(latents, self.latent_rgb_projection(), self.vae_scale_factor)

    def image_to_tensor(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """PIL -> (1, 3, H, W) in [-1, 1], resized to the generation size."""
        return pil_to_tensor(image, width, height).to(self.device, self.dtype)

    def infotext_params(self, p: GenerationParams, lora_files) -> dict:
        """The A1111 parameters beyond the basic ones, as A1111 names them."""
        params = {"Denoising strength": p.strength if p.init_image is not None else None}
        if p.mask_image is not None:
            params["Mask blur"] = p.mask_blur
        if p.hires is not None:
            params.update(p.hires.infotext_params(p.steps))
        params.update(clip_skip_infotext(p.clip_skip))
        params.update(ti_hashes_infotext(self.tokenizer, [*p.text_prompts(), p.negative_prompt], self.embeddings))
        params.update(lora_hashes_infotext([(name, path) for name, path, _ in lora_files]))
        for index, unit in enumerate(p.controls):
            params[f"ControlNet {index}"] = unit.infotext(self.controlnets.title(self.controlnets.resolve(unit.model)))
        if p.refiner is not None:
            params.update(refiner_infotext(p.refiner, p.refiner_switch))
        return params

    def infotext(self, p: GenerationParams, prompt: str, seed: int, extra: dict) -> str:
        """One image's A1111 'parameters' text; `extra` from infotext_params."""
        params = {
            "Steps": p.steps,
            "Sampler": p.sampler,
            "CFG scale": p.guidance,
            "Seed": seed,
            "Size": f"{p.width}x{p.height}",
            "Model hash": self.model_hash,
            "Model": self.model_name,
            **extra,
        }
        return format_infotext(prompt, p.negative_prompt, params)


def _place(module: torch.nn.Module | None, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
    # nn.Module.to, not diffusers' override: that one warns about fp32-pinned submodules on every
    # cast, and SD's UNet/VAE have none. None: a model without that part (the SDXL refiner's CLIP-L).
    return None if module is None else torch.nn.Module.to(module, device, dtype).eval()


class _Stop:
    """The caller's should_stop, asked at each check; a True answer (interrupt) is kept."""

    def __init__(self, should_stop: Callable[[], bool] | None):
        self.should_stop, self.requested = should_stop, False

    def __call__(self) -> bool:
        if not self.requested and self.should_stop is not None:
            self.requested = bool(self.should_stop())
        return self.requested

    def ask(self) -> None:
        """Give should_stop its chance to raise (cancel) where an interrupt changes nothing: decoding goes on."""
        if self.should_stop is not None:
            self.should_stop()


@dataclass
class _Steps:
    """Numbers a batch's steps for the callback as one run: the hires pass goes on from the base pass's count."""

    user_callback: Callable[[StepInfo], None] | None
    batch: int
    total: int
    before: int = 0  # steps of the passes already run

    @property
    def callback(self) -> Callable[[StepInfo], None] | None:
        if self.user_callback is None:
            return None  # the loop then computes no x0
        return lambda step: self.user_callback(
            dataclasses.replace(step, step=self.before + step.step, total=self.total, batch=self.batch)
        )
