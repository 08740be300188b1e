"""One generation request as data: what every front end (CLI, HTTP APIs, web UI, Python) builds and `Pipeline.run` runs.

Torch-free and model-free, so a request is checked before a model loads (the CLI) or before it takes a place in
the server's queue. `GenerationParams.validate(limits)` is the one place the request's values are checked; what
depends on the loaded model (the default size and guidance, clip skip's range, LoRA files, memory) `Pipeline.prepare`
adds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from ldmkit.control_units import check_units
from ldmkit.errors import InvalidRequest
from ldmkit.lora import prompt_loras

MAX_SEED = 2**32 - 1  # AUTOMATIC1111's seed range, so infotexts round-trip between tools
MAX_STEPS = 1000
MAX_IMAGES = 64  # images in one batch (one UNet call per step holds them all)
MAX_SIDE = 8192
MAX_GUIDANCE = 100.0  # far past any useful scale; larger ones overflow the guided prediction into NaN
DEFAULT_GUIDANCE = 7.5  # SD's usual scale: a model's unless its folder names its own (ldmkit.model_defaults)
MAX_MASK_BLUR = 64
MAX_HIRES_SCALE = 4.0
HIRES_UPSCALERS = ("latent", "pixel")  # built in; any other name is one of the pipeline's upscalers (ldmkit.upscalers)
# img2img: how the init image is fitted to the size (A1111's resize_mode 0-3; ldmkit.resize_modes)
RESIZE_MODES = ("resize", "crop", "fill", "latent")
# inpainting: what the masked area starts from (A1111's inpainting_fill 0-3, its "Masked content")
MASKED_CONTENTS = ("fill", "original", "latent_noise", "latent_nothing")


@dataclass(frozen=True)
class HiresFix:
    """AUTOMATIC1111's hires fix: generate at the base size, upscale, then repaint details with an img2img pass."""

    scale: float = 2.0
    strength: float = 0.5  # denoising strength of the second pass
    steps: int | None = None  # second-pass steps; None = the first pass's
    upscaler: str = "latent"  # "latent": bilinear on latents; "pixel": decode, Lanczos, encode; else an upscaler's name
    # The second pass's own prompt, negative prompt and sampler (a name of ldmkit.samplers); empty/None: the
    # first pass's, as A1111's hr_prompt, hr_negative_prompt and hr_sampler_name.
    prompt: str = ""
    negative_prompt: str = ""
    sampler: str | None = None
    # (width, height) the upscaled image is cut to, around its centre, before the second pass: A1111's hr_resize_x/y
    # of another aspect ratio than the base size (it upscales to cover the target, then cuts); None: no cut
    crop_to: tuple[int, int] | None = None

    def check(self, steps: int, width: int | None = None, height: int | None = None) -> None:
        """The pass's own values; with the base size known, also the upscaled size."""
        # 1: a second pass at the same size, as A1111 runs it; below 1 a smaller one (A1111's hr_resize allows it)
        if not _is_number(self.scale) or not 0.0 < self.scale <= MAX_HIRES_SCALE:
            raise InvalidRequest(f"hires scale must be above 0 and at most {MAX_HIRES_SCALE}, got {self.scale!r}")
        if not _is_number(self.strength) or not 0.0 < self.strength <= 1.0:
            raise InvalidRequest(f"hires strength must be in (0, 1], got {self.strength!r}")
        hires_steps = self.pass_steps(steps)
        if not is_int(hires_steps) or not 1 <= hires_steps <= MAX_STEPS or int(hires_steps * self.strength) < 1:
            raise InvalidRequest(f"hires steps {hires_steps!r} at strength {self.strength} leave no denoising step")
        if not isinstance(self.upscaler, str) or not self.upscaler:  # a name other than these: Pipeline.prepare's
            raise InvalidRequest(f"hires upscaler must be {' or '.join(HIRES_UPSCALERS)} or an upscaler's name")
        if self.sampler is not None:
            from ldmkit.samplers import get_sampler  # the registry imports diffusers

            get_sampler(self.sampler)
        if self.crop_to is not None and not (
            isinstance(self.crop_to, tuple) and len(self.crop_to) == 2 and all(is_int(side) for side in self.crop_to)
        ):
            raise InvalidRequest(f"hires crop must be (width, height) in pixels, got {self.crop_to!r}")
        if width is not None and height is not None:
            check_size(*self.target_size(width, height))
            if self.crop_to is not None:
                self._check_crop(*self.upscaled_size(width, height))

    def _check_crop(self, upscaled_width: int, upscaled_height: int) -> None:
        crop_width, crop_height = self.crop_to
        if (
            crop_width % 8
            or crop_height % 8
            or not (0 < crop_width <= upscaled_width and 0 < crop_height <= upscaled_height)
        ):
            raise InvalidRequest(
                f"hires crop {crop_width}x{crop_height} must be multiples of 8 within the upscaled "
                f"{upscaled_width}x{upscaled_height}"
            )

    def pass_steps(self, base_steps: int) -> int:
        return self.steps or base_steps

    def upscaled_size(self, width: int, height: int) -> tuple[int, int]:
        """The size the first pass is upscaled to, rounded down to multiples of 8."""
        return int(width * self.scale) // 8 * 8, int(height * self.scale) // 8 * 8

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """The second pass's size: the upscaled size, or what the crop cuts from it."""
        return self.crop_to if self.crop_to is not None else self.upscaled_size(width, height)

    def infotext_params(self, base_steps: int, base_sampler: str | None = None) -> dict:
        """A1111's names; a second-pass sampler that differs is written as its sampler and schedule type (A1111's
        "Hires sampler" and "Hires schedule type"), both, so that neither is read from the first pass's."""
        # A1111 writes the target it was given, "Hires resize", where hr_resize_x/y set the size
        size = (
            {"Hires resize": f"{self.crop_to[0]}x{self.crop_to[1]}"} if self.crop_to else {"Hires upscale": self.scale}
        )
        params = {
            **size,
            "Hires steps": self.steps if self.steps and self.steps != base_steps else None,
            "Hires upscaler": {"latent": "Latent", "pixel": "Lanczos"}.get(self.upscaler, self.upscaler),
        }
        if self.sampler and self.sampler != base_sampler:
            from ldmkit.samplers import get_sampler

            sampler = get_sampler(self.sampler)
            params["Hires sampler"] = sampler.algorithm.name
            params["Hires schedule type"] = sampler.schedule.label
        return params | {"Denoising strength": self.strength}


