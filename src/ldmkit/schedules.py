"""Noise schedules: AUTOMATIC1111 1.10's schedule types as the sigma sequences a sampler steps through.

Each schedule maps (steps, the model's training sigmas) to a decreasing sequence of noise levels that
ends at the last level the sampler denoises to (0, or sigma_min for KL Optimal). The definitions are
A1111 1.10's (modules/sd_schedulers.py, k-diffusion's sampling.py), restated here from their formulas;
a model's sigma at a fractional timestep is interpolated in log sigma, as k-diffusion does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ldmkit.errors import InvalidRequest

# Align Your Steps (Sabour et al. 2024), NVIDIA's published 10-step sigmas (research.nvidia.com/labs/toronto-ai/
# AlignYourSteps/howto.html): SDXL's for SDXL models, SD 1.5's for every other, as A1111 uses them; other step
# counts interpolate them log-linearly.
AYS_SD15_SIGMAS = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
AYS_SDXL_SIGMAS = [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]
# The key of a scheduler config that names the model family (ldmkit.families) for schedules that differ by family;
# diffusers keeps "_"-prefixed keys in a scheduler's config without reading them.
FAMILY_KEY = "_ldmkit_family"
BETA_ALPHA = BETA_BETA = 0.6  # A1111's defaults for the Beta schedule (Lee et al. 2024, arXiv:2407.12173)
KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5


class ModelSigmas:
    """The model's training noise levels sigma(t) = sqrt((1 - alpha_bar_t) / alpha_bar_t), t = 0..T-1."""

    def __init__(self, alphas_cumprod: torch.Tensor, family: str = "sd"):
        self.family = family  # the model family ("sd", "sdxl"): Align Your Steps has a list for each
        alphas_cumprod = alphas_cumprod.double().cpu().numpy()
        self.sigmas = np.sqrt((1 - alphas_cumprod) / alphas_cumprod)  # increasing in t
        self.log_sigmas = np.log(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def t_max(self) -> float:
        return float(len(self.sigmas) - 1)

    def t_to_sigma(self, t: np.ndarray) -> np.ndarray:
        """Sigma at fractional timesteps, linear in log sigma between the integer ones."""
        return np.exp(np.interp(t, np.arange(len(self.sigmas)), self.log_sigmas))

    def sigma_to_t(self, sigma: np.ndarray) -> np.ndarray:
        """The inverse of t_to_sigma (log sigma increases with t)."""
        return np.interp(np.log(sigma), self.log_sigmas, np.arange(len(self.sigmas)))


def _with_zero(sigmas) -> np.ndarray:
    return np.append(np.asarray(sigmas, dtype=np.float64), 0.0)


def karras(n: int, model: ModelSigmas) -> np.ndarray:
    """Karras et al. 2022: sigma_max^(1/rho) to sigma_min^(1/rho) in equal steps, raised to rho."""
    ramp = np.linspace(0, 1, n)
    lo, hi = model.sigma_min ** (1 / KARRAS_RHO), model.sigma_max ** (1 / KARRAS_RHO)
    return _with_zero((hi + ramp * (lo - hi)) ** KARRAS_RHO)


def exponential(n: int, model: ModelSigmas) -> np.ndarray:
    """Equal steps in log sigma from sigma_max to sigma_min (A1111's Polyexponential at its rho 1 is this too)."""
    return _with_zero(np.exp(np.linspace(math.log(model.sigma_max), math.log(model.sigma_min), n)))


def uniform(n: int, model: ModelSigmas) -> np.ndarray:
    """n timesteps evenly spaced from the last training timestep to 0 (k-diffusion's default; A1111's Normal too)."""
    return _with_zero(model.t_to_sigma(np.linspace(model.t_max, 0, n)))


def sgm_uniform(n: int, model: ModelSigmas) -> np.ndarray:
    """n timesteps evenly spaced from the last training timestep, leaving out t = 0 (SGM's discretization)."""
    return _with_zero(model.t_to_sigma(np.linspace(model.t_max, 0, n + 1)[:-1]))


def kl_optimal(n: int, model: ModelSigmas) -> np.ndarray:
    """Sabour et al. 2024's KL-optimal schedule: equal steps in arctan(sigma); it ends at sigma_min, not 0."""
    frac = np.arange(n + 1) / n
    return np.tan(frac * math.atan(model.sigma_min) + (1 - frac) * math.atan(model.sigma_max))


def align_your_steps(n: int, model: ModelSigmas) -> np.ndarray:
    """NVIDIA's Align Your Steps sigmas for the model's family, interpolated in log sigma to n steps."""
    published = np.array(AYS_SDXL_SIGMAS if model.family == "sdxl" else AYS_SD15_SIGMAS)
    if n == len(published):
        return _with_zero(published)
    log_increasing = np.log(published[::-1])
    resampled = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(published)), log_increasing)
    return _with_zero(np.exp(resampled)[::-1])


