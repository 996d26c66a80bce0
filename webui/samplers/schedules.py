"""Noise schedules: sigma sequences for a model trained on a discrete DDPM schedule.

Every schedule type returns a float32 CPU tensor of `steps` descending sigmas within the model's
[sigma_min, sigma_max] followed by a final 0. The names are A1111's "Schedule type" labels:

- Automatic / Uniform / Normal: timesteps evenly spaced from T-1 to 0 (log-sigma interpolated
  between integer timesteps). For a discrete model these three coincide, as they do in A1111.
- Karras: Karras et al. (2022), rho = 7, between the model's sigma_min and sigma_max.
- Exponential: evenly spaced in log sigma.
- Polyexponential: k-diffusion's polynomial in log sigma with rho = 1 (so equal to Exponential).
- SGM Uniform: `steps + 1` evenly spaced timesteps from T-1 to 0, the last one dropped.
- KL Optimal: tan of evenly spaced arctan(sigma) (Sabour et al. 2024, "Align Your Steps"
  appendix). A1111 runs it to sigma_min without a final 0; here it ends at sigma_min, then 0,
  like every other type.
- Align Your Steps: NVIDIA's published 10-step lists (SD1.5; SDXL for the SDXL family) log-linearly
  interpolated to `steps` points, then 0 (as A1111 does), clamped to the model's sigma range.
- Simple: every (T / steps)-th training sigma from the top (ComfyUI's / A1111's "Simple").
- DDIM: the DDIM sampler's "leading" timesteps 1 + k * (T // steps), k = steps-1 .. 0.
- Beta: Lee et al. (2024) "Beta Sampling is All You Need": beta(0.6, 0.6) quantiles of
  1 - linspace(0, 1, steps), mapped linearly onto [sigma_min, sigma_max] (A1111 and diffusers).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from webui.samplers.table import SCHEDULES, SamplerSpec, effective_schedule


class DiscreteSchedule:
    """Maps between training timesteps t in [0, T-1] and noise levels sigma.

    Between integer timesteps log-sigma is interpolated linearly, as k-diffusion does.
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = alphas_cumprod.to(torch.float32)
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self._log_sigmas_by_device: dict[torch.device, torch.Tensor] = {self.log_sigmas.device: self.log_sigmas}

    def _log_sigmas_on(self, device: torch.device) -> torch.Tensor:
        found = self._log_sigmas_by_device.get(device)
        if found is None:
            found = self._log_sigmas_by_device[device] = self.log_sigmas.to(device)
        return found

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float().clamp(0, len(self.sigmas) - 1)
        low = t.floor().long()
        high = t.ceil().long()
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timesteps of `sigma`, computed where `sigma` is (no copy off a GPU)."""
        log_sigmas = self._log_sigmas_on(sigma.device)
        log_sigma = sigma.float().log()
        dists = log_sigma - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def automatic(self, steps: int) -> torch.Tensor:
        """`steps` sigmas at timesteps linspace(T-1, 0, steps), then a final 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, steps)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])


class FlowSchedule(DiscreteSchedule):
    """A flow-matching model (SD3) as the samplers see it: sigma is the flow time t in (0, 1], the
    training table is t = i / T for i = 1..T bent by `shift` (t' = shift t / (1 + (shift - 1) t)),
    and the model's timestep is t * T. "Automatic" gives the `steps` times evenly spaced from 1
    down to 1/steps, shifted, then 0 (diffusers' and ComfyUI's flow schedule)."""

    def __init__(self, shift: float = 1.0, timesteps: int = 1000) -> None:
        self.shift = float(shift)
        self.timesteps = timesteps
        t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
        self.sigmas = self.shifted(t).to(torch.float32)
        self.log_sigmas = self.sigmas.log()
        self._log_sigmas_by_device = {self.log_sigmas.device: self.log_sigmas}

    def shifted(self, t: torch.Tensor) -> torch.Tensor:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.float() * self.timesteps

    def automatic(self, steps: int) -> torch.Tensor:
        t = torch.linspace(1, 1 / steps, steps, dtype=torch.float64)
        return torch.cat([self.shifted(t).to(torch.float32), torch.zeros(1)])


