"""The denoiser and the sampling loop over it.

`Denoiser` is the UNet as the sampler sees it: (latents at a noise level, timestep) -> the guided model
prediction and the predicted clean latents x0, with classifier-free guidance and the model's own extra inputs
inside, as k-diffusion's and ComfyUI's model wrappers do. `sample` is the loop: scale, denoise, step, hook.
A diffusers scheduler does the stepping (ldmkit.samplers names them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class StepInfo:
    """What a callback sees after each denoising step (k-diffusion's callback dict, typed)."""

    step: int  # 0-based index of the step just taken
    total: int  # number of steps in this run
    timestep: float  # the UNet's timestep for this step
    sigma: float  # noise level of the step's input, sqrt((1 - alpha_bar) / alpha_bar)
    latents: torch.Tensor  # (B, C, h, w) latents after the step
    denoised: torch.Tensor  # (B, C, h, w) predicted clean latents (x0) at this step
    batch: int = 0  # which of the request's batches (GenerationParams.batch_count) this step belongs to


@dataclass(frozen=True)
class Schedule:
    """One sampling pass: a fresh scheduler (they keep state), its timesteps, and each step's noise level."""

    scheduler: object  # a diffusers SchedulerMixin
    timesteps: torch.Tensor  # on the host: schedulers do their per-step arithmetic on host scalars
    alpha_bars: torch.Tensor  # (steps,) float32 cumulative alpha of each step's input, x_t = sqrt(a) x0 + ...
    step_options: dict = field(default_factory=dict)  # the sampler's noise options, as its step() takes them

    @classmethod
    def make(
        cls, sampler, scheduler_config: dict, steps: int, strength: float | None = None, step_options=None
    ) -> Schedule:
        """`steps` of `sampler`; with `strength` (img2img), only the tail that starts at that noise level.
        `step_options` (ldmkit.sampler_options.step_kwargs) go to every step."""
        scheduler = sampler.make_scheduler(scheduler_config)
        scheduler.set_timesteps(steps, device="cpu")
        timesteps = scheduler.timesteps
        if strength is not None:  # diffusers' get_timesteps
            t_start = steps - min(int(steps * strength), steps)
            if hasattr(scheduler, "set_begin_index"):  # index-tracking schedulers; DDIM and PLMS have none
                scheduler.set_begin_index(t_start * scheduler.order)
            timesteps = timesteps[t_start * scheduler.order :]
        return cls(scheduler, timesteps, _alpha_bars(scheduler, timesteps), dict(step_options or {}))

    @classmethod
    def make_after(
        cls,
        sampler,
        scheduler_config: dict,
        steps: int,
        switch: float,
        strength: float | None = None,
        step_options=None,
    ) -> Schedule:
        """A refiner's pass (diffusers' `denoising_start`): the steps of a fresh `steps`-step schedule whose
        timestep is below the switch point's, where the base's pass (`until(switch)`) stopped. With `strength` (an
        img2img pass, such as the hires fix's), no more than that pass's tail: all of it if it starts below."""
        scheduler = sampler.make_scheduler(scheduler_config)
        scheduler.set_timesteps(steps, device="cpu")
        count = int((scheduler.timesteps < _switch_timestep(scheduler, switch)).sum())
        if scheduler.order == 2 and count % 2 == 0 and count > 0:
            count += 1  # a second-order step's two evaluations stay together, as diffusers counts them
        if strength is not None:  # as Schedule.make cuts an img2img pass
            count = min(count, len(scheduler.timesteps) - (steps - min(int(steps * strength), steps)) * scheduler.order)
        t_start = len(scheduler.timesteps) - count
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
        timesteps = scheduler.timesteps[t_start:]
        return cls(scheduler, timesteps, _alpha_bars(scheduler, timesteps), dict(step_options or {}))

    def until(self, switch: float) -> Schedule:
        """The base's part of a pass handed to a refiner at `switch` (a fraction of the training timesteps, as
        diffusers' `denoising_end`): the steps at or above the switch point's timestep, on the same scheduler."""
        count = int((self.timesteps >= _switch_timestep(self.scheduler, switch)).sum())
        return Schedule(self.scheduler, self.timesteps[:count], self.alpha_bars[:count], self.step_options)

    def __len__(self) -> int:
        return len(self.timesteps)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Clean latents noised to the pass's first step (img2img's start)."""
        return self.scheduler.add_noise(latents, noise, self.timesteps[:1].repeat(len(latents)))


def _switch_timestep(scheduler, switch: float) -> int:
    """The first timestep past a base/refiner switch at `switch` of the way from noise to image."""
    train_steps = scheduler.config.num_train_timesteps
    return round(train_steps - switch * train_steps)


def _alpha_bars(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Each step's cumulative alpha, once per pass.

    Schedulers of the k-diffusion family keep the sigma of every step (len(timesteps) + 1 with the final 0); with
    Karras sigmas their timesteps are rounded, so the sigma is the exact noise level. KDPM2's second-order steps
    use another, interpolated sigma (`sigmas_interpol`), and DDIM/PLMS keep none: for those the alphas of the
    training schedule are interpolated at the (possibly fractional) timesteps.
    """
    sigmas = getattr(scheduler, "sigmas", None)
    full = scheduler.timesteps
    if sigmas is not None and len(sigmas) == len(full) + 1 and not hasattr(scheduler, "sigmas_interpol"):
        start = len(full) - len(timesteps)
        sigma = sigmas[start : start + len(timesteps)].to(torch.float32).cpu()
        return 1 / (1 + sigma**2)
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    # "leading" spacing with steps_offset can yield t == num_train_timesteps
    t = timesteps.to(torch.float32).cpu().clamp(max=len(alphas) - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=len(alphas) - 1)
    return torch.lerp(alphas[low], alphas[high], t - low)


