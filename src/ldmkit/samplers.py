"""Sampler names and schedule types people use (AUTOMATIC1111 1.10's) -> configured diffusers schedulers.

One registry feeds the CLI's choices, the server's sampler and schedule-type lists and the web UI's dropdowns.
`get_sampler(name, schedule_type)` resolves a request; its `make_scheduler(config)` builds a fresh scheduler
that steps through exactly the named schedule, or the request is refused: a combination diffusers cannot run
exactly is never approximated. See docs/samplers.md for the table and the reasons for each refusal.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSDEScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_euler_ancestral_discrete import EulerAncestralDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ldmkit.errors import InvalidRequest
from ldmkit.schedules import AUTOMATIC, FAMILY_KEY, SCHEDULE_TYPES, ModelSigmas, ScheduleType, get_schedule_type

# How an algorithm takes a schedule type other than its own:
OWN_ONLY = "own"  # it cannot: Automatic only
FLAGS = "flags"  # diffusers' use_karras/exponential/beta_sigmas config, checked against our definition
ANY_SIGMAS = "sigmas"  # any schedule: its sigmas replace the ones diffusers computed
AS_EULER = "as_euler"  # DDIM (eta 0) on given noise levels *is* Euler's method on them (Karras et al. 2022, EDM)

# The schedule types diffusers' config flags produce exactly, once the spacing spans every training timestep.
_FLAG_FOR = {"Karras": "use_karras_sigmas", "Exponential": "use_exponential_sigmas", "Beta": "use_beta_sigmas"}
_FLAG_FOR["Polyexponential"] = _FLAG_FOR["Exponential"]  # A1111's Polyexponential (rho 1) is Exponential
_NO_FLAGS = {flag: False for flag in _FLAG_FOR.values()}


@dataclass(frozen=True)
class Algorithm:
    """One of A1111's sampler names as a diffusers scheduler class and the config it needs."""

    name: str  # A1111's label
    scheduler_class: type[SchedulerMixin]
    overrides: dict
    schedules: str  # OWN_ONLY, FLAGS, ANY_SIGMAS or AS_EULER
    stochastic: bool = False  # draws fresh noise each step: needs the per-image generators
    aliases: tuple[str, ...] = ()  # A1111's API aliases ("k_euler")
    default_schedule: str = "Automatic"  # what A1111 1.10 runs for 'Automatic' (its sampler's 'scheduler' option)
    has_sigma_flags: bool = False  # the class takes use_karras/exponential/beta_sigmas
    needs: str | None = None  # an optional package it cannot run without

    def supported_schedules(self) -> list[str]:
        if self.schedules in (ANY_SIGMAS, AS_EULER):
            return list(SCHEDULE_TYPES)
        if self.schedules == FLAGS:
            return [label for label in SCHEDULE_TYPES if label == "Automatic" or label in _FLAG_FOR]
        return ["Automatic"]


@dataclass(frozen=True)
class Sampler:
    """A resolved request: an algorithm on a schedule. `name` round-trips through get_sampler."""

    algorithm: Algorithm
    schedule: ScheduleType  # AUTOMATIC: the scheduler's own schedule for the model's config

    @property
    def name(self) -> str:
        """A1111's combined label ("DPM++ 2M Karras"), as the infotext's 'Sampler' writes it."""
        if self.schedule is AUTOMATIC:
            return self.algorithm.name
        return f"{self.algorithm.name} {self.schedule.label}"

    @property
    def stochastic(self) -> bool:
        return self.algorithm.stochastic

    def make_scheduler(self, scheduler_config: dict) -> SchedulerMixin:
        """A fresh scheduler (they are stateful) built from the model's training noise schedule."""
        algorithm, schedule = self.algorithm, self.schedule
        scheduler_class, overrides = algorithm.scheduler_class, dict(algorithm.overrides)
        if algorithm.has_sigma_flags:  # explicit, so a flag in the model's own config cannot leak in
            overrides.update(_NO_FLAGS)
        if algorithm.scheduler_class is PNDMScheduler and scheduler_config.get("prediction_type") == "v_prediction":
            scheduler_class, overrides["prediction_type"] = _PLMSOnVPrediction, "epsilon"
        if schedule is AUTOMATIC:
            return scheduler_class.from_config(scheduler_config, **overrides)
        if algorithm.schedules == AS_EULER:
            scheduler_class, overrides = _DDIMOnSigmas, dict(_NO_FLAGS)
        # linspace: the flags span every training timestep, and the k-diffusion schedulers start from
        # noise * the first sigma (with the model's "leading" spacing diffusers scales by sqrt(sigma^2 + 1))
        overrides["timestep_spacing"] = "linspace"
        replace = algorithm.schedules in (ANY_SIGMAS, AS_EULER)
        if not replace:
            overrides[_FLAG_FOR[schedule.label]] = True
        scheduled = _on_schedule(scheduler_class, schedule, replace, self.name)
        return scheduled.from_config(scheduler_config, **overrides)


