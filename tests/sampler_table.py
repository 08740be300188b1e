"""What each A1111 sampler name and schedule type must be, written independently of samplers.py and schedules.py.

EXPECTED says which diffusers scheduler and config each sampler name must produce; reference_sigmas restates
A1111 1.10's schedule types (modules/sd_schedulers.py) for SD's training sigmas. test_samplers.py checks the
registry against them, and test_parity.py builds diffusers' reference schedulers from them.
"""

import math

import numpy as np
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
from scipy import stats

KARRAS = {"use_karras_sigmas": True, "timestep_spacing": "linspace"}
EXPONENTIAL = {"use_exponential_sigmas": True, "timestep_spacing": "linspace"}
DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
SDE = {"algorithm_type": "sde-dpmsolver++"}

# A1111 name -> (diffusers class, config values it must have). 'Automatic' takes A1111 1.10's default
# schedule type where the sampler has one (Karras for DPM++ 2M/SDE and DPM2, Exponential for the
# multistep SDE ones); the others run the scheduler's own schedule for the model's config.
EXPECTED = {
    "Euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False, "timestep_spacing": "leading"}),
    "Euler a": (EulerAncestralDiscreteScheduler, {"timestep_spacing": "leading"}),
    "DDIM": (DDIMScheduler, {"timestep_spacing": "leading", "steps_offset": 1}),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
    "LMS": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
    "Heun": (HeunDiscreteScheduler, {"use_karras_sigmas": False}),
    "DPM2": (KDPM2DiscreteScheduler, KARRAS),
    "DPM2 a": (KDPM2AncestralDiscreteScheduler, KARRAS),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {**DPMPP, **KARRAS}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {**DPMPP, **KARRAS}),
    "DPM++ SDE": (DPMSolverSDEScheduler, KARRAS),
    "DPM++ 2M SDE": (DPMSolverMultistepScheduler, {**SDE, "solver_order": 2, **EXPONENTIAL}),
    "DPM++ 2M SDE Karras": (DPMSolverMultistepScheduler, {**SDE, "solver_order": 2, **KARRAS}),
    "DPM++ 2M SDE Heun": (
        DPMSolverMultistepScheduler,
        {**SDE, "solver_order": 2, "solver_type": "heun", **EXPONENTIAL},
    ),
    "DPM++ 3M SDE": (DPMSolverMultistepScheduler, {**SDE, "solver_order": 3, **EXPONENTIAL}),
    "UniPC": (UniPCMultistepScheduler, {"use_karras_sigmas": False}),
    "LCM": (LCMScheduler, {}),
}


def training_sigmas() -> np.ndarray:
    """sigma(t) for SD's scaled-linear betas (0.00085 .. 0.012, 1000 steps), t = 0..999."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def sigma_at(t):
    """k-diffusion's t_to_sigma: linear in log sigma between integer timesteps."""
    t = np.asarray(t, dtype=np.float64)
    low = np.floor(t).astype(int)
    high = np.minimum(low + 1, 999)
    log = np.log(training_sigmas())
    return np.exp((1 - (t - low)) * log[low] + (t - low) * log[high])


def reference_sigmas(schedule: str, n: int) -> np.ndarray:
    """A1111 1.10's schedule types, each from its definition; all but KL Optimal end at 0."""
    sigmas = training_sigmas()
    lo, hi = sigmas[0], sigmas[-1]
    if schedule == "Karras":
        levels = (hi ** (1 / 7) + np.linspace(0, 1, n) * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    elif schedule in ("Exponential", "Polyexponential"):
        levels = np.exp(np.linspace(np.log(hi), np.log(lo), n))
    elif schedule in ("Uniform", "Normal"):
        levels = sigma_at(np.linspace(999, 0, n))
    elif schedule == "SGM Uniform":
        levels = sigma_at(np.linspace(999, 0, n + 1)[:-1])
    elif schedule == "KL Optimal":
        return np.array([math.tan(i / n * math.atan(lo) + (1 - i / n) * math.atan(hi)) for i in range(n + 1)])
    elif schedule == "Align Your Steps":
        published = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        log_up = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, 11), np.log(published[::-1]))
        levels = np.array(published) if n == 11 else np.exp(log_up)[::-1]
    elif schedule == "Simple":
        levels = [sigmas[999 - int(i * 1000 / n)] for i in range(n)]
    elif schedule == "DDIM":
        levels = [sigmas[t] for t in range(1, 1000, 1000 // n)][::-1]
    elif schedule == "Beta":
        levels = lo + stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6) * (hi - lo)
    return np.append(levels, 0.0)
