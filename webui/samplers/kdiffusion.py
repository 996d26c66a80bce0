"""Samplers as short functions with one signature (the k-diffusion convention).

`denoiser(x, sigma) -> denoised` predicts the clean latent; `sigmas` runs from high to 0;
`noise(x)` draws fresh noise shaped like x (seeded per image by the caller); `callback` gets
the state after each step and may raise to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class StepState:
    step: int  # 0-based index of the step just finished
    total: int
    x: torch.Tensor
    sigma: torch.Tensor
    denoised: torch.Tensor


StepCallback = Callable[[StepState], None]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dsigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) for an ancestral step from sigma_from to sigma_to."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> torch.Tensor:
    n = len(sigmas) - 1
    for i in range(n):
        sigma = sigmas[i]
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + noise(x) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        denoised = denoiser(x, sigma_hat)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
        if callback:
            callback(StepState(i, n, x, sigma, denoised))
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    n = len(sigmas) - 1
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(x) * s_noise * sigma_up
        if callback:
            callback(StepState(i, n, x, sigmas[i], denoised))
    return x