class _OnSchedule:
    """Mixin: set_timesteps leaves the scheduler stepping through `schedule`'s sigmas, or refuses.

    ANY_SIGMAS schedulers (one model call per sigma) get our sigmas and their timesteps in place of
    diffusers' own; FLAGS schedulers computed them from their config, which is checked here.
    """

    schedule: ScheduleType
    replace_sigmas: bool
    sampler_name: str

    def set_timesteps(self, num_inference_steps: int, device=None, *args, **kwargs):
        super().set_timesteps(num_inference_steps, device, *args, **kwargs)
        model = ModelSigmas(self.alphas_cumprod, self.config.get(FAMILY_KEY, "sd"))
        sigmas = self.schedule.sigmas(num_inference_steps, model)
        if self.replace_sigmas:
            self.sigmas = torch.from_numpy(sigmas).to(device=device, dtype=torch.float32)
            self.timesteps = torch.from_numpy(model.sigma_to_t(sigmas[:-1])).to(device=device, dtype=torch.float32)
        elif not _same_noise_levels(self.sigmas, sigmas):
            raise InvalidRequest(
                f"sampler {self.sampler_name!r} cannot run the {self.schedule.label} schedule exactly with "
                f"{num_inference_steps} step(s): diffusers' {type(self).__name__} spaces them otherwise"
            )


@functools.cache
def _on_schedule(scheduler_class, schedule: ScheduleType, replace: bool, sampler_name: str) -> type:
    attributes = {"schedule": schedule, "replace_sigmas": replace, "sampler_name": sampler_name}
    return type(scheduler_class.__name__, (_OnSchedule, scheduler_class), attributes)


def _same_noise_levels(scheduler_sigmas: torch.Tensor, sigmas: np.ndarray) -> bool:
    """Whether a scheduler's sigmas, with second-order schedulers' repeats folded, are `sigmas` (float32-close)."""
    levels = scheduler_sigmas.double().cpu().numpy()
    distinct = levels[np.concatenate([[True], np.abs(np.diff(levels)) > 1e-7 * np.abs(levels[1:]).clip(1e-6)])]
    return len(distinct) == len(sigmas) and np.allclose(distinct, sigmas, rtol=1e-4, atol=1e-6)


class _PLMSOnVPrediction(PNDMScheduler):
    """PLMS for v-prediction models: each output becomes noise (eps) at the point where it was predicted.

    diffusers' PNDMScheduler extrapolates the raw model outputs over the last four steps and converts the
    result to eps with the current step's alpha and sample. For eps models that is PLMS; for v models,
    whose v -> eps conversion depends on the sample and timestep it was predicted at, it is not.
    Built with prediction_type="epsilon", so the parent extrapolates true eps.
    """

    def step(self, model_output, timestep, sample, return_dict: bool = True):
        alpha_bar = self.alphas_cumprod[int(timestep)].to(sample.dtype)
        eps = alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * sample  # v = sqrt(a) eps - sqrt(1-a) x0
        return super().step(eps, timestep, sample, return_dict=return_dict)


