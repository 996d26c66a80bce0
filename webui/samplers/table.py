"""The sampler names users type (A1111's), mapped to implementations.

Older clients send a sampler and schedule in one name (`Euler a Karras`); `resolve` splits them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

# No torch here: the page imports this table, and importing torch would delay start-up.
SCHEDULES = ("Automatic",)


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    function: str  # "module:function", imported on first use
    aliases: tuple[str, ...] = ()
    stochastic: bool = False

    @property
    def fn(self) -> Callable[..., object]:
        module, _, attr = self.function.partition(":")
        return getattr(importlib.import_module(module), attr)


SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("Euler a", "webui.samplers.kdiffusion:sample_euler_ancestral", aliases=("k_euler_a", "euler_ancestral"), stochastic=True),
    SamplerSpec("Euler", "webui.samplers.kdiffusion:sample_euler", aliases=("k_euler", "euler")),
)

_LEGACY_SCHEDULE_SUFFIXES = {"Karras": "Karras", "Exponential": "Exponential"}


def sampler_names() -> list[str]:
    return [s.name for s in SAMPLERS]


def resolve(sampler_name: str, schedule: str = "Automatic") -> tuple[SamplerSpec, str]:
    """(sampler, schedule type) for a user-typed name; raises ValueError naming the choices."""
    name = sampler_name.strip()
    for suffix, sched in _LEGACY_SCHEDULE_SUFFIXES.items():
        if name.endswith(" " + suffix):
            name, schedule = name[: -len(suffix) - 1], sched
    for spec in SAMPLERS:
        if name.lower() == spec.name.lower() or name.lower() in spec.aliases:
            if schedule not in SCHEDULES:
                raise ValueError(f"schedule type {schedule!r} is not available (available: {', '.join(SCHEDULES)})")
            return spec, schedule
    raise ValueError(f"unknown sampler {sampler_name!r} (available: {', '.join(sampler_names())})")