# Published by NVIDIA (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html): 10 steps.
AYS_SIGMAS = {
    "sd1": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def _finish(sigmas: torch.Tensor | np.ndarray | list[float]) -> torch.Tensor:
    s = torch.as_tensor(np.asarray(sigmas, dtype=np.float64)).to(torch.float32).flatten()
    return torch.cat([s, torch.zeros(1)])


def _karras(s: DiscreteSchedule, n: int, rho: float = 7.0) -> torch.Tensor:
    ramp = np.linspace(0, 1, n)
    lo, hi = s.sigma_min ** (1 / rho), s.sigma_max ** (1 / rho)
    return _finish((hi + ramp * (lo - hi)) ** rho)


def _exponential(s: DiscreteSchedule, n: int) -> torch.Tensor:
    return _finish(np.exp(np.linspace(math.log(s.sigma_max), math.log(s.sigma_min), n)))


def _polyexponential(s: DiscreteSchedule, n: int, rho: float = 1.0) -> torch.Tensor:
    ramp = np.linspace(1, 0, n) ** rho
    lo, hi = math.log(s.sigma_min), math.log(s.sigma_max)
    return _finish(np.exp(ramp * (hi - lo) + lo))


def _sgm_uniform(s: DiscreteSchedule, n: int) -> torch.Tensor:
    t = torch.linspace(len(s.sigmas) - 1, 0, n + 1)[:-1]
    return _finish(s.t_to_sigma(t))


def _kl_optimal(s: DiscreteSchedule, n: int) -> torch.Tensor:
    return _finish(np.tan(np.linspace(math.atan(s.sigma_max), math.atan(s.sigma_min), n)))


def _align_your_steps(s: DiscreteSchedule, n: int, family: str) -> torch.Tensor:
    published = np.array(AYS_SIGMAS.get(family, AYS_SIGMAS["sd1"]))
    # log-linear interpolation of the published list onto n points
    log_sigmas = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(published)), np.log(published[::-1]))
    sigmas = np.exp(log_sigmas)[::-1]
    return _finish(np.clip(sigmas, s.sigma_min, s.sigma_max))


def _simple(s: DiscreteSchedule, n: int) -> torch.Tensor:
    stride = len(s.sigmas) / n
    return _finish([float(s.sigmas[-(1 + int(k * stride))]) for k in range(n)])


def _ddim(s: DiscreteSchedule, n: int) -> torch.Tensor:
    stride = max(len(s.sigmas) // n, 1)
    t = (1 + stride * np.arange(n - 1, -1, -1)).clip(0, len(s.sigmas) - 1)
    return _finish(s.sigmas[torch.as_tensor(t)])


def _beta(s: DiscreteSchedule, n: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    from scipy import stats

    q = stats.beta.ppf(1 - np.linspace(0, 1, n), alpha, beta)
    return _finish(s.sigma_min + q * (s.sigma_max - s.sigma_min))


def make_sigmas(schedule: DiscreteSchedule, name: str, steps: int, family: str = "sd1") -> torch.Tensor:
    """`steps` sigmas of schedule type `name` for the model, then 0. `family` names the Align
    Your Steps list (a family's `ays_sigmas`: "sd1" or "sdxl"; any other name takes "sd1")."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1 (got {steps})")
    if name in ("Automatic", "Uniform", "Normal"):
        return schedule.automatic(steps)
    makers = {
        "Karras": _karras,
        "Exponential": _exponential,
        "Polyexponential": _polyexponential,
        "SGM Uniform": _sgm_uniform,
        "KL Optimal": _kl_optimal,
        "Simple": _simple,
        "DDIM": _ddim,
        "Beta": _beta,
    }
    if name == "Align Your Steps":
        return _align_your_steps(schedule, steps, family)
    if name in makers:
        return makers[name](schedule, steps)
    raise ValueError(f"unknown schedule type {name!r} (available: {', '.join(SCHEDULES)})")


def sampler_sigmas(
    schedule: DiscreteSchedule, spec: SamplerSpec, name: str, steps: int, family: str = "sd1"
) -> torch.Tensor:
    """The sigmas a sampler runs over, as A1111 prepares them: "Automatic" becomes the sampler's
    default schedule type, and samplers marked `discard_penultimate_sigma` (DPM2, DPM2 a,
    DPM++ 3M SDE) get `steps + 1` sigmas with the next-to-last removed."""
    name = effective_schedule(spec, name)
    if spec.discard_penultimate_sigma:
        sigmas = make_sigmas(schedule, name, steps + 1, family)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return make_sigmas(schedule, name, steps, family)