def _ancestral_step(scheduler, model_output, timestep, sample, generator, eta: float) -> torch.Tensor:
    """k-diffusion's ancestral Euler step with eta on the scheduler's sigmas (Karras et al. 2022 / Ho et al. 2020).

    From sigma to sigma_next: sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2); an Euler step to sigma_down, then noise * sigma_up. Eta 0 is
    Euler's step; eta 1 is Euler a's; and DDIM's eta step, written in sigmas, is this one (its noise std over
    sqrt(alpha_bar_prev) works out to the same sigma_up).
    """
    if scheduler.step_index is None:
        scheduler._init_step_index(timestep)
    sigma, sigma_next = scheduler.sigmas[scheduler.step_index], scheduler.sigmas[scheduler.step_index + 1]
    x = sample.to(torch.float32)
    if scheduler.config.prediction_type == "epsilon":
        x0 = x - sigma * model_output
    elif scheduler.config.prediction_type == "v_prediction":
        x0 = model_output * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
    else:
        raise ValueError(f"the ancestral step cannot step a {scheduler.config.prediction_type!r} model")
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    x = x + (x - x0) / sigma * (sigma_down - sigma)
    # drawn at every step, as diffusers' Euler a draws it, so the generators advance alike whatever eta is
    noise = randn_tensor(model_output.shape, dtype=model_output.dtype, device=model_output.device, generator=generator)
    scheduler._step_index += 1
    return (x + noise * sigma_up).to(model_output.dtype)


class _AncestralEulerScheduler(EulerAncestralDiscreteScheduler):
    """Euler a with A1111's eta, the share of each step's noise level drawn afresh; diffusers' own step is eta 1
    and runs unchanged for it."""

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, eta: float = 1.0):
        if eta == 1.0:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        prev_sample = _ancestral_step(self, model_output, timestep, sample, generator, eta)
        return EulerAncestralDiscreteSchedulerOutput(prev_sample, None) if return_dict else (prev_sample,)


class _DDIMOnSigmas(EulerDiscreteScheduler):
    """DDIM on a schedule type: Euler's step at eta 0 (diffusers' own, unchanged), the ancestral step with eta."""

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, eta: float = 0.0):
        if eta == 0.0:
            return super().step(model_output, timestep, sample, generator=generator, return_dict=return_dict)
        prev_sample = _ancestral_step(self, model_output, timestep, sample, generator, eta)
        return EulerDiscreteSchedulerOutput(prev_sample, None) if return_dict else (prev_sample,)


class _BrownianSDEScheduler(DPMSolverSDEScheduler):
    """DPM++ SDE with one Brownian tree per image, seeded with the image's seed, drawn on the CPU in float32.

    diffusers' DPMSolverSDEScheduler takes no generator: its tree is seeded by a config value or the global
    RNG and drawn on the sample's device. Seeding each image's tree with that image's seed (as A1111 does)
    keeps image i the same in any batch and on any device.
    """

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True, s_noise: float = 1.0):
        if self.noise_sampler is None:
            if generator is None:
                raise ValueError("DPM++ SDE needs the per-image generators")
            generators = generator if isinstance(generator, list) else [generator]
            self.noise_sampler = _CpuBrownianNoise(sample, self.sigmas, [g.initial_seed() for g in generators])
        return super().step(model_output, timestep, sample, return_dict=return_dict, s_noise=s_noise)


class _CpuBrownianNoise:
    """diffusers' BrownianTreeNoiseSampler on a float32 CPU copy of the sample; noise comes back on its device."""

    def __init__(self, sample: torch.Tensor, sigmas: torch.Tensor, seeds: list[int]):
        from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

        positive = sigmas[sigmas > 0]
        cpu_sample = sample.detach().to("cpu", torch.float32)
        self._tree = BrownianTreeNoiseSampler(cpu_sample, positive.min().item(), positive.max().item(), seeds)
        self._device, self._dtype = sample.device, sample.dtype

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        noise = self._tree(torch.as_tensor(float(sigma)), torch.as_tensor(float(sigma_next)))
        return noise.to(self._device, self._dtype)


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
_KARRAS, _EXPONENTIAL = "Karras", "Exponential"