class RequestLimits(Protocol):
    """Tighter limits a shared server sets (ldmkit.server.limits.ServerLimits); each raises InvalidRequest."""

    def check(self, prompt, negative_prompt, steps, num_images) -> None: ...
    def check_input(self, image, what: str) -> None: ...
    def check_size(self, width: int, height: int) -> None: ...
    def check_loras(self, count: int) -> None: ...

    max_prompt_chunks: int  # 75-token chunks per prompt and per negative prompt


# A [...] holding ':' or '|' (not escaped, no nested brackets): A1111's scheduled prompts.
_SCHEDULED_PROMPT = re.compile(r"(?<!\\)\[[^\[\]]*(?<!\\)[:|][^\[\]]*(?<!\\)\]")


@dataclass(frozen=True)
class GenerationParams:
    """A generation request. Field names are `Pipeline.generate`'s keywords; lists given for tuples become tuples."""

    prompt: str | tuple[str, ...]  # several prompts: num_images images of each, in one batch
    negative_prompt: str = ""
    steps: int = 25
    guidance: float | None = None  # classifier-free guidance scale; <= 1: the conditional pass only; None: the model's
    sampler: str | None = None  # a name of ldmkit.samplers (any case); None: its DEFAULT_SAMPLER
    seed: int | tuple[int, ...] | None = None  # image i uses seed + i; or one seed per image; None: random
    width: int | None = None  # None: the init image's size, else the model's native size
    height: int | None = None
    num_images: int = 1  # per prompt, per batch (AUTOMATIC1111's batch_size)
    batch_count: int = 1  # batches run one after another (AUTOMATIC1111's n_iter)
    init_image: Image.Image | None = None  # img2img
    strength: float = 0.75  # img2img: how much of the init image is repainted
    mask_image: Image.Image | None = None  # inpainting: white = repaint (needs init_image)
    mask_blur: int = 4  # inpainting: Gaussian blur of the mask, in pixels
    hires: HiresFix | None = None
    clip_skip: int = 1
    loras: tuple[tuple[str, float], ...] = ()  # (file, weight) pairs, besides the prompt's <lora:NAME:WEIGHT> tags
    controls: tuple = ()  # ControlNet units (ldmkit.control_units.ControlUnit), each guiding with its image
    refiner: object = None  # a loaded refiner Pipeline that finishes the denoising (ldmkit.refiner)
    refiner_switch: float = 0.8  # the fraction of the schedule the model runs before the refiner takes over
    vae: str | os.PathLike | None = None  # decode/encode with this VAE (a name of Pipeline.vaes, or a path); None: own
    # AUTOMATIC1111's noise options (ldmkit.noise, ldmkit.sampler_options); the defaults change nothing.
    subseed: int | None = None  # variation seed (image i: subseed + i); None: random when subseed_strength != 0
    subseed_strength: float = 0.0  # 0: the seed's noise; 1: the variation seed's; between: slerp of the two
    seed_resize_from: tuple[int, int] | None = None  # (width, height) the seed's noise is drawn at, centred in ours
    eta: float | None = None  # the sampler's noise: None is A1111's default (0 DDIM, 1 ancestral/SDE)
    s_churn: float = 0.0  # Karras et al.'s churn (Euler)
    s_tmin: float = 0.0  # churn only at noise levels from s_tmin ...
    s_tmax: float = math.inf  # ... to s_tmax
    s_noise: float = 1.0  # scale of the churn noise
    eta_noise_seed_delta: int = 0  # A1111's ENSD: per-step noise seeded seed + this (ancestral/SDE samplers)
    tiling: bool = False  # seamless textures: circular padding in the UNet's and VAE decoder's convolutions
    resize_mode: str = "resize"  # img2img: how the init image meets the size (RESIZE_MODES; ldmkit.resize_modes)
    masked_content: str = "original"  # inpainting: what the masked area starts from (MASKED_CONTENTS)
    inpaint_only_masked: bool = False  # inpainting: repaint the mask's box (plus padding) at the size, paste back
    inpaint_padding: int = 32  # with inpaint_only_masked: pixels of context around the mask's box

    def __post_init__(self):
        for name in ("prompt", "seed", "loras", "controls", "seed_resize_from"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(tuple(v) if isinstance(v, list) else v for v in value))

    @property
    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else self.prompt

    @property
    def batch_size(self) -> int:
        """Images per batch: every prompt's num_images."""
        return len(self.prompts) * self.num_images

    @property
    def total_images(self) -> int:
        return self.batch_size * self.batch_count

    @property
    def use_guidance(self) -> bool:
        """Whether the unconditional pass runs; needs a concrete guidance."""
        return self.guidance > 1.0

    @property
    def final_size(self) -> tuple[int, int]:
        """The size of the images made (the hires pass's, with one); needs a concrete size."""
        return self.hires.target_size(self.width, self.height) if self.hires else (self.width, self.height)

    @property
    def uses_variation(self) -> bool:
        return self.subseed_strength != 0

    def image_seeds(self) -> list[int]:
        """One seed per image, in order; needs a concrete seed. With a variation seed every image has the seed
        (its variation seed differs), as in A1111."""
        if isinstance(self.seed, tuple):
            return list(self.seed)
        return [self.seed + (0 if self.uses_variation else i) for i in range(self.total_images)]

    def image_subseeds(self) -> list[int]:
        """One variation seed per image (subseed + i); needs a concrete subseed."""
        return [self.subseed + i for i in range(self.total_images)]

    def batch_seeds(self) -> list[list[int]]:
        """The seeds of each batch; needs a concrete seed."""
        seeds = self.image_seeds()
        return [seeds[b * self.batch_size : (b + 1) * self.batch_size] for b in range(self.batch_count)]

    def as_kwargs(self) -> dict:
        """The fields as `Pipeline.generate`'s keyword arguments (not copied)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def validate(self, limits: RequestLimits | None = None) -> None:
        """Refuse (InvalidRequest, naming the value) what no model could run; `limits` adds a server's limits.

        Sizes and guidance left None are checked once known: `Pipeline.prepare` validates again after filling them
        in. What depends on the model (clip skip's range, LoRA files, memory) is `Pipeline.prepare`'s to check.
        """
        if limits is not None:  # first: they bound the work every later check does (the prompt's length)
            counts = (self.num_images, self.batch_count)
            total = self.total_images if all(is_int(n) for n in counts) else None
            for prompt in self.prompts if isinstance(self.prompt, (str, tuple)) else ():
                limits.check(prompt, self.negative_prompt, self.steps, total)
        self._check_text()
        self._check_counts()
        self._check_sampling()
        self._check_noise()
        self._check_size()
        self._check_images()
        self._check_init_options()
        if self.hires is not None:
            self._check_hires()
        self._check_loras()
        if self.vae is not None and not isinstance(self.vae, (str, os.PathLike)):
            raise InvalidRequest(f"vae must be a VAE name or path, not {type(self.vae).__name__}")
        if self.refiner is not None:
            self._check_refiner()
        if self.controls:
            check_units(self.controls, self.init_image is not None)
        if limits is not None:
            self._check_limits(limits)

    def resolved(self, default_size: int, default_guidance: float = DEFAULT_GUIDANCE) -> GenerationParams:
        """With the size, guidance, sampler name and seed made concrete (a random seed drawn where none is given)."""
        from ldmkit.samplers import DEFAULT_SAMPLER, get_sampler  # imports diffusers: only once a model is at hand

        fallback_w, fallback_h = self.init_image.size if self.init_image is not None else (default_size,) * 2
        hires = self.hires
        if hires is not None and hires.sampler:
            hires = dataclasses.replace(hires, sampler=get_sampler(hires.sampler).name)
        return dataclasses.replace(
            self,
            width=fallback_w // 8 * 8 if self.width is None else self.width,
            height=fallback_h // 8 * 8 if self.height is None else self.height,
            guidance=default_guidance if self.guidance is None else self.guidance,
            sampler=get_sampler(self.sampler or DEFAULT_SAMPLER).name,
            seed=random_seed(self.total_images) if self.seed is None else self.seed,
            subseed=random_seed(self.total_images) if self.subseed is None and self.uses_variation else self.subseed,
            hires=hires,
        )

    def hires_pass(self) -> GenerationParams:
        """The request as the hires fix's second pass runs it: its own prompt, negative prompt and sampler if given."""
        hires = self.hires
        prompt = self.prompt
        if hires.prompt:
            prompt = hires.prompt if isinstance(self.prompt, str) else tuple(hires.prompt for _ in self.prompts)
        return dataclasses.replace(
            self,
            prompt=prompt,
            negative_prompt=hires.negative_prompt or self.negative_prompt,
            sampler=hires.sampler or self.sampler,
        )

    # -- the checks, in the order a reader of the request meets its fields ------------------------------------------

    def _check_text(self) -> None:
        if not isinstance(self.prompt, (str, tuple)) or not self.prompts:
            raise InvalidRequest(f"prompt must be text or a list of texts, not {type(self.prompt).__name__}")
        texts = [("prompt", p) for p in self.prompts] + [("negative prompt", self.negative_prompt)]
        if isinstance(self.hires, HiresFix):
            texts += [("hires prompt", self.hires.prompt), ("hires negative prompt", self.hires.negative_prompt)]
        for name, text in texts:
            if not isinstance(text, str):
                raise InvalidRequest(f"{name} must be text, not {type(text).__name__}")
            if has_lone_surrogate(text):
                raise InvalidRequest(f"{name} is not valid Unicode text (it has a lone surrogate code point)")
            if (match := _SCHEDULED_PROMPT.search(text)) is not None:
                # AUTOMATIC1111 reads these as prompt editing / alternation; ours would read them as [de-emphasis].
                raise InvalidRequest(
                    f"{name}: {match.group(0)!r} is AUTOMATIC1111's prompt editing ([from:to:when]) or alternation "
                    "([a|b]), which ldmkit does not support; write \\[ \\] for literal brackets"
                )

    def _check_counts(self) -> None:
        if not is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise InvalidRequest(f"steps must be an integer from 1 to {MAX_STEPS}, got {self.steps!r}")
        if not is_int(self.num_images) or self.num_images < 1:
            raise InvalidRequest(
                f"batch size must be a positive integer (the number of images of a prompt), got {self.num_images!r}"
            )
        if not is_int(self.batch_count) or self.batch_count < 1:
            raise InvalidRequest(f"batch count must be a positive integer, got {self.batch_count!r}")
        if self.batch_size > MAX_IMAGES:
            raise InvalidRequest(f"number of images must be from 1 to {MAX_IMAGES} per batch, got {self.batch_size}")
        total = self.total_images
        if isinstance(self.seed, tuple):
            if len(self.seed) != total or not all(is_int(s) and 0 <= s <= MAX_SEED for s in self.seed):
                raise InvalidRequest(f"seeds must be {total} integers from 0 to {MAX_SEED}, one per image")
        elif self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= MAX_SEED + 1 - total):
            raise InvalidRequest(f"seed must be an integer from 0 to {MAX_SEED + 1 - total}, got {self.seed!r}")

    def _check_sampling(self) -> None:
        from ldmkit import sampler_options

        if self.guidance is not None and not is_guidance(self.guidance):  # None: the model's, checked at load
            raise InvalidRequest(f"guidance must be a finite number from 0 to {MAX_GUIDANCE}, got {self.guidance!r}")
        sampler_options.check_values(self.eta, self.s_churn, self.s_tmin, self.s_tmax, self.s_noise)
        if self.sampler is not None:
            from ldmkit.samplers import get_sampler  # the registry imports diffusers

            sampler_options.check_for_sampler(get_sampler(self.sampler), self.eta, self.s_churn)
        if not is_int(self.eta_noise_seed_delta) or not 0 <= self.eta_noise_seed_delta <= MAX_SEED:
            raise InvalidRequest(
                f"eta_noise_seed_delta must be an integer from 0 to {MAX_SEED}, got {self.eta_noise_seed_delta!r}"
            )

    def _check_noise(self) -> None:
        if not _is_number(self.subseed_strength) or not 0.0 <= self.subseed_strength <= 1.0:
            raise InvalidRequest(f"subseed_strength must be a number from 0 to 1, got {self.subseed_strength!r}")
        if self.uses_variation and self.subseed is not None:
            top = MAX_SEED + 1 - self.total_images
            if not is_int(self.subseed) or not 0 <= self.subseed <= top:
                raise InvalidRequest(f"subseed must be an integer from 0 to {top}, got {self.subseed!r}")
        if self.seed_resize_from is not None:
            if not (isinstance(self.seed_resize_from, tuple) and len(self.seed_resize_from) == 2):
                raise InvalidRequest(f"seed_resize_from must be (width, height), got {self.seed_resize_from!r}")
            width, height = self.seed_resize_from
            for name, side in (("width", width), ("height", height)):
                if not is_int(side) or side < 8 or side % 8 or side > MAX_SIDE:
                    raise InvalidRequest(
                        f"seed resize from {name} must be a multiple of 8 from 8 to {MAX_SIDE}, got {side!r}"
                    )

    def _check_size(self) -> None:
        if self.width is not None or self.height is not None:
            check_size(self.width if self.width is not None else 8, self.height if self.height is not None else 8)

    def _check_images(self) -> None:
        if self.init_image is not None:
            if not isinstance(self.init_image, Image.Image):
                raise InvalidRequest(f"init image must be a PIL image, not {type(self.init_image).__name__}")
            if not _is_number(self.strength) or not 0.0 <= self.strength <= 1.0:
                raise InvalidRequest(f"strength must be between 0 and 1, got {self.strength!r}")
            if int(self.steps * self.strength) < 1:
                raise InvalidRequest(
                    f"strength {self.strength} with {self.steps} steps leaves no denoising step; raise either"
                )
        if self.mask_image is not None:
            if not isinstance(self.mask_image, Image.Image):
                raise InvalidRequest(f"mask must be a PIL image, not {type(self.mask_image).__name__}")
            if self.init_image is None:
                raise InvalidRequest("inpainting needs an init image as well as the mask")
            if not is_int(self.mask_blur) or not 0 <= self.mask_blur <= MAX_MASK_BLUR:
                raise InvalidRequest(
                    f"mask blur must be an integer from 0 to {MAX_MASK_BLUR} pixels, got {self.mask_blur!r}"
                )

    def _check_init_options(self) -> None:
        """The img2img and inpainting options: known values, and each with what it describes."""
        if not isinstance(self.tiling, bool):
            raise InvalidRequest(f"tiling must be true or false, got {self.tiling!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise InvalidRequest(f"unknown resize mode {self.resize_mode!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.masked_content not in MASKED_CONTENTS:
            raise InvalidRequest(
                f"unknown masked content {self.masked_content!r}; use one of {', '.join(MASKED_CONTENTS)}"
            )
        if not isinstance(self.inpaint_only_masked, bool):
            raise InvalidRequest(f"inpaint_only_masked must be true or false, got {self.inpaint_only_masked!r}")
        if not is_int(self.inpaint_padding) or not 0 <= self.inpaint_padding <= MAX_SIDE:
            raise InvalidRequest(
                f"inpaint padding must be an integer from 0 to {MAX_SIDE}, got {self.inpaint_padding!r}"
            )
        if self.resize_mode != "resize" and self.init_image is None:
            raise InvalidRequest(f"resize mode {self.resize_mode!r} fits an init image: give one")
        if self.mask_image is None and (self.masked_content != "original" or self.inpaint_only_masked):
            raise InvalidRequest("masked content and 'only masked' describe inpainting: give a mask")
        if self.resize_mode == "latent" and self.mask_image is not None:
            raise InvalidRequest("resize mode 'latent' is for img2img without a mask; use another with a mask")
        if self.resize_mode != "resize" and self.inpaint_only_masked:
            raise InvalidRequest("'only masked' inpainting crops around the mask: the resize mode must be 'resize'")

    def _check_hires(self) -> None:
        if not isinstance(self.hires, HiresFix):
            raise InvalidRequest(f"hires must be a HiresFix, not {type(self.hires).__name__}")
        if self.init_image is not None:
            raise InvalidRequest("hires fix is for text-to-image; with an init image, set the size directly")
        self.hires.check(self.steps, self.width, self.height)
        if self.hires.prompt and set(prompt_loras((self.hires.prompt,))) != set(self.prompt_loras()):
            # The LoRAs are in the model for the whole request: both passes run the same ones.
            raise InvalidRequest("the hires prompt's <lora:...> tags must be the prompt's (both passes use the same)")

    def _check_refiner(self) -> None:
        if not _is_number(self.refiner_switch) or not 0.0 < self.refiner_switch < 1.0:
            raise InvalidRequest(f"refiner switch must be between 0 and 1 (exclusive), got {self.refiner_switch!r}")
        if self.tiling:
            raise InvalidRequest("a refiner is not supported with tiling yet")

    def _check_loras(self) -> None:
        self.prompt_loras()  # parses and checks the tags
        for entry in self.loras:
            if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], (str, os.PathLike))):
                raise InvalidRequest(f"loras must be (file, weight) pairs, got {entry!r}")
            if not _is_number(entry[1]):
                raise InvalidRequest(f"LoRA {entry[0]!r} weight must be a finite number, got {entry[1]!r}")

    def _check_limits(self, limits: RequestLimits) -> None:
        """A server's limits on what the checks above found well formed."""
        limits.check_input(self.init_image, "init image")
        limits.check_input(self.mask_image, "mask")
        for index, unit in enumerate(self.controls):
            limits.check_input(unit.image, f"ControlNet unit {index} image")
        limits.check_loras(len(self.prompt_loras()) + len({str(path) for path, _ in self.loras}))
        if self.width is None or self.height is None:
            return
        limits.check_size(self.width, self.height)
        if self.hires is not None:
            limits.check(
                self.hires.prompt, self.hires.negative_prompt, self.hires.pass_steps(self.steps), self.total_images
            )
            limits.check_size(*self.hires.target_size(self.width, self.height))

    def prompt_loras(self) -> list[tuple[str, float]]:
        """The distinct (NAME, WEIGHT) of every prompt's <lora:...> tags, checked; see ldmkit.lora.prompt_loras."""
        return prompt_loras(self.prompts)

    def text_prompts(self) -> tuple[str, ...]:
        """The prompts without their <lora:...> tags: what the text encoder reads."""
        from ldmkit.lora import strip_lora_tags

        return tuple(strip_lora_tags(p) for p in self.prompts)


def check_size(width, height) -> None:
    for name, side in (("width", width), ("height", height)):
        if not is_int(side) or side < 8 or side % 8 or side > MAX_SIDE:
            raise InvalidRequest(f"{name} must be a multiple of 8 from 8 to {MAX_SIDE}, got {side!r}")


def random_seed(count: int = 1) -> int:
    """The one random-seed rule: a seed whose `count` images (seed, seed + 1, ...) all stay within MAX_SEED."""
    return random.randrange(MAX_SEED + 2 - count)


def is_guidance(value) -> bool:
    """A classifier-free guidance scale ldmkit runs: a finite number from 0 to MAX_GUIDANCE."""
    return _is_number(value) and 0 <= value <= MAX_GUIDANCE


def is_int(value) -> bool:
    """An int that is not a bool (JSON's true would otherwise count as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def has_lone_surrogate(text: str) -> bool:
    """JSON's "\\ud800" escape decodes to a str that is no text, which the tokenizer (and UTF-8) refuse."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
