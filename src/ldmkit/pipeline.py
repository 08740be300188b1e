"""The latent diffusion workflow: prompt -> CLIP embeddings -> denoised latents -> VAE decode -> images.

`Pipeline.generate` reads as numbered stages, each one named method, like a diffusers pipeline's
`__call__`; the components (UNet, VAE, CLIP, schedulers) are diffusers' and transformers' own.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit import loading
from ldmkit.embeddings import load_embeddings, ti_hashes_infotext
from ldmkit.errors import InvalidRequest
from ldmkit.hires import HiresFix
from ldmkit.inpainting import Inpainting, check_inpainting, prepare_mask
from ldmkit.loading import Components
from ldmkit.lora import applied_loras, extract_lora_tags, lora_hashes_infotext, resolve_lora
from ldmkit.memory import check_memory
from ldmkit.metadata import format_infotext
from ldmkit.prompts import check_clip_skip, clip_skip_infotext, encode_prompts
from ldmkit.samplers import DEFAULT_SAMPLER, Sampler, get_sampler

MAX_SEED = 2**32 - 1  # AUTOMATIC1111's seed range, so infotexts round-trip between tools
MAX_STEPS = 1000
MAX_IMAGES = 64
MAX_SIDE = 8192
MAX_GUIDANCE = 100.0  # far past any useful scale; larger ones overflow the guided prediction into NaN


@dataclass
class StepInfo:
    """What a callback sees after each denoising step (k-diffusion's callback dict, typed)."""

    step: int  # 0-based index of the step just taken
    total: int  # number of steps in this run
    timestep: float  # the UNet's timestep for this step
    sigma: float  # noise level of the step's input, sqrt((1 - alpha_bar) / alpha_bar)
    latents: torch.Tensor  # (B, C, h, w) latents after the step
    denoised: torch.Tensor  # (B, C, h, w) predicted clean latents (x0) at this step


@dataclass
class GenerationResult:
    images: list[Image.Image]
    seeds: list[int]  # image i used seeds[i] == seed + i
    infotexts: list[str]  # AUTOMATIC1111-style 'parameters' text, one per image


@dataclass
class Request:
    """One validated generation request, as the sampling stages need it."""

    prompt: str  # without <lora:...> tags
    negative_prompt: str
    steps: int
    guidance: float
    sampler: Sampler
    width: int
    height: int
    init_image: Image.Image | None
    strength: float
    mask_image: Image.Image | None
    mask_blur: int
    hires: HiresFix | None
    clip_skip: int

    @property
    def use_guidance(self) -> bool:
        return self.guidance > 1.0

    @property
    def final_size(self) -> tuple[int, int]:
        return self.hires.target_size(self.width, self.height) if self.hires else (self.width, self.height)

    def infotext_params(self) -> dict:
        """The A1111 parameters beyond the basic ones, as A1111 names them."""
        params = {"Denoising strength": self.strength if self.init_image is not None else None}
        if self.mask_image is not None:
            params["Mask blur"] = self.mask_blur
        if self.hires is not None:
            params.update(self.hires.infotext_params(self.steps))
        params.update(clip_skip_infotext(self.clip_skip))
        return params


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
        self, components: Components, device: torch.device, dtype: torch.dtype, lora_dir=None, embeddings_dir=None
    ):
        self.components = components
        self.device = device
        self.dtype = dtype
        self.tokenizer = components.tokenizer
        self.text_encoder = _place(components.text_encoder, device, dtype)
        self.unet = _place(components.unet, device, dtype)
        self.vae = _place(components.vae, device, dtype)
        self.scheduler_config = components.scheduler_config
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = self.vae.config.latent_channels
        # SD inpainting UNets also take the mask and the masked image's latents: 4 + 1 + 4 channels.
        self.is_inpainting_model = self.unet.config.in_channels == 2 * self.latent_channels + 1
        self.lora_dir = lora_dir  # where <lora:NAME:W> prompt tags are looked up
        self.embeddings = {}  # textual inversion name -> file, usable as words in prompts
        if embeddings_dir is not None:
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
        lora_dir=None,
        embeddings_dir=None,
    ) -> Pipeline:
        """Load a diffusers folder, a cached Hub repo id, an original single file, or (None) the default model.

        fast=True applies the measured exact GPU speed-ups of ldmkit.fast (fp16, channels_last, fused
        QKV, torch.compile with CUDA graphs); the first image of a size then includes the compile time, or,
        once an earlier process saved it (ldmkit.precompile), the time to load it.
        vae_tiling=True encodes and decodes images larger than a tile (512 px for SD) in tiles that share
        GroupNorm statistics (ldmkit.tiled_vae), so the VAE's memory stays that of one tile, without seams.
        """
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        pipe = cls(loading.load_components(source, config=config), device, dtype, lora_dir, embeddings_dir)
        if vae_tiling:
            from ldmkit import tiled_vae

            tiled_vae.enable(pipe.vae)
        if fast:
            from ldmkit.fast import make_fast

            make_fast(pipe)
        return pipe

    @property
    def source(self) -> str:
        return self.components.source

    @property
    def model_name(self) -> str:
        return self.components.name

    @property
    def default_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int = 25,
        guidance: float = 7.5,
        sampler: str = DEFAULT_SAMPLER,
        seed: int | None = None,
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
    ) -> GenerationResult:
        # 1. Validate everything before spending compute.
        sampler_ = check_inputs(
            prompt, negative_prompt, steps, guidance, sampler, seed, num_images, init_image, strength
        )
        check_clip_skip(clip_skip, self.text_encoder)
        check_inpainting(mask_image, mask_blur, init_image)
        if self.is_inpainting_model and mask_image is None:
            raise InvalidRequest("this is an inpainting model: give an init image and a mask")
        text_prompt, lora_files = self.resolve_loras(prompt, loras or [])
        width, height = self.resolve_size(width, height, init_image)
        if hires is not None:
            if init_image is not None:
                raise InvalidRequest("hires fix is for text-to-image; with an init image, set the size directly")
            hires.check(steps, width, height)
        request = Request(
            text_prompt,
            negative_prompt,
            steps,
            guidance,
            sampler_,
            width,
            height,
            init_image,
            strength,
            mask_image,
            mask_blur,
            hires,
            clip_skip,
        )
        check_memory(self, *request.final_size, num_images, request.use_guidance)
        seed = random.randrange(MAX_SEED + 1 - num_images) if seed is None else seed
        seeds = [seed + i for i in range(num_images)]
        # Image i owns a CPU generator seeded seed + i: the same seed gives the same image on any
        # device and in any batch; it also feeds the VAE posterior samples and ancestral noise.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]

        # 2-5. Prompt -> embeddings -> latents, with any LoRAs applied only for this request.
        with applied_loras(self, [(path, weight) for _, path, weight in lora_files]):
            latents = self.sample(request, generators, callback)

        # 6. Decode, post-process, describe.
        images = self.latents_to_images(latents)
        params = request.infotext_params()
        params.update(ti_hashes_infotext(self.tokenizer, [text_prompt, negative_prompt], self.embeddings))
        params.update(lora_hashes_infotext([(name, path) for name, path, _ in lora_files]))
        infotexts = [
            self.infotext(prompt, negative_prompt, steps, guidance, sampler_.name, s, width, height, params)
            for s in seeds
        ]
        return GenerationResult(images=images, seeds=seeds, infotexts=infotexts)

    def sample(self, request: Request, generators: list[torch.Generator], callback) -> torch.Tensor:
        """Stages 2-5: from the prompt to the final latents."""
        r = request
        # 2. Prompt -> CLIP hidden states, unconditional (negative) first as in diffusers.
        text_embeddings = self.encode_prompt(r.prompt, r.negative_prompt, len(generators), r.use_guidance, r.clip_skip)

        # 3. Timesteps: img2img starts part-way, at the noise level `strength` asks for.
        scheduler = r.sampler.make_scheduler(self.scheduler_config)
        # Schedulers do their per-step arithmetic on host scalars: timesteps on the CPU keep every
        # step free of GPU->host syncs (only the UNet gets a device copy, in denoise).
        scheduler.set_timesteps(r.steps, device="cpu")
        timesteps = scheduler.timesteps
        if r.init_image is not None:
            timesteps = self.img2img_timesteps(scheduler, r.steps, r.strength)

        # 4. Starting latents: noise (txt2img) or the encoded init image noised to `strength`.
        inpainting = None
        if r.mask_image is not None:
            inpainting = self.prepare_inpainting(
                r.init_image, r.mask_image, r.mask_blur, r.width, r.height, generators, scheduler, timesteps, r.strength
            )
            latents = inpainting.start_latents
        elif r.init_image is None:
            latents = self.prepare_latents(generators, r.height, r.width) * scheduler.init_noise_sigma
        else:
            latents = self.prepare_img2img_latents(
                r.init_image, r.width, r.height, generators, scheduler, timesteps[:1]
            )

        # 5. Denoising loop with classifier-free guidance.
        noise_generators = generators if r.sampler.stochastic else None
        latents = self.denoise(
            latents,
            text_embeddings,
            scheduler,
            timesteps,
            r.guidance,
            r.use_guidance,
            noise_generators,
            callback,
            inpainting,
        )

        # 5b. Hires fix: upscale, then an img2img pass at the larger size.
        if r.hires is not None:
            latents = r.hires.upscale(self, latents)
            scheduler = r.sampler.make_scheduler(self.scheduler_config)
            hires_steps = r.hires.steps or r.steps
            scheduler.set_timesteps(hires_steps, device="cpu")
            timesteps = self.img2img_timesteps(scheduler, hires_steps, r.hires.strength)
            noise = self.prepare_latents(generators, *latents.shape[-2:], in_latent_space=True)
            latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(len(generators)))
            latents = self.denoise(
                latents, text_embeddings, scheduler, timesteps, r.guidance, r.use_guidance, noise_generators, callback
            )
        return latents

    def resolve_loras(self, prompt: str, loras: list[tuple[str, float]]) -> tuple[str, list[tuple[str, Path, float]]]:
        """The prompt without <lora:...> tags, and (name, file, weight) for its tags and the `loras` argument."""
        text_prompt, tags = extract_lora_tags(prompt)
        if tags and self.lora_dir is None:
            raise InvalidRequest("the prompt has <lora:...> tags but no LoRA folder is set (--lora-dir)")
        files = [(name, resolve_lora(name, self.lora_dir), weight) for name, weight in tags]
        for path, weight in loras:
            path = Path(path)
            if not path.is_file():
                raise InvalidRequest(f"LoRA file not found: {path}")
            files.append((path.stem, path, weight))
        if files and getattr(self.unet, "original_attn_processors", None) is not None:
            # fast.make_fast fused q/k/v into one projection, which a LoRA's q/k/v layers would bypass.
            raise InvalidRequest("LoRAs are not supported on the fast path (fused QKV); load the model without --fast")
        for name, _, weight in files:
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise InvalidRequest(f"LoRA {name!r} weight must be a finite number, got {weight!r}")
        return text_prompt, files

    # -- stages ---------------------------------------------------------------------------------

    def resolve_size(self, width, height, init_image) -> tuple[int, int]:
        """Missing sides come from the init image, else the model's native size; all multiples of 8."""
        fallback_w, fallback_h = init_image.size if init_image is not None else (self.default_size,) * 2
        width = fallback_w // 8 * 8 if width is None else width
        height = fallback_h // 8 * 8 if height is None else height
        check_size(width, height)
        return width, height

    def encode_prompt(
        self, prompt: str, negative_prompt: str, num_images: int, use_guidance: bool, clip_skip: int = 1
    ) -> torch.Tensor:
        """(B or 2B, 77k, D) CLIP hidden states; with guidance the unconditional half comes first.

        A1111 prompt syntax: (emphasis:1.2), [de-emphasis], BREAK, and 75-token chunks for long prompts.
        """
        texts = [negative_prompt, prompt] if use_guidance else [prompt]
        hidden = encode_prompts(self.tokenizer, self.text_encoder, texts, clip_skip)  # (len(texts), 77k, D)
        return hidden.repeat_interleave(num_images, dim=0)

    def prepare_latents(
        self, generators: list[torch.Generator], height: int, width: int, in_latent_space: bool = False
    ) -> torch.Tensor:
        """(B, C, H/f, W/f) unit Gaussian noise, image i drawn on the CPU from its own generator."""
        f = 1 if in_latent_space else self.vae_scale_factor
        shape = (1, self.latent_channels, height // f, width // f)
        noise = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
        return torch.cat(noise).to(self.device, self.dtype)

    @staticmethod
    def img2img_timesteps(scheduler, steps: int, strength: float) -> torch.Tensor:
        """The tail of the schedule that starts at noise level `strength` (diffusers' get_timesteps)."""
        t_start = steps - min(int(steps * strength), steps)
        if hasattr(scheduler, "set_begin_index"):  # index-tracking schedulers; DDIM and PLMS have none
            scheduler.set_begin_index(t_start * scheduler.order)
        return scheduler.timesteps[t_start * scheduler.order :]

    def prepare_img2img_latents(self, init_image, width, height, generators, scheduler, first_timestep) -> torch.Tensor:
        """Encode the init image, sample its posterior, and noise it to the first timestep."""
        pixels = self.image_to_tensor(init_image, width, height)  # (1, 3, H, W) in [-1, 1]
        latents = self.encode_samples(pixels, generators)  # per image: posterior sample, then noise
        noise = self.prepare_latents(generators, height, width)
        return scheduler.add_noise(latents, noise, first_timestep.repeat(len(generators)))

    def encode_samples(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """(B, C, h, w) scaled latents: one posterior sample of the (1, 3, H, W) image per generator."""
        posterior = self.vae.encode(pixels).latent_dist
        samples = [posterior.sample(generator=g) for g in generators]
        return torch.cat(samples) * self.vae.config.scaling_factor

    def prepare_inpainting(
        self, init_image, mask_image, mask_blur, width, height, generators, scheduler, timesteps, strength
    ) -> Inpainting:
        """Latents, mask and known-region latents for inpainting, drawing randomness as diffusers does.

        Per image: the init image's posterior sample (needed to blend for regular models, or to start
        from when strength < 1), then the start noise, then (9-channel models) the masked image's sample.
        """
        pixels = self.image_to_tensor(init_image, width, height)
        soft_mask, binary_mask = prepare_mask(mask_image, width, height, mask_blur)  # (1, 1, H, W) each
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        full_strength = strength >= 1.0
        image_latents = None
        if not self.is_inpainting_model or not full_strength:
            image_latents = self.encode_samples(pixels, generators)
        noise = self.prepare_latents(generators, height, width)
        if full_strength:
            start = noise * scheduler.init_noise_sigma
        else:
            start = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(len(generators)))
        if self.is_inpainting_model:
            masked_latents = self.encode_samples(pixels * (binary_mask < 0.5).to(pixels.dtype), generators)
            mask = F.interpolate(binary_mask, size=latent_size).to(self.device, self.dtype)
            return Inpainting(start, noise, image_latents, mask.expand(len(generators), -1, -1, -1), masked_latents)
        mask = F.interpolate(soft_mask, size=latent_size).to(self.device, self.dtype)
        return Inpainting(start, noise, image_latents, mask.expand(len(generators), -1, -1, -1), None)

    def denoise(
        self,
        latents,
        text_embeddings,
        scheduler,
        timesteps,
        guidance,
        use_guidance,
        generators,
        callback,
        inpainting=None,
    ):
        """Run the sampler; each step is one batched UNet call over [uncond, cond]."""
        step_kwargs = {"generator": generators} if generators is not None else {}
        alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32)  # on the host, like the timesteps
        unet_timesteps = timesteps.to(self.device)  # one copy, not one blocking copy per step
        copies = 2 if use_guidance else 1
        for i, t in enumerate(timesteps):
            scaled_input = scheduler.scale_model_input(torch.cat([latents] * copies), t)
            unet_input = scaled_input
            if inpainting is not None and inpainting.masked_latents is not None:  # 9-channel UNet
                conditioning = torch.cat([inpainting.mask, inpainting.masked_latents], dim=1)
                unet_input = torch.cat([scaled_input, torch.cat([conditioning] * copies)], dim=1)
            model_output = self.unet(
                unet_input, unet_timesteps[i], encoder_hidden_states=text_embeddings, return_dict=False
            )[0]
            if use_guidance:
                uncond, cond = model_output.chunk(2)
                model_output = uncond + guidance * (cond - uncond)
            if callback is not None:
                x0, sigma = self.predict_x0(scaled_input[: len(latents)], model_output, t, alphas_cumprod)
            latents = scheduler.step(model_output, t, latents, **step_kwargs, return_dict=False)[0]
            if inpainting is not None and inpainting.masked_latents is None:
                latents = inpainting.keep_known_region(latents, scheduler, timesteps, i)
            if callback is not None:
                callback(StepInfo(i, len(timesteps), float(t), sigma, latents, x0))
        return latents

    def predict_x0(self, scaled_input, model_output, t, alphas_cumprod) -> tuple[torch.Tensor, float]:
        """Predicted clean latents from the UNet output at timestep t (variance-preserving form).

        Every scheduler's `scale_model_input` yields x_t = sqrt(a) x0 + sqrt(1 - a) eps with a the
        cumulative alpha at t (interpolated for fractional Karras timesteps), so one formula fits all.
        """
        last = len(alphas_cumprod) - 1
        t = min(float(t), last)  # "leading" spacing with steps_offset can yield t == num_train_timesteps
        lo = int(math.floor(t))
        hi = min(lo + 1, last)
        alpha_bar = torch.lerp(alphas_cumprod[lo], alphas_cumprod[hi], t - lo)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        x_t, out = scaled_input.float(), model_output.float()
        prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        if prediction_type == "epsilon":
            x0 = (x_t - s * out) / a
        elif prediction_type == "v_prediction":
            x0 = a * x_t - s * out
        else:  # "sample"
            x0 = out
        return x0.to(self.dtype), float(s / a)

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] as float32; an fp16 decode that overflows is redone in fp32."""
        latents = latents / self.vae.config.scaling_factor
        image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        if self.vae.dtype == torch.float16 and not torch.isfinite(image).all():
            # The SD VAE overflows fp16 on some latents and would give a black image.
            self.vae.to(torch.float32)
            try:
                image = self.vae.decode(latents.float(), return_dict=False)[0]
            finally:
                self.vae.to(self.dtype)
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def latents_to_images(self, latents: torch.Tensor) -> list[Image.Image]:
        return tensor_to_pil(self.decode_latents(latents))

    def image_to_tensor(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """PIL -> (1, 3, H, W) in [-1, 1], resized to the generation size."""
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.float32) / 255.0
        tensor = torch.from_numpy(array).permute(2, 0, 1)[None]
        return (tensor * 2 - 1).to(self.device, self.dtype)

    def infotext(self, prompt, negative_prompt, steps, guidance, sampler, seed, width, height, extra: dict) -> str:
        params = {
            "Steps": steps,
            "Sampler": sampler,
            "CFG scale": guidance,
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model": self.model_name,
            **extra,
        }
        return format_infotext(prompt, negative_prompt, params)


def check_inputs(prompt, negative_prompt, steps, guidance, sampler, seed, num_images, init_image, strength) -> Sampler:
    """Validate generation parameters (all but the size) before any compute; returns the sampler."""
    for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
        if not isinstance(text, str):
            raise InvalidRequest(f"{name} must be text, not {type(text).__name__}")
        if not text.isascii() and _has_lone_surrogate(text):
            raise InvalidRequest(f"{name} is not valid Unicode (it has a lone surrogate code point)")
    if not _is_int(steps) or not 1 <= steps <= MAX_STEPS:
        raise InvalidRequest(f"steps must be an integer from 1 to {MAX_STEPS}, got {steps!r}")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise InvalidRequest(f"guidance must be a finite number from 0 to {MAX_GUIDANCE}, got {guidance!r}")
    if not _is_int(num_images) or not 1 <= num_images <= MAX_IMAGES:
        raise InvalidRequest(f"number of images must be from 1 to {MAX_IMAGES}, got {num_images!r}")
    if seed is not None and (not _is_int(seed) or not 0 <= seed <= MAX_SEED + 1 - num_images):
        raise InvalidRequest(f"seed must be an integer from 0 to {MAX_SEED + 1 - num_images}, got {seed!r}")
    if init_image is not None:
        if not isinstance(init_image, Image.Image):
            raise InvalidRequest(f"init image must be a PIL image, not {type(init_image).__name__}")
        if not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
            raise InvalidRequest(f"strength must be between 0 and 1, got {strength!r}")
        if int(steps * strength) < 1:
            raise InvalidRequest(f"strength {strength} with {steps} steps leaves no denoising step; raise either")
    return get_sampler(sampler)


def check_size(width, height) -> None:
    for name, side in (("width", width), ("height", height)):
        if not _is_int(side) or side < 8 or side % 8 or side > MAX_SIDE:
            raise InvalidRequest(f"{name} must be a multiple of 8 from 8 to {MAX_SIDE}, got {side!r}")


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) floats in [0, 1] -> 8-bit RGB PIL images."""
    array = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in array]


def _place(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # nn.Module.to, not diffusers' override: that one warns about fp32-pinned submodules on every
    # cast, and SD's UNet/VAE have none.
    return torch.nn.Module.to(module, device, dtype).eval()


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