# A1111 1.10's samplers (modules/sd_samplers_kdiffusion.py, _timesteps.py, _lcm.py), in its order, with
# its aliases and its default schedule types.
ALGORITHMS: list[Algorithm] = [
    Algorithm(
        "DPM++ 2M",
        DPMSolverMultistepScheduler,
        _DPMPP,
        FLAGS,
        aliases=("k_dpmpp_2m",),
        default_schedule=_KARRAS,
        has_sigma_flags=True,
    ),
    Algorithm(
        "DPM++ SDE",
        _BrownianSDEScheduler,
        {},
        FLAGS,
        stochastic=True,
        aliases=("k_dpmpp_sde",),
        default_schedule=_KARRAS,
        has_sigma_flags=True,
        needs="torchsde",
    ),
    Algorithm(
        "DPM++ 2M SDE",
        DPMSolverMultistepScheduler,
        _DPMPP_SDE,
        FLAGS,
        stochastic=True,
        aliases=("k_dpmpp_2m_sde",),
        default_schedule=_EXPONENTIAL,
        has_sigma_flags=True,
    ),
    Algorithm(
        "DPM++ 2M SDE Heun",
        DPMSolverMultistepScheduler,
        {**_DPMPP_SDE, "solver_type": "heun"},
        FLAGS,
        stochastic=True,
        aliases=("k_dpmpp_2m_sde_heun",),
        default_schedule=_EXPONENTIAL,
        has_sigma_flags=True,
    ),
    Algorithm(
        "DPM++ 3M SDE",
        DPMSolverMultistepScheduler,
        {**_DPMPP_SDE, "solver_order": 3},
        FLAGS,
        stochastic=True,
        aliases=("k_dpmpp_3m_sde",),
        default_schedule=_EXPONENTIAL,
        has_sigma_flags=True,
    ),
    Algorithm(
        "Euler a",
        _AncestralEulerScheduler,
        {},
        ANY_SIGMAS,
        stochastic=True,
        aliases=("k_euler_a", "k_euler_ancestral"),
    ),
    Algorithm("Euler", EulerDiscreteScheduler, {}, ANY_SIGMAS, aliases=("k_euler",), has_sigma_flags=True),
    Algorithm("LMS", LMSDiscreteScheduler, {}, ANY_SIGMAS, aliases=("k_lms",), has_sigma_flags=True),
    Algorithm("Heun", HeunDiscreteScheduler, {}, FLAGS, aliases=("k_heun",), has_sigma_flags=True),
    Algorithm(
        "DPM2",
        KDPM2DiscreteScheduler,
        {},
        FLAGS,
        aliases=("k_dpm_2",),
        default_schedule=_KARRAS,
        has_sigma_flags=True,
    ),
    Algorithm(
        "DPM2 a",
        KDPM2AncestralDiscreteScheduler,
        {},
        FLAGS,
        stochastic=True,
        aliases=("k_dpm_2_a",),
        default_schedule=_KARRAS,
        has_sigma_flags=True,
    ),
    Algorithm("DDIM", DDIMScheduler, {}, AS_EULER, aliases=("ddim",)),
    Algorithm("PLMS", PNDMScheduler, {"skip_prk_steps": True}, OWN_ONLY, aliases=("plms",)),
    Algorithm("UniPC", UniPCMultistepScheduler, {}, FLAGS, aliases=("unipc",), has_sigma_flags=True),
    # Latent consistency models and LCM-LoRAs: 1-8 steps with guidance off or low.
    Algorithm("LCM", LCMScheduler, {}, OWN_ONLY, stochastic=True, aliases=("k_lcm",)),
]
SAMPLERS: dict[str, Algorithm] = {a.name: a for a in ALGORITHMS}

