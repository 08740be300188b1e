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

from ldmkit import loading, sampler_options, tiled_vae
from ldmkit.control_units import ControlUnit
from ldmkit.controlnet import ControlNetLibrary, Controls, check_controls, prepare_controls
from ldmkit.denoise import Denoiser, Sampled, Schedule, StepInfo, sample
from ldmkit.embeddings import load_embeddings, ti_hashes_infotext
from ldmkit.errors import InvalidRequest
from ldmkit.families import Conditioning, family_of, scheduler_from_config
from ldmkit.hires import upscale
from ldmkit.images import pil_to_tensor, tensor_to_pil
from ldmkit.inpaint_area import MaskedArea
from ldmkit.inpaint_fill import fill_masked
from ldmkit.inpainting import KnownRegion, inpainting_infotext, latent_start, prepare_mask
from ldmkit.loading import Components
from ldmkit.lora import applied_loras, check_lora_file, lora_hashes_infotext, resolve_lora
from ldmkit.memory import Footprint, check_memory
from ldmkit.metadata import format_infotext
from ldmkit.model_state import ModelState
from ldmkit.noise import NoiseRecipe, step_noise_generators, uses_ensd
from ldmkit.params import DEFAULT_GUIDANCE, HIRES_UPSCALERS, GenerationParams, HiresFix, RequestLimits
from ldmkit.previews import fast_preview, latent_rgb_projection
from ldmkit.prompts import MAX_PROMPT_CHUNKS, check_prompt_chunks, clip_skip_infotext
from ldmkit.refiner import DEFAULT_SWITCH, check_refiner, checkpoint_shorthash, refined_pass, refiner_infotext
from ldmkit.resize_modes import fit
from ldmkit.samplers import DEFAULT_SAMPLER, get_sampler
from ldmkit.schedules import FAMILY_KEY
from ldmkit.tiling import circular_padding
from ldmkit.upscalers import UpscalerLibrary
from ldmkit.vae import VaeLibrary, vae_infotext, vae_name


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
        vae_dir=None,
        vae=None,
        upscalers_dir=None,
    ):
        self.components = components
        self.family = family_of(components)  # what differs between SD 1.x/2.x and other families
        # the family rides along for the schedules that differ by it (Align Your Steps)
        self.scheduler_config = {**components.scheduler_config, FAMILY_KEY: self.family.name}
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
        self.vaes = VaeLibrary(vae_dir, automatic=vae)  # VAEs a request may name (GenerationParams.vae)
        self.upscalers = UpscalerLibrary(upscalers_dir, device, dtype)  # hires fix's (and the server's) upscalers
        self.embeddings = {}  # textual inversion name -> file, usable as words in prompts
        if embeddings_dir is not None:  # SDXL files hold vectors for both encoders (clip_l, clip_g)
            state = self._state
            self.embeddings = load_embeddings(
                embeddings_dir, state.tokenizer, state.text_encoder, state.tokenizer_2, state.text_encoder_2
            )

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
        vae_dir=None,
        vae=None,
        upscalers_dir=None,
    ) -> Pipeline:
        """Load a diffusers folder, a cached Hub repo id, an original single file, or (None) the default model.

        fast=True applies the measured exact GPU speed-ups of ldmkit.fast (fp16, channels_last, fused
        QKV, torch.compile with CUDA graphs); the first image of a size then includes the compile time, or,
        once an earlier process saved it (ldmkit.precompile), the time to load it.
        vae_tiling=True encodes and decodes images larger than a tile (512 px for SD) in tiles that share
        GroupNorm statistics (ldmkit.tiled_vae), so the VAE's memory stays that of one tile, without seams.
        offload=True keeps the models in CPU memory and moves each to the GPU only while it runs (ldmkit.offload).
        vae_dir holds the VAEs requests may name; `vae` is the one A1111's "Automatic" names (ldmkit.vae): a request
        runs the model's own VAE unless its GenerationParams.vae names one.
        upscalers_dir: upscaler model files (ESRGAN...) hires fix can name besides latent and Lanczos (upscalers.py).
        controlnet_dir: the ControlNets requests may name; without it, the model folder's `controlnets` subfolder
        (the shipped model carries `emoji-lines` there).
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        components = loading.load_components(source, config=config)
        if controlnet_dir is None:  # the model folder's own ControlNets, if it has any (the shipped model does)
            controlnet_dir = loading.model_controlnet_dir(source)
        pipe = cls(components, device, dtype, lora_dir, embeddings_dir, controlnet_dir, vae_dir, vae, upscalers_dir)
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
    def default_guidance(self) -> float:
        """The guidance of requests that name none: the model folder's own (its ldmkit.json), else SD's 7.5."""
        own = self.components.default_guidance
        return DEFAULT_GUIDANCE if own is None else own

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
        guidance: float | None = None,
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
        tiling: bool = False,
        resize_mode: str = "resize",
        masked_content: str = "original",
        inpaint_only_masked: bool = False,
        inpaint_padding: int = 32,
        vae: str | None = None,
        **noise_options,
    ) -> GenerationResult:
        """Images for a prompt (or a list of prompts: num_images of each); GenerationParams describes each argument.

        `refiner` (a Pipeline, or Components to place as this one's models are) finishes the denoising from
        `refiner_switch` of the schedule on (ldmkit.refiner). `noise_options` are GenerationParams' A1111 noise
        fields (subseed, subseed_strength, seed_resize_from, eta, s_churn, s_tmin, s_tmax, s_noise,
        eta_noise_seed_delta)."""
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
            tiling=tiling,
            resize_mode=resize_mode,
            masked_content=masked_content,
            inpaint_only_masked=inpaint_only_masked,
            inpaint_padding=inpaint_padding,
            vae=vae,
            **noise_options,
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
        described as what they are). SKIP (AUTOMATIC1111's skip) ends the batch being formed so, and the next batch
        goes on. To abandon the run instead (cancel, shutdown), should_stop raises.
        """
        stop = _Stop(should_stop)
        # 1. Check the request against this model, before any compute; the init image and mask as sampled.
        p = self.prepare(params)
        lora_files = self.lora_files(p)
        sampled, masked_area = self.prepare_init_image(p)
        controls = self.prepare_controls(sampled)
        # 2. LoRAs, the request's VAE and tiling (after the LoRAs, so that it reaches their convolutions too),
        # for this request only.
        formed = []
        with self.vae_applied(p.vae):
            with self.loras_applied(lora_files, stop.interrupted), self.tiling_applied(p.tiling):
                # 3-5. Each batch: prompt -> conditioning -> base pass -> hires pass.
                for batch, seeds in enumerate(p.batch_seeds()):
                    if stop.interrupted():
                        break
                    formed.append(self.sample_batch(sampled, seeds, batch, callback, stop, controls))
                    if stop.requested:
                        break
            # 6. Decode (through the tiling's padding) and describe; 'only masked' pastes into the init image.
            result = self.finish(p, lora_files, formed, stop)
        if masked_area is not None:
            result.images = [masked_area.paste(image) for image in result.images]
        for model in (self, p.refiner):  # with offload, the GPU is left empty between requests
            if model is not None:
                model.state.release()
        if controls is not None:
            result.control_maps = controls.control_maps()
        return result

    def prepare(self, params: GenerationParams, limits: RequestLimits | None = None) -> GenerationParams:
        """The request made concrete for this model (size, guidance, sampler name, seed), checked before any compute.

        `limits` adds a server's limits to GenerationParams.validate; the model's own checks follow: its family's
        (clip skip), a mask for an inpainting model, LoRA files, and the memory the request needs.
        """
        params.validate(limits)
        p = params.resolved(self.default_size, self.default_guidance)
        p.validate(limits)  # again, with the size known
        self.family.check(self._state, p)
        if p.hires is not None and p.hires.upscaler not in HIRES_UPSCALERS:  # the name as the folder spells it
            upscaled = p.hires.upscaled_size(p.width, p.height)  # before any crop: what the model must make
            info = self.upscalers.check(p.hires.upscaler, (p.width, p.height), upscaled, "hires upscaler")
            p = dataclasses.replace(p, hires=dataclasses.replace(p.hires, upscaler=info.name))
        max_chunks = MAX_PROMPT_CHUNKS if limits is None else limits.max_prompt_chunks
        passes = [p] if p.hires is None else [p, p.hires_pass()]
        for text, negative in ((t, q.negative_prompt) for q in passes for t in q.text_prompts()):
            # before any LoRA file is read or any text encoded
            check_prompt_chunks(self._state.tokenizer or self._state.tokenizer_2, text, negative, max_chunks)
        if p.tiling:
            self.check_tiling(p)
        if self.is_inpainting_model and p.mask_image is None:
            raise InvalidRequest("this is an inpainting model: give an init image and a mask")
        self.lora_files(p)
        self.check_vae(p)
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
        recipe = self.noise_recipe(p, batch)
        options = sampler_options.step_kwargs(sampler, p.eta, p.s_churn, p.s_tmin, p.s_tmax, p.s_noise)
        # 3. Prompt -> conditioning (unconditional half first, as in diffusers), in the denoiser.
        conditioning = self.encode_prompt(p)
        if stop():
            return Formed(seeds, None, interrupted=True)
        prediction_type = self.scheduler_config["prediction_type"]
        denoiser = Denoiser(
            self._state.run_unet, conditioning.context, p.guidance, prediction_type, conditioning.unet_kwargs
        )
        strength = None if p.init_image is None else p.strength
        base = Schedule.make(sampler, self.scheduler_config, p.steps, strength, options)
        second, hires_sampler, hires_options = None, None, None
        if p.hires is not None:  # the second pass's own sampler, if it has one
            hires_sampler = get_sampler(p.hires_pass().sampler)
            hires_options = sampler_options.step_kwargs(hires_sampler, p.eta, p.s_churn, p.s_tmin, p.s_tmax, p.s_noise)
            hires_steps = p.hires.pass_steps(p.steps)
            second = Schedule.make(hires_sampler, self.scheduler_config, hires_steps, p.hires.strength, hires_options)
        # The refiner finishes the last pass (the hires pass when there is one, as AUTOMATIC1111 does by default)
        # below the switch point, with that pass's sampler; ControlNets' start/end stay fractions of that whole
        # pass, as in diffusers' ControlNet pipelines with denoising_end, and guide this model's steps only.
        refined = None
        base_steps, hires_steps = len(base), len(second) if second else 0
        if p.refiner is not None:
            pass_steps, pass_strength = refined_pass(p)
            last_sampler, last_options = (hires_sampler, hires_options) if second else (sampler, options)
            refined = Schedule.make_after(
                last_sampler, p.refiner.scheduler_config, pass_steps, p.refiner_switch, pass_strength, last_options
            )
            if second is None:
                base = base.until(p.refiner_switch)
        own_hires = second.until(p.refiner_switch) if second and refined else second
        total = len(base) + (len(own_hires) if second else 0) + (len(refined) if refined else 0)
        steps = _Steps(callback, batch, total)  # one count over every pass and both models
        noise_generators = step_noise_generators(sampler, options, generators, seeds, p.eta_noise_seed_delta)
        hires_noise = noise_generators  # the same sampler goes on drawing from the base pass's generators
        if hires_sampler is not None and hires_sampler.name != sampler.name:
            hires_noise = step_noise_generators(hires_sampler, hires_options, generators, seeds, p.eta_noise_seed_delta)
        unguided = denoiser
        if controls is not None:
            denoiser = controls.guide(unguided, base_steps, (p.width, p.height))

        # 4. The base pass: txt2img from noise, img2img from the init image noised to `strength`, or inpainting.
        hook = None
        if p.mask_image is not None:
            latents, hook, extra_channels = self.prepare_inpainting(p, generators, base, recipe)
            if hook is not None and refined is not None:
                hook = dataclasses.replace(hook, handover=refined.timesteps[:1])  # re-noised to the refiner's start
            inpainting = dataclasses.replace(denoiser, extra_channels=extra_channels)
            done = sample(inpainting, base, latents, noise_generators, hook, steps.callback, stop)
        elif p.init_image is not None:
            image_latents = self.init_latents(p, generators)
            done = self.img2img(
                denoiser, base, image_latents, generators, noise_generators, steps.callback, stop, recipe
            )
        else:
            latents = self.prepare_latents(generators, p.height, p.width, recipe=recipe)
            latents = latents * base.scheduler.init_noise_sigma
            done = sample(denoiser, base, latents, noise_generators, None, steps.callback, stop)
        if (not second and not refined) or done.interrupted or stop():
            handed_over = refined is not None and second is None and not done.interrupted  # still noisy latents
            latents = done.clean if handed_over else done.latents
            return Formed(seeds, latents, done.interrupted or stop.requested, hires_done=False)
        if second is None:
            steps.before = len(base)
            finished = self.hand_over(p, refined, done.latents, noise_generators, steps.callback, stop, hook)
            if finished.latents is None:  # stopped before its first step: this model's prediction is the image
                return Formed(seeds, done.clean, interrupted=True)
            return Formed(seeds, finished.latents, finished.interrupted, refined=True)

        # 5. Hires fix: upscale, then the img2img stage again at the larger size (which size-conditioned families
        # such as SDXL are told, as AUTOMATIC1111 tells them), with the pass's own prompts; a refiner finishes it
        # below its switch point.
        size = p.hires.target_size(p.width, p.height)
        conditioning = self.encode_prompt(p.hires_pass(), size)
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
            denoiser = controls.guide(unguided, hires_steps, p.final_size, hires=True)
        noise = self.prepare_latents(generators, *upscaled.shape[-2:], in_latent_space=True)
        hires = sample(denoiser, own_hires, second.add_noise(upscaled, noise), hires_noise, None, steps.callback, stop)
        # What an interrupt leaves: this pass's last prediction, or the base pass's image if it took no step.
        formed_so_far = (hires.clean, True) if len(own_hires) else (done.latents, False)
        if hires.latents is None:  # stopped before its first step
            return Formed(seeds, done.latents, interrupted=True, hires_done=False)
        if refined is None or hires.interrupted:
            return Formed(seeds, hires.latents, hires.interrupted or stop.requested, hires_done=True)
        if stop():  # at the hand-over: the latents are still noisy
            return Formed(seeds, formed_so_far[0], interrupted=True, hires_done=formed_so_far[1])
        steps.before = len(base) + len(own_hires)
        finished = self.hand_over(p.hires_pass(), refined, hires.latents, hires_noise, steps.callback, stop, None, size)
        if finished.latents is None:
            return Formed(seeds, formed_so_far[0], interrupted=True, hires_done=formed_so_far[1])
        return Formed(seeds, finished.latents, finished.interrupted, refined=True)

    def hand_over(self, p, schedule, latents, noise_generators, callback, stop, hook, size=None) -> Sampled:
        """The refiner finishes a pass from `latents` over `schedule` (its part, conditioned on `size`); inpainting's
        known region stays kept by `hook`, on the refiner's noise levels."""
        self._state.release()  # with offload, this model's UNet leaves the GPU to the refiner
        if hook is not None:
            hook = dataclasses.replace(hook, schedule=schedule, handover=None)
        return p.refiner.refine(p, schedule, latents, noise_generators, callback, stop, size, hook)

    def refine(
        self, p: GenerationParams, schedule: Schedule, latents, noise_generators, callback, stop, size=None, hook=None
    ) -> Sampled:
        """As a refiner: go on denoising latents another model left at the start of `schedule`, with this model's
        own conditioning of the request's prompts (for images of `size`, the request's unless given); `hook` keeps
        an inpainted image's known region."""
        conditioning = self.encode_prompt(p, size)
        prediction_type = self.scheduler_config["prediction_type"]
        denoiser = Denoiser(
            self._state.run_unet, conditioning.context, p.guidance, prediction_type, conditioning.unet_kwargs
        )
        return sample(denoiser, schedule, latents.to(self.dtype), noise_generators, hook, callback, stop)

    def img2img(
        self, denoiser, schedule, clean_latents, generators, noise_generators, callback, stop, recipe=None
    ) -> Sampled:
        """Noise clean latents to the schedule's first step, then denoise them (img2img, and hires fix's 2nd pass).
        `recipe`: the base pass's variation seeds and seed resize (the hires pass's noise goes on plainly)."""
        noise = self.prepare_latents(generators, *clean_latents.shape[-2:], in_latent_space=True, recipe=recipe)
        latents = schedule.add_noise(clean_latents, noise)
        return sample(denoiser, schedule, latents, noise_generators, None, callback, stop)

    def finish(self, p: GenerationParams, lora_files, formed: list[Formed], stop: _Stop) -> GenerationResult:
        """Stage 6: decode every image formed, one at a time, and describe each as what it is."""
        result = GenerationResult(images=[], seeds=[], infotexts=[], interrupted=stop.requested)
        stop.ask()  # a cancel still leaves before the embeddings' hashes and the decodes
        extra = self.infotext_params(p, lora_files)
        prompts = [prompt for prompt in p.prompts for _ in range(p.num_images)]
        for index, batch in enumerate(formed):  # batch `index` of the request: they run in order
            if batch.latents is None:
                continue
            # An image interrupted before its hires pass (or its refiner) is the base pass's: its size and
            # parameters say so, and this model's VAE decodes it.
            described = p if batch.hires_done or p.hires is None else dataclasses.replace(p, hires=None)
            if p.refiner is not None and not batch.refined:
                described = dataclasses.replace(described, refiner=None)
            batch_extra = extra if described is p else self.infotext_params(described, lora_files)
            decoder = p.refiner if batch.refined else self
            subseeds = self.noise_recipe(p, index).subseeds or [None] * len(batch.seeds)
            for latents, prompt, seed, subseed in zip(batch.latents.split(1), prompts, batch.seeds, subseeds):
                stop.ask()
                result.images += decoder.latents_to_images(latents)
                result.seeds.append(seed)
                result.infotexts.append(self.infotext(described, prompt, seed, batch_extra, subseed))
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

    def check_vae(self, p: GenerationParams) -> Path | None:
        """The file or folder of the VAE the request names (None: the model's own)."""
        if p.vae is None:
            return None
        path = self.vaes.resolve(p.vae)
        for what, used in (("--offload", self._state.has("offload")), ("a refiner", p.refiner is not None)):
            if used:  # offload hooks the model's own VAE; a refiner decodes with its own
                raise InvalidRequest(f"a VAE other than the model's own is not supported with {what} yet")
        return path

    @contextlib.contextmanager
    def vae_applied(self, vae):
        """The request's VAE in place of the model's own, and on record in the state, while the context is open.

        It runs eager: the fast path's compiled decode is the own VAE's. Tiling, when on, tiles it too."""
        if vae is None:
            yield
            return
        path = self.vaes.resolve(vae)
        module = self.vaes.load(path, self.components.vae, self.device, self.dtype)
        before = self._state
        self._state = before.with_transform(f"vae:{vae_name(path)}", vae=module, vae_decode=None)
        try:
            yield
        finally:
            self._state = before

    def check_tiling(self, p: GenerationParams) -> None:
        """Tiling changes the layers' padding in place, which neither a compiled model nor VAE tiles would follow."""
        if self._state.has("compiled"):
            raise InvalidRequest("tiling is not supported on the fast path (compiled); load the model without --fast")
        tile_px = self._state.vae_tile_px
        if tile_px is not None and max(p.final_size) > tile_px:
            raise InvalidRequest(
                f"tiling is not supported with VAE tiling above one tile ({tile_px} px); make the image smaller"
            )

    @contextlib.contextmanager
    def tiling_applied(self, tiling: bool):
        """Circular padding in the UNet and the VAE decoder (ldmkit.tiling), on record in the state, while open."""
        if not tiling:
            yield
            return
        with circular_padding(self.unet, self.vae.decoder):
            before = self._state
            self._state = before.with_transform("tiling")
            try:
                yield
            finally:
                self._state = before

    def prepare_init_image(self, p: GenerationParams) -> tuple[GenerationParams, MaskedArea | None]:
        """The request as sampling reads its init image and mask: around the mask for 'only masked' (with the
        area to paste the results back into), fitted by the resize mode, the masked part filled unless 'original'.
        """
        if p.init_image is None:
            return p, None
        init_image, mask_image, mask_blur, area = p.init_image, p.mask_image, p.mask_blur, None
        if p.inpaint_only_masked:
            area = MaskedArea.around(init_image, mask_image, mask_blur, p.inpaint_padding, p.width, p.height)
            (init_image, mask_image), mask_blur = area.crops(p.width, p.height), 0  # the crop's mask is blurred
        elif p.resize_mode in ("crop", "fill"):
            init_image = fit(init_image.convert("RGB"), p.width, p.height, p.resize_mode)
            mask_image = None if mask_image is None else fit(mask_image.convert("L"), p.width, p.height, p.resize_mode)
        if mask_image is not None and p.masked_content != "original":
            # A1111 fills the pixels for every masked content but 'original'; the latent ones then replace them.
            init_image = fill_masked(init_image, mask_image.resize(init_image.size, Image.Resampling.NEAREST))
        sampled = dataclasses.replace(p, init_image=init_image, mask_image=mask_image, mask_blur=mask_blur)
        return sampled, area

    # -- stages ---------------------------------------------------------------------------------

    def encode_prompt(self, p: GenerationParams, size: tuple[int, int] | None = None) -> Conditioning:
        """The prompts (without LoRA tags) -> the UNet's conditioning for images of `size` (the request's unless
        given), the model family's way."""
        prompts, size = p.text_prompts(), size or (p.width, p.height)
        return self.family.encode_prompt(
            self._state, prompts, p.negative_prompt, p.num_images, p.use_guidance, p.clip_skip, size
        )

    def prepare_latents(
        self,
        generators: list[torch.Generator],
        height: int,
        width: int,
        in_latent_space: bool = False,
        recipe: NoiseRecipe | None = None,
    ) -> torch.Tensor:
        """(B, C, H/f, W/f) unit Gaussian noise, image i drawn on the CPU from its own generator; `recipe` adds
        A1111's variation seeds and seed resize (ldmkit.noise)."""
        f = 1 if in_latent_space else self.vae_scale_factor
        shape = (self.latent_channels, height // f, width // f)
        if recipe is not None and not recipe.is_plain:
            noise = recipe.draw(generators, shape).to(self.device)
        else:
            noise = torch.stack(
                [torch.randn(shape, generator=g, dtype=torch.float32).to(self.device) for g in generators]
            )
        # Stacked and cast on the device: the same values, and on a GPU it spares the CPU's copies (a profiled H200
        # run spent 3 ms joining and 8 ms casting SDXL's (1, 4, 128, 128) noise on the CPU: more than all the
        # text encoders' kernels).
        return noise.to(self.dtype)

    def noise_recipe(self, p: GenerationParams, batch: int) -> NoiseRecipe:
        """Batch `batch`'s variation seeds and the latent size its noise is resized from."""
        subseeds = p.image_subseeds()[batch * p.batch_size : (batch + 1) * p.batch_size] if p.uses_variation else ()
        resize_from = None
        if p.seed_resize_from is not None:
            width, height = p.seed_resize_from
            resize_from = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        return NoiseRecipe(tuple(subseeds), p.subseed_strength, resize_from)

    def init_latents(self, p: GenerationParams, generators: list[torch.Generator]) -> torch.Tensor:
        """img2img's clean latents of the init image: one posterior sample per image, at the size; resize mode
        'latent' encodes the image at its own size (rounded down to multiples of 8) and resizes the latents."""
        if p.resize_mode != "latent":
            return self.encode_samples(self.image_to_tensor(p.init_image, p.width, p.height), generators)
        own_w, own_h = (max(8, side // 8 * 8) for side in p.init_image.size)
        latents = self.encode_samples(self.image_to_tensor(p.init_image, own_w, own_h), generators)
        size = (p.height // self.vae_scale_factor, p.width // self.vae_scale_factor)
        return F.interpolate(latents, size=size, mode="bilinear", align_corners=False)

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
        self, p: GenerationParams, generators: list[torch.Generator], schedule: Schedule, recipe: NoiseRecipe
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
        noise = self.prepare_latents(generators, p.height, p.width, recipe=recipe)
        if full_strength:
            start = noise * schedule.scheduler.init_noise_sigma
        else:
            hole = F.interpolate(soft_mask, size=latent_size).round().to(self.device, self.dtype)  # A1111's rounding
            start = schedule.add_noise(latent_start(image_latents, noise, hole, p.masked_content), noise)
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
        # Fitted to the model's own VAE: another VAE of the model shares its latent space, and a preview thread
        # must not fit (run) the VAE a request has in place.
        own_vae = self.components.vae
        return latent_rgb_projection(own_vae, lambda z: self.family.to_latents(own_vae, z))

    @torch.inference_mode()
    def fast_preview(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents -> (B, 3, H, W) in [0, 1] through a linear map: a preview without the VAE."""
        return fast_preview(latents, self.latent_rgb_projection(), self.vae_scale_factor)

    def image_to_tensor(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """PIL -> (1, 3, H, W) in [-1, 1], resized to the generation size."""
        return pil_to_tensor(image, width, height).to(self.device, self.dtype)

    def infotext_params(self, p: GenerationParams, lora_files) -> dict:
        """The A1111 parameters beyond the basic ones, as A1111 names them."""
        params = vae_infotext(self.check_vae(p))
        params["Denoising strength"] = p.strength if p.init_image is not None else None
        if p.mask_image is not None:
            params["Mask blur"] = p.mask_blur
            params.update(inpainting_infotext(p.masked_content, p.inpaint_only_masked, p.inpaint_padding))
        if p.hires is not None:
            params.update(p.hires.infotext_params(p.steps, p.sampler))
        params["Tiling"] = True if p.tiling else None
        params.update(clip_skip_infotext(p.clip_skip))
        tokenizer = self.tokenizer or self._state.tokenizer_2  # the SDXL refiner has bigG's alone
        params.update(ti_hashes_infotext(tokenizer, [*p.text_prompts(), p.negative_prompt], self.embeddings))
        params.update(lora_hashes_infotext([(name, path) for name, path, _ in lora_files]))
        for index, unit in enumerate(p.controls):
            params[f"ControlNet {index}"] = unit.infotext(self.controlnets.title(self.controlnets.resolve(unit.model)))
        if p.refiner is not None:
            params.update(refiner_infotext(p.refiner, p.refiner_switch))
        sampler = get_sampler(p.sampler)
        params.update(sampler_options.infotext_params(sampler, p.eta, p.s_churn, p.s_tmin, p.s_tmax, p.s_noise))
        options = sampler_options.step_kwargs(sampler, p.eta, p.s_churn, p.s_tmin, p.s_tmax, p.s_noise)
        if uses_ensd(sampler, options, p.eta, p.eta_noise_seed_delta):
            params["ENSD"] = p.eta_noise_seed_delta
        return params

    def infotext(self, p: GenerationParams, prompt: str, seed: int, extra: dict, subseed: int | None = None) -> str:
        """One image's A1111 'parameters' text; `extra` from infotext_params; `subseed`: its variation seed."""
        resize_from = p.seed_resize_from
        params = {
            "Steps": p.steps,
            "Sampler": p.sampler,
            "CFG scale": p.guidance,
            "Seed": seed,
            "Size": f"{p.width}x{p.height}",
            "Model hash": self.model_hash,
            "Model": self.model_name,
            "Variation seed": subseed if p.uses_variation else None,
            "Variation seed strength": p.subseed_strength if p.uses_variation else None,
            "Seed resize from": None if resize_from is None else f"{resize_from[0]}x{resize_from[1]}",
            **extra,
        }
        if p.hires is not None:  # A1111 writes the second pass's prompts where they differ from the image's
            prompt_2, negative_2 = p.hires.prompt, p.hires.negative_prompt
            params["Hires prompt"] = prompt_2 if prompt_2 and prompt_2 != prompt else None
            params["Hires negative prompt"] = negative_2 if negative_2 and negative_2 != p.negative_prompt else None
        return format_infotext(prompt, p.negative_prompt, params)


def _place(module: torch.nn.Module | None, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
    # nn.Module.to, not diffusers' override: that one warns about fp32-pinned submodules on every
    # cast, and SD's UNet/VAE have none. None: a model without that part (the SDXL refiner's CLIP-L).
    return None if module is None else torch.nn.Module.to(module, device, dtype).eval()


SKIP = "skip"  # should_stop's answer that ends the batch being formed only (AUTOMATIC1111's skip)


class _Stop:
    """The caller's should_stop, asked at each check; a True answer (interrupt) is kept for the run, a SKIP for the
    batch being formed."""

    def __init__(self, should_stop: Callable[[], bool | str] | None):
        self.should_stop, self.requested, self.skipping = should_stop, False, False

    def __call__(self) -> bool:
        if not (self.requested or self.skipping) and self.should_stop is not None:
            answer = self.should_stop()
            if answer == SKIP:
                self.skipping = True
            else:
                self.requested = bool(answer)
        return self.requested or self.skipping

    def interrupted(self) -> bool:
        """Asked where no batch is being formed (before a batch, between LoRA files): whether the run is
        interrupted. A skip asked for then is dropped, as A1111 drops it (it skips the batch being formed)."""
        self.skipping = False
        self()
        self.skipping = False
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
