"""Noise schedules: sigma sequences for a model trained on a discrete DDPM schedule."""

from __future__ import annotations

import torch

from webui.samplers.table import SCHEDULES


class DiscreteSchedule:
    """Maps between training timesteps t in [0, T-1] and noise levels sigma.

    Between integer timesteps log-sigma is interpolated linearly, as k-diffusion does.
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = alphas_cumprod.to(torch.float32)
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()

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
        log_sigma = sigma.float().log().to(self.log_sigmas.device)
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(self.log_sigmas) - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def automatic(self, steps: int) -> torch.Tensor:
        """`steps` sigmas at timesteps linspace(T-1, 0, steps), then a final 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, steps)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])


def make_sigmas(schedule: DiscreteSchedule, name: str, steps: int) -> torch.Tensor:
    if name == "Automatic":
        return schedule.automatic(steps)
    raise ValueError(f"unknown schedule type {name!r} (available: {', '.join(SCHEDULES)})")