# A1111 1.10's samplers that diffusers has no scheduler for; named so a request gets a reason, not "unknown".
REFUSED: dict[str, str] = {
    "DPM++ 2S a": "diffusers has no ancestral single-step DPM-Solver++(2S) (its DPMSolverSinglestepScheduler "
    "is the non-ancestral method on its own step grid)",
    "DPM fast": "diffusers has no fixed-order DPM-Solver 'fast' sampler",
    "DPM adaptive": "diffusers has no adaptive-step DPM-Solver",
    "Restart": "diffusers has no Restart sampler (Xu et al. 2023)",
    "DDIM CFG++": "CFG++ changes guidance inside the DDIM step; diffusers has no such scheduler",
}
_REFUSED_ALIASES = {
    "k_dpmpp_2s_a": "DPM++ 2S a",
    "k_dpm_fast": "DPM fast",
    "k_dpm_ad": "DPM adaptive",
    "restart": "Restart",
    "ddim_cfgpp": "DDIM CFG++",
}

DEFAULT_SAMPLER = "DPM++ 2M"  # A1111 1.10's default; 'Automatic' runs it on the Karras schedule
DEFAULT_SCHEDULE_TYPE = AUTOMATIC.label


def get_sampler(name: str, schedule_type: str | None = None) -> Sampler:
    """Resolve A1111's sampler name (or alias, or legacy 'name + schedule' label) and schedule type.

    Case and surrounding spaces are ignored ("euler a" == "Euler a"); "DPM++ 2M Karras" is "DPM++ 2M" on
    Karras, as A1111 1.9+ reads it; `k_dpmpp_2m_ka` is A1111's older alias for it. A schedule type that is
    unknown, or that this sampler cannot run exactly, is refused (A1111 falls back to Automatic instead).
    """
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest(f"sampler must be a name, got {name!r}; choose one of: {', '.join(SAMPLERS)}")
    algorithm, named_schedule = _parse_sampler_name(name)
    requested = get_schedule_type(schedule_type)
    if named_schedule is not None and requested is not AUTOMATIC and requested is not named_schedule:
        raise InvalidRequest(
            f"sampler {name!r} names the {named_schedule.label} schedule but the schedule type is {requested.label!r}"
        )
    schedule = named_schedule or requested
    if schedule is AUTOMATIC:
        schedule = SCHEDULE_TYPES[algorithm.default_schedule]
    if schedule.label not in algorithm.supported_schedules():
        raise InvalidRequest(
            f"sampler {algorithm.name!r} cannot run the {schedule.label} schedule exactly; it takes: "
            f"{', '.join(algorithm.supported_schedules())}"
        )
    if algorithm.needs and importlib.util.find_spec(algorithm.needs) is None:
        raise InvalidRequest(
            f"sampler {algorithm.name!r} needs the {algorithm.needs} package: pip install 'ldmkit[sde]'"
        )
    return Sampler(algorithm, schedule)


def _parse_sampler_name(name: str) -> tuple[Algorithm, ScheduleType | None]:
    """An algorithm and the schedule type a legacy label or `_ka` alias carries (None if it names none)."""
    wanted = name.strip().lower()
    head, schedule = _split_schedule_suffix(wanted)
    for candidate, named in ((wanted, None), (wanted.removesuffix("_ka"), SCHEDULE_TYPES["Karras"]), (head, schedule)):
        for algorithm in ALGORITHMS:
            if candidate == algorithm.name.lower() or candidate in algorithm.aliases:
                return algorithm, named
    for candidate in (wanted, wanted.removesuffix("_ka"), head):
        refused = _REFUSED_ALIASES.get(candidate) or next((r for r in REFUSED if r.lower() == candidate), None)
        if refused is not None:
            raise InvalidRequest(f"sampler {refused!r} is not available: {REFUSED[refused]}")
    raise InvalidRequest(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def _split_schedule_suffix(wanted: str) -> tuple[str, ScheduleType | None]:
    """'dpm++ 2m karras' -> ('dpm++ 2m', Karras); a name without a schedule suffix comes back whole."""
    suffixes = [(word, s) for s in SCHEDULE_TYPES.values() for word in (s.label, s.name, *s.aliases)]
    for word, schedule in sorted(suffixes, key=lambda pair: -len(pair[0])):  # "SGM Uniform" before "Uniform"
        head = wanted.removesuffix(" " + word.lower())
        if head != wanted:
            return head, schedule
    return wanted, None
