"""AUTOMATIC1111's sampler noise options (eta, s_churn, s_tmin, s_tmax, s_noise): for each sampler, run, of no
effect, or refused by name.

Which sampler takes which is A1111 1.10's (modules/sd_samplers_kdiffusion.py and _timesteps.py): eta is the noise
of DDIM (default 0) and of the ancestral and SDE samplers (default 1); Karras et al.'s churn options go to Euler,
Heun and DPM2 only. Every other sampler ignores them, in A1111 as here (docs/server.md lists them). What ldmkit runs
is what diffusers' schedulers take: DDIMScheduler.step's eta, EulerDiscreteScheduler.step's churn options, and
ldmkit.samplers' ancestral step with eta for Euler a and for DDIM on a schedule type. The rest is refused when
not at A1111's default.
"""

from __future__ import annotations

import math

from ldmkit.errors import InvalidRequest

# A1111's default eta of each sampler that has one (eta_ddim 0, eta_ancestral 1).
DEFAULT_ETA = {
    "DDIM": 0.0,
    "Euler a": 1.0,
    "DPM2 a": 1.0,
    "DPM++ SDE": 1.0,
    "DPM++ 2M SDE": 1.0,
    "DPM++ 2M SDE Heun": 1.0,
    "DPM++ 3M SDE": 1.0,
}
RUNS_ETA = ("DDIM", "Euler a")
CHURN_SAMPLERS = ("Euler", "Heun", "DPM2")  # A1111 passes s_churn, s_tmin, s_tmax and s_noise to these
RUNS_CHURN = ("Euler",)
# The option names as A1111's infotext writes them (its 'Eta DDIM' for DDIM's).
CHURN_INFOTEXT = {"s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
CHURN_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
MAX_CHURN = 100.0  # A1111's slider; diffusers caps the churn of a step at sqrt(2) - 1 anyway


def check_values(eta, s_churn, s_tmin, s_tmax, s_noise) -> None:
    """The values' own ranges, whatever the sampler."""
    if eta is not None and not (_is_number(eta) and 0.0 <= eta <= 1.0):
        raise InvalidRequest(f"eta must be a number from 0 to 1, got {eta!r}")
    if not (_is_number(s_churn) and 0.0 <= s_churn <= MAX_CHURN):
        raise InvalidRequest(f"s_churn must be a number from 0 to {MAX_CHURN:g}, got {s_churn!r}")
    if not (_is_number(s_tmin) and s_tmin >= 0):
        raise InvalidRequest(f"s_tmin must be a number >= 0, got {s_tmin!r}")
    if not (_is_number(s_tmax, allow_inf=True) and s_tmax >= s_tmin):
        raise InvalidRequest(f"s_tmax must be a number >= s_tmin ({s_tmin}) or inf, got {s_tmax!r}")
    if not (_is_number(s_noise) and 0.0 <= s_noise <= 2.0):
        raise InvalidRequest(f"s_noise must be a number from 0 to 2, got {s_noise!r}")


def check_for_sampler(sampler, eta, s_churn) -> None:
    """Refuse, by name, an option this sampler has in A1111 but ldmkit cannot run; the others are run or ignored."""
    name = sampler.algorithm.name
    if name in DEFAULT_ETA and eta is not None and eta != DEFAULT_ETA[name]:
        if name not in RUNS_ETA:
            raise InvalidRequest(
                f"eta={eta!r} is not supported: {name} runs at A1111's default eta {DEFAULT_ETA[name]:g} only "
                "(diffusers' scheduler for it takes no eta)"
            )
    if name in CHURN_SAMPLERS and s_churn != 0 and name not in RUNS_CHURN:
        raise InvalidRequest(
            f"s_churn={s_churn!r} is not supported: {name} runs without churn (diffusers' scheduler for it takes "
            f"none); {', '.join(RUNS_CHURN)} runs it"
        )


def step_kwargs(sampler, eta, s_churn, s_tmin, s_tmax, s_noise) -> dict:
    """The keyword arguments of the scheduler's step() that run the options; {} for the defaults."""
    name = sampler.algorithm.name
    if name in RUNS_ETA and eta is not None and eta != DEFAULT_ETA[name]:
        return {"eta": eta}
    if name in RUNS_CHURN and s_churn != 0:
        return {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
    return {}


def infotext_params(sampler, eta, s_churn, s_tmin, s_tmax, s_noise) -> dict:
    """The options as A1111 writes them: those of this sampler that differ from its default."""
    name = sampler.algorithm.name
    params = {}
    if name in DEFAULT_ETA and eta is not None and eta != DEFAULT_ETA[name]:
        params["Eta DDIM" if name == "DDIM" else "Eta"] = eta
    if name in CHURN_SAMPLERS:
        values = {"s_churn": s_churn, "s_tmin": s_tmin, "s_tmax": s_tmax, "s_noise": s_noise}
        params.update({CHURN_INFOTEXT[k]: v for k, v in values.items() if v != CHURN_DEFAULTS[k]})
    return params


def _is_number(value, allow_inf: bool = False) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) or (allow_inf and value == math.inf)