@dataclass
class Prediction:
    """The guided model output for latents x_t at one noise level, and the clean latents it implies."""

    output: torch.Tensor  # (B, C, h, w) what the model predicts: noise, v, or the sample itself
    x_t: torch.Tensor  # (B, C, h, w) the model's input (variance-preserving: sqrt(a) x0 + sqrt(1 - a) noise)
    alpha_bar: torch.Tensor  # scalar float32
    prediction_type: str  # "epsilon", "v_prediction" or "sample"

    @property
    def sigma(self) -> float:
        return float(((1 - self.alpha_bar) / self.alpha_bar).sqrt())

    @functools.cached_property
    def x0(self) -> torch.Tensor:
        """Predicted clean latents; every scheduler's model input is variance preserving, so one formula fits all."""
        a, s = self.alpha_bar.sqrt(), (1 - self.alpha_bar).sqrt()
        x_t, out = self.x_t.float(), self.output.float()
        if self.prediction_type == "epsilon":
            x0 = (x_t - s * out) / a
        elif self.prediction_type == "v_prediction":
            x0 = a * x_t - s * out
        else:  # "sample"
            x0 = out
        return x0.to(self.x_t.dtype)


@dataclass
class Denoiser:
    """The UNet with its conditioning and classifier-free guidance: (x_t, timestep, alpha_bar) -> Prediction."""

    unet: Callable  # called as diffusers' UNet2DConditionModel is
    context: torch.Tensor  # (B or 2B, 77k, D) cross-attention states; with guidance the unconditional half first
    guidance: float  # > 1: uncond + guidance * (cond - uncond) from one batched call over both halves
    prediction_type: str
    unet_kwargs: dict = field(default_factory=dict)  # a family's extra conditioning, batched as `context` is
    extra_channels: torch.Tensor | None = None  # (B, c, h, w) concatenated to the input: 9-channel inpainting

    @property
    def use_guidance(self) -> bool:
        return self.guidance > 1.0

    def __call__(self, x_t: torch.Tensor, timestep: torch.Tensor, alpha_bar: torch.Tensor) -> Prediction:
        unet_input = x_t if self.extra_channels is None else torch.cat([x_t, self.extra_channels], dim=1)
        if self.use_guidance:
            unet_input = torch.cat([unet_input] * 2)
        output = self.unet(
            unet_input, timestep, encoder_hidden_states=self.context, return_dict=False, **self.unet_kwargs
        )[0]
        if self.use_guidance:
            uncond, cond = output.chunk(2)
            output = uncond + self.guidance * (cond - uncond)
        return Prediction(output, x_t, alpha_bar, self.prediction_type)


class StepHook(Protocol):
    """Work done on the latents around the model at every step (inpainting's known region)."""

    def after_step(self, latents: torch.Tensor, step: int) -> torch.Tensor: ...
    def clean(self, x0: torch.Tensor) -> torch.Tensor: ...


@dataclass
class Sampled:
    """A pass's outcome: the final latents, or, stopped early, the clean latents its last step predicted."""

    latents: torch.Tensor | None  # None: stopped before its first step
    interrupted: bool = False
    clean: torch.Tensor | None = None  # a finished pass's last predicted clean latents (a hand-over's fallback)


def sample(
    denoiser: Denoiser,
    schedule: Schedule,
    latents: torch.Tensor,
    generators: list[torch.Generator] | None = None,
    hook: StepHook | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Sampled:
    """Run the scheduler over `schedule` from `latents`; `generators` feed stochastic samplers' fresh noise.

    should_stop() is asked before every step; True ends the pass with the clean latents of the last step taken.
    """
    scheduler = schedule.scheduler
    step_kwargs = {**schedule.step_options, **({"generator": generators} if generators is not None else {})}
    unet_timesteps = schedule.timesteps.to(latents.device)  # one copy, not one blocking copy per step
    prediction = None
    for i, t in enumerate(schedule.timesteps):
        if should_stop is not None and should_stop():
            return Sampled(None if prediction is None else _clean(prediction, hook), interrupted=True)
        model_input = scheduler.scale_model_input(latents, t)
        prediction = denoiser(model_input, unet_timesteps[i], schedule.alpha_bars[i])
        latents = scheduler.step(prediction.output, t, latents, **step_kwargs, return_dict=False)[0]
        if hook is not None:
            latents = hook.after_step(latents, i)
        if callback is not None:
            x0 = _clean(prediction, hook)
            callback(StepInfo(i, len(schedule), float(t), prediction.sigma, latents, x0))
    return Sampled(latents, clean=None if prediction is None else _clean(prediction, hook))


def _clean(prediction: Prediction, hook: StepHook | None) -> torch.Tensor:
    """The clean latents a step predicts, as the finished image would hold them (through the hook)."""
    return prediction.x0 if hook is None else hook.clean(prediction.x0)
