"""Sampler names people use (AUTOMATIC1111 style) -> configured diffusers schedulers.

One registry feeds the CLI's choices, the server's sampler list and the web UI's dropdown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ldmkit.errors import InvalidRequest


@dataclass(frozen=True)
class Sampler:
    name: str
    scheduler_class: type[SchedulerMixin]
    overrides: dict = field(default_factory=dict)
    stochastic: bool = False  # draws fresh noise each step: needs the per-image generators

    def make_scheduler(self, scheduler_config: dict) -> SchedulerMixin:
        """A fresh scheduler (they are stateful) built from the model's training noise schedule."""
        return self.scheduler_class.from_config(scheduler_config, **self.overrides)


_KARRAS = {"use_karras_sigmas": True}

SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in [
        Sampler("Euler", EulerDiscreteScheduler),
        Sampler("Euler a", EulerAncestralDiscreteScheduler, stochastic=True),
        Sampler("DDIM", DDIMScheduler),
        Sampler("PLMS", PNDMScheduler, {"skip_prk_steps": True}),
        Sampler("LMS", LMSDiscreteScheduler),
        Sampler("Heun", HeunDiscreteScheduler),
        Sampler("DPM2", KDPM2DiscreteScheduler),
        Sampler("DPM2 a", KDPM2AncestralDiscreteScheduler, stochastic=True),
        Sampler("DPM++ 2M", DPMSolverMultistepScheduler),
        Sampler("DPM++ 2M Karras", DPMSolverMultistepScheduler, _KARRAS),
        Sampler(
            "DPM++ 2M SDE Karras",
            DPMSolverMultistepScheduler,
            {**_KARRAS, "algorithm_type": "sde-dpmsolver++"},
            stochastic=True,
        ),
        Sampler("UniPC", UniPCMultistepScheduler),
    ]
}

DEFAULT_SAMPLER = "DPM++ 2M Karras"


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by name, ignoring case and surrounding spaces ("euler a" == "Euler a")."""
    wanted = name.strip().lower() if isinstance(name, str) else None
    for sampler in SAMPLERS.values():
        if sampler.name.lower() == wanted:
            return sampler
    raise InvalidRequest(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