def simple(n: int, model: ModelSigmas) -> np.ndarray:
    """Every (T/n)-th training sigma counted down from the last one (ComfyUI's and A1111's Simple)."""
    stride = len(model.sigmas) / n
    return _with_zero([model.sigmas[-(1 + int(i * stride))] for i in range(n)])


def ddim_timesteps(n: int, model: ModelSigmas) -> np.ndarray:
    """The training sigmas at t = 1, 1 + T//n, 1 + 2(T//n), ... below T, highest first (DDIM's uniform spacing).

    When T//n does not divide T - 1 this gives more than n steps, as A1111's DDIM schedule type does.
    """
    stride = max(len(model.sigmas) // n, 1)
    return _with_zero(model.sigmas[1::stride][::-1])


def beta(n: int, model: ModelSigmas) -> np.ndarray:
    """Lee et al. 2024: sigma_min + (sigma_max - sigma_min) * the Beta(0.6, 0.6) quantiles of 1 -> 0."""
    from scipy.special import betaincinv  # the Beta distribution's quantile function

    quantiles = betaincinv(BETA_ALPHA, BETA_BETA, 1 - np.linspace(0, 1, n))
    return _with_zero(model.sigma_min + quantiles * (model.sigma_max - model.sigma_min))


@dataclass(frozen=True)
class ScheduleType:
    name: str  # A1111's API name ("sgm_uniform")
    label: str  # A1111's label, as the infotext writes it ("SGM Uniform")
    sigmas: Callable[[int, ModelSigmas], np.ndarray] | None  # None: the sampler's own schedule
    aliases: tuple[str, ...] = ()


AUTOMATIC = ScheduleType("automatic", "Automatic", None)

SCHEDULE_TYPES: dict[str, ScheduleType] = {
    s.label: s
    for s in [
        AUTOMATIC,
        ScheduleType("uniform", "Uniform", uniform),
        ScheduleType("karras", "Karras", karras),
        ScheduleType("exponential", "Exponential", exponential),
        ScheduleType("polyexponential", "Polyexponential", exponential),
        ScheduleType("sgm_uniform", "SGM Uniform", sgm_uniform, aliases=("SGMUniform",)),
        ScheduleType("kl_optimal", "KL Optimal", kl_optimal),
        ScheduleType("align_your_steps", "Align Your Steps", align_your_steps),
        ScheduleType("simple", "Simple", simple),
        ScheduleType("normal", "Normal", uniform),
        ScheduleType("ddim", "DDIM", ddim_timesteps),
        ScheduleType("beta", "Beta", beta),
    ]
}


def find_schedule_type(name: str) -> ScheduleType | None:
    """A schedule type by label, API name or alias, ignoring case; None if there is none."""
    wanted = name.strip().lower()
    for schedule in SCHEDULE_TYPES.values():
        if wanted in (schedule.label.lower(), schedule.name, *(a.lower() for a in schedule.aliases)):
            return schedule
    return None


def get_schedule_type(name: str | None) -> ScheduleType:
    """A schedule type by name; None or '' is Automatic; an unknown name is refused."""
    if name is None or not name.strip():
        return AUTOMATIC
    schedule = find_schedule_type(name) if isinstance(name, str) else None
    if schedule is None:
        raise InvalidRequest(f"unknown schedule type {name!r}; choose one of: {', '.join(SCHEDULE_TYPES)}")
    return schedule
