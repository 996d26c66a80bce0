"""The sampler names users type (A1111's), mapped to implementations.

Older clients send a sampler and schedule in one name (`Euler a Karras`); `resolve` splits them.

Each `SamplerSpec` lists the keyword options its function accepts (`options`), whether it draws
noise with its default options (`stochastic`), the schedule type "Automatic" stands for with it
(`default_schedule`, A1111's per-sampler choice), and whether it follows the schedule's steps at
all (`uses_schedule`: DPM fast and DPM adaptive only take the first and the last nonzero sigma
and place their own steps between them, as in k-diffusion and A1111).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# No torch here: the page imports this table, and importing torch would delay start-up.
SCHEDULES = (
    "Automatic",
    "Uniform",
    "Karras",
    "Exponential",
    "Polyexponential",
    "SGM Uniform",
    "KL Optimal",
    "Align Your Steps",
    "Simple",
    "Normal",
    "DDIM",
    "Beta",
)

_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_ANCESTRAL = ("eta", "s_noise")


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    function: str  # "module:function", imported on first use
    aliases: tuple[str, ...] = ()
    stochastic: bool = False  # draws noise with its default options
    options: tuple[str, ...] = ()  # keyword options the function accepts besides noise/callback
    default_schedule: str = "Automatic"  # what "Automatic" means for this sampler
    uses_schedule: bool = True  # False: only the first and last nonzero sigma are used
    discard_penultimate_sigma: bool = False  # A1111: make steps+1 sigmas and drop the next-to-last
    implementation: Callable[..., object] | None = None  # an extension's sampler function (else `function`)
    flow_function: str | None = None  # "module:function" for flow models (SD3), where it differs

    def fn_for(self, flow: bool) -> Callable[..., object]:
        if flow and self.flow_function is not None:
            module, _, attr = self.flow_function.partition(":")
            return getattr(importlib.import_module(module), attr)
        return self.fn

    @property
    def fn(self) -> Callable[..., object]:
        if self.implementation is not None:
            return self.implementation
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)


_K = "webui.samplers.kdiffusion:"

SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("Euler a", _K + "sample_euler_ancestral", aliases=("k_euler_a", "k_euler_ancestral", "euler_ancestral"),
                stochastic=True, options=_ANCESTRAL, flow_function=_K + "sample_euler_ancestral_flow"),
    SamplerSpec("Euler", _K + "sample_euler", aliases=("k_euler", "euler"), options=_CHURN),
    SamplerSpec("LMS", _K + "sample_lms", aliases=("k_lms", "lms"), options=("order",)),
    SamplerSpec("Heun", _K + "sample_heun", aliases=("k_heun", "heun"), options=_CHURN),
    SamplerSpec("DPM2", _K + "sample_dpm_2", aliases=("k_dpm_2", "dpm_2"), options=_CHURN,
                default_schedule="Karras", discard_penultimate_sigma=True),
    SamplerSpec("DPM2 a", _K + "sample_dpm_2_ancestral", aliases=("k_dpm_2_a", "dpm_2_ancestral"), stochastic=True,
                options=_ANCESTRAL, default_schedule="Karras", discard_penultimate_sigma=True),
    SamplerSpec("DPM++ 2S a", _K + "sample_dpmpp_2s_ancestral", aliases=("k_dpmpp_2s_a", "dpmpp_2s_ancestral"),
                stochastic=True, options=_ANCESTRAL, default_schedule="Karras"),
    SamplerSpec("DPM++ 2M", _K + "sample_dpmpp_2m", aliases=("k_dpmpp_2m", "dpmpp_2m"), default_schedule="Karras"),
    SamplerSpec("DPM++ SDE", _K + "sample_dpmpp_sde", aliases=("k_dpmpp_sde", "dpmpp_sde"), stochastic=True,
                options=("eta", "s_noise", "r"), default_schedule="Karras"),
    SamplerSpec("DPM++ 2M SDE", _K + "sample_dpmpp_2m_sde", aliases=("k_dpmpp_2m_sde", "dpmpp_2m_sde"),
                stochastic=True, options=("eta", "s_noise", "solver_type"), default_schedule="Exponential"),
    SamplerSpec("DPM++ 2M SDE Heun", _K + "sample_dpmpp_2m_sde_heun", aliases=("k_dpmpp_2m_sde_heun",),
                stochastic=True, options=("eta", "s_noise"), default_schedule="Exponential"),
    SamplerSpec("DPM++ 3M SDE", _K + "sample_dpmpp_3m_sde", aliases=("k_dpmpp_3m_sde", "dpmpp_3m_sde"),
                stochastic=True, options=_ANCESTRAL, default_schedule="Exponential", discard_penultimate_sigma=True),
    SamplerSpec("DPM fast", _K + "sample_dpm_fast", aliases=("k_dpm_fast", "dpm_fast"), stochastic=True,
                options=_ANCESTRAL, uses_schedule=False),
    SamplerSpec("DPM adaptive", _K + "sample_dpm_adaptive", aliases=("k_dpm_ad", "k_dpm_adaptive", "dpm_adaptive"),
                stochastic=True, uses_schedule=False,
                options=("eta", "s_noise", "order", "rtol", "atol", "h_init", "pcoeff", "icoeff", "dcoeff",
                         "accept_safety")),
    SamplerSpec("Restart", _K + "sample_restart", aliases=("restart",), stochastic=True,
                options=("s_noise", "restart_list"), default_schedule="Karras"),  # deterministic under 20 steps
    SamplerSpec("DDIM", _K + "sample_ddim", aliases=("ddim",), options=_ANCESTRAL, default_schedule="DDIM"),
    SamplerSpec("PLMS", _K + "sample_plms", aliases=("plms",), default_schedule="DDIM"),
    SamplerSpec("UniPC", _K + "sample_unipc", aliases=("unipc", "uni_pc"),
                options=("order", "variant", "lower_order_final")),
    SamplerSpec("LCM", _K + "sample_lcm", aliases=("k_lcm", "lcm"), stochastic=True),
)

# Legacy combined names: "<sampler> <schedule label>"; longest labels first ("SGM Uniform"
# before "Uniform").
# Schedule types older A1111 versions folded into the sampler name ("DPM++ 2M Karras"), by the
# spelling found there (lower case), longest first; "SGMUniform" is an old spelling.
_LEGACY_SUFFIXES = dict(sorted({**{s.lower(): s for s in SCHEDULES if s != "Automatic"},
                                "sgmuniform": "SGM Uniform"}.items(), key=lambda kv: -len(kv[0])))


def split_sampler_name(name: str) -> tuple[str, str | None]:
    """`"DPM++ 2M Karras"` -> `("DPM++ 2M", "Karras")`; a name without a schedule suffix comes back
    unchanged with None. Works on any name, known to the sampler table or not (the one splitter:
    requests, settings and infotext all use it)."""
    name = name.strip()
    lowered = name.lower()
    for suffix, schedule in _LEGACY_SUFFIXES.items():
        if lowered.endswith(" " + suffix):
            base = name[: -len(suffix) - 1].rstrip()
            if base:
                return base, schedule
    return name, None


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def find_sampler(name: str, extra: Sequence[SamplerSpec] = ()) -> SamplerSpec | None:
    key = name.strip().lower()
    for spec in (*SAMPLERS, *extra):
        if key == spec.name.lower() or key in spec.aliases:
            return spec
    return None


def effective_schedule(spec: SamplerSpec, schedule: str) -> str:
    """The schedule type actually used: "Automatic" means the sampler's default."""
    return spec.default_schedule if schedule == "Automatic" else schedule


def _schedule_label(schedule: str) -> str:
    key = schedule.strip().lower().replace("_", " ")  # A1111's API names: "sgm_uniform", "align_your_steps"
    for label in SCHEDULES:
        if key == label.lower():
            return label
    raise ValueError(f"schedule type {schedule!r} is not available (available: {', '.join(SCHEDULES)})")


def resolve(sampler_name: str, schedule: str = "Automatic", extra: Sequence[SamplerSpec] = ()) -> tuple[SamplerSpec, str]:
    """(sampler, schedule type) for a user-typed name; raises ValueError naming the choices.

    A legacy suffix ("DPM++ 2M Karras") sets the schedule type, overriding `schedule` as A1111
    does. "Automatic" is returned as is; `effective_schedule` says what it stands for."""
    name = sampler_name.strip()
    spec = find_sampler(name, extra)
    if spec is None:
        base, suffix = split_sampler_name(name)
        if suffix is not None and (spec := find_sampler(base, extra)) is not None:
            schedule = suffix
    if spec is None:
        names = [*sampler_names(), *(e.name for e in extra)]
        raise ValueError(f"unknown sampler {sampler_name!r} (available: {', '.join(names)})")
    return spec, _schedule_label(schedule)
