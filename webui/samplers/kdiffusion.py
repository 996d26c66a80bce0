"""Samplers as short functions with one signature (the k-diffusion convention).

`denoiser(x, sigma) -> denoised` predicts the clean latent; `sigmas` runs from high to 0;
`noise(x)` draws fresh noise shaped like x (seeded per image by the caller); `callback` gets
the state after each step and may raise to stop.

All randomness comes from `noise`, never from torch's global generator, so a seed gives the same
result on any device. Every sampler calls `callback` exactly once per step of `sigmas`, in order
(the runner advances the prompt schedule from it); samplers with several model calls per step
report once per step, DPM fast once per model call (it makes exactly one per step) and DPM
adaptive by position (see its docstring).

The update rules follow the published algorithms, with k-diffusion (MIT) as the reference for
the Karras-style samplers: Euler / Heun (Karras et al. 2022), DPM2, LMS, DPM-Solver and
DPM-Solver++ (Lu et al. 2022), Restart (Xu et al. 2023), DDIM (Song et al. 2021), PLMS (Liu et
al. 2022), UniPC (Zhao et al. 2023), LCM (Luo et al. 2023). Where k-diffusion uses a Brownian
tree (DPM++ SDE, 2M SDE, 3M SDE) the noise comes from `noise` instead; see each sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from webui.extensions.api import SamplerStep

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


StepCallback = Callable[[SamplerStep], None]  # the one step type, the extension API's


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
    s = _floats(sigmas)  # tests on numbers: comparing a GPU tensor would wait for the GPU
    for i in range(n):
        sigma = sigmas[i]
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= s[i] <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = x + noise(x) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
        denoised = denoiser(x, sigma_hat)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
        if callback:
            callback(SamplerStep(i, n, x, sigma, denoised))
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    n = len(sigmas) - 1
    s = _floats(sigmas)
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if s[i + 1] > 0:
            x = x + noise(x) * s_noise * sigma_up
        if callback:
            callback(SamplerStep(i, n, x, sigmas[i], denoised))
    return x


def sample_euler_ancestral_flow(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral for a flow model (x_s = (1 - s) x0 + s noise, sigma = s in (0, 1]).

    It is the ancestral step above taken in the equivalent variance-exploding variables
    y = x / (1 - s), sigma_ve = s / (1 - s), and written back: with eps the noise the model's x0
    implies, x' = (1 - s') x0 + s' (sqrt(1 - u^2) eps + u noise), where u = sigma_up / sigma_ve'
    = min(1, eta sqrt(1 - r^2)) and r = sigma_ve' / sigma_ve. At s = 1 (sigma_ve infinite) r is 0:
    the first step re-noises all of its noise, as ancestral sampling does from pure noise."""
    n = len(sigmas) - 1
    s = _floats(sigmas)
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        t, t_next = s[i], s[i + 1]
        if t_next <= 0:
            x = denoised
        else:
            eps = (x - (1 - t) * denoised) / t
            r = t_next * (1 - t) / (t * (1 - t_next))
            u = min(1.0, eta * math.sqrt(max(0.0, 1 - r * r)))
            x = (1 - t_next) * denoised + t_next * (math.sqrt(1 - u * u) * eps + u * s_noise * noise(x))
        if callback:
            callback(SamplerStep(i, n, x, sigmas[i], denoised))
    return x


# --- helpers for the samplers below -------------------------------------------------------------
#
# Step sizes and coefficients are computed in float64 on the CPU from the sigma list (one copy
# per call) and applied to the float32 latents; model calls get a float32 0-dim sigma tensor on
# the latents' device.


def _floats(sigmas: torch.Tensor) -> list[float]:
    return [float(s) for s in sigmas.detach().to("cpu", torch.float64)]


def _sigma(x: torch.Tensor, value: float) -> torch.Tensor:
    # filled on the device by a kernel: a tensor made from a number and copied there would make
    # the host wait for the GPU at every model call
    return torch.full((), value, dtype=torch.float32, device=x.device)


def _report(callback: StepCallback | None, i: int, n: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback:
        callback(SamplerStep(i, n, x, sigma, denoised))


def _churn(x: torch.Tensor, sigma: float, n: int, noise: NoiseFn, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float) -> tuple[torch.Tensor, float]:
    """Karras et al. (2022) Algorithm 2 "churn": raise the noise level to sigma_hat first."""
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise(x) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _ancestral(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) in floats; see `ancestral_step`."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


# --- first and second order ODE samplers (Karras et al. 2022; k-diffusion) ----------------------


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 2); the last step to sigma 0 is an Euler step."""
    s = _floats(sigmas)
    n = len(s) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, s[i], n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, _sigma(x, sigma_hat))
        d = to_d(x, sigma_hat, denoised)
        dt = s[i + 1] - sigma_hat
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, s[i + 1], denoiser(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_dpm_2(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-2 style midpoint steps (midpoint in log sigma); Euler for the step to 0."""
    s = _floats(sigmas)
    n = len(s) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, s[i], n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoiser(x, _sigma(x, sigma_hat))
        d = to_d(x, sigma_hat, denoised)
        if s[i + 1] == 0:
            x = x + d * (s[i + 1] - sigma_hat)
        else:
            sigma_mid = math.exp((math.log(sigma_hat) + math.log(s[i + 1])) / 2)
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, _sigma(x, sigma_mid)))
            x = x + d_2 * (s[i + 1] - sigma_hat)
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM2 midpoint steps down to sigma_down, then fresh noise up to the next sigma."""
    s = _floats(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        sigma_down, sigma_up = _ancestral(s[i], s[i + 1], eta)
        d = to_d(x, s[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - s[i])
        else:
            sigma_mid = math.exp((math.log(s[i]) + math.log(sigma_down)) / 2)
            x_2 = x + d * (sigma_mid - s[i])
            d_2 = to_d(x_2, sigma_mid, denoiser(x_2, _sigma(x, sigma_mid)))
            x = x + d_2 * (sigma_down - s[i])
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + noise(x) * s_noise * sigma_up
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


def lms_coefficients(s: list[float], i: int, order: int) -> list[float]:
    """Linear multistep coefficients for the step s[i] -> s[i+1] from the derivatives at
    s[i], s[i-1], ..., s[i-order+1]: the integrals of the Lagrange basis polynomials over the
    step (computed exactly; k-diffusion uses scipy.integrate.quad on the same integrands)."""
    nodes = [s[i - k] for k in range(order)]
    coeffs = []
    for j in range(order):
        basis = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != j:
                basis = basis * np.polynomial.Polynomial([-nodes[k], 1.0]) / (nodes[j] - nodes[k])
        integral = basis.integ()
        coeffs.append(float(integral(s[i + 1]) - integral(s[i])))
    return coeffs


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep in sigma over the last `order` derivatives (k-diffusion's LMS)."""
    s = _floats(sigmas)
    n = len(s) - 1
    ds: list[torch.Tensor] = []
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        ds = [to_d(x, s[i], denoised), *ds][:order]
        coeffs = lms_coefficients(s, i, len(ds))
        x = x + sum(c * d for c, d in zip(coeffs, ds))
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


# --- DPM-Solver++ family (Lu et al. 2022), in lambda = -log(sigma) --------------------------------


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) single-step second order down to sigma_down, then ancestral noise."""
    s = _floats(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        sigma_down, sigma_up = _ancestral(s[i], s[i + 1], eta)
        if sigma_down == 0:
            x = denoised  # the Euler step to sigma 0
        else:
            h = math.log(s[i]) - math.log(sigma_down)
            sigma_mid = math.exp(math.log(s[i]) - h / 2)
            x_2 = (sigma_mid / s[i]) * x - math.expm1(-h / 2) * denoised
            denoised_2 = denoiser(x_2, _sigma(x, sigma_mid))
            x = (sigma_down / s[i]) * x - math.expm1(-h) * denoised_2
        if s[i + 1] > 0 and sigma_up > 0:
            x = x + noise(x) * s_noise * sigma_up
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
) -> torch.Tensor:
    """DPM-Solver++ (stochastic, two stages per step; k-diffusion's "DPM++ SDE").

    The two stages need Brownian increments over [sigma, sigma_s] and [sigma, sigma_next] of one
    path (k-diffusion samples them from a Brownian tree in sigma). Here each step draws two fresh
    normals from `noise`, for [sigma, sigma_s] and [sigma_s, sigma_next], and builds both
    increments from them: the same joint distribution as the tree, so the same sampler in law;
    only the path a given seed produces differs (and, unlike a tree, it is not shared between
    runs with different step counts)."""
    s = _floats(sigmas)
    n = len(s) - 1
    fac = 1 / (2 * r)
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            lam, lam_next = -math.log(s[i]), -math.log(s[i + 1])
            h = lam_next - lam
            sigma_s = math.exp(-(lam + h * r))
            # unit-variance Brownian increments over [sigma, sigma_s] and [sigma, sigma_next]
            z_a, z_b = (noise(x), noise(x)) if eta else (0.0, 0.0)
            span_a, span_b = s[i] - sigma_s, sigma_s - s[i + 1]
            z_1 = z_a
            z_2 = (span_a**0.5 * z_a + span_b**0.5 * z_b) / (span_a + span_b) ** 0.5
            # stage 1: to the intermediate level sigma_s (ancestral)
            sd, su = _ancestral(s[i], sigma_s, eta)
            x_2 = (sd / s[i]) * x - (sd / s[i] - 1) * denoised + z_1 * s_noise * su
            denoised_2 = denoiser(x_2, _sigma(x, sigma_s))
            # stage 2: the full step with the combined estimate (ancestral)
            sd, su = _ancestral(s[i], s[i + 1], eta)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sd / s[i]) * x - (sd / s[i] - 1) * denoised_d + z_2 * s_noise * su
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M): second-order multistep; first order for the first and the last step."""
    s = _floats(sigmas)
    n = len(s) - 1
    old_denoised = None
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            estimate = denoised
            if old_denoised is not None:
                r = (math.log(s[i - 1]) - math.log(s[i])) / h
                estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * estimate
        old_denoised = denoised
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint",
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE; `solver_type` "midpoint" (A1111's "DPM++ 2M SDE") or "heun".

    Noise: one fresh draw per step from `noise` instead of k-diffusion's Brownian tree (each
    step's increment is independent either way; only the path per seed differs)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun' (got {solver_type!r})")
    s = _floats(sigmas)
    n = len(s) - 1
    old_denoised, h_last = None, None
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = (s[i + 1] / s[i]) * math.exp(-eta_h) * x + phi * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(x) * s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
            h_last = h
        old_denoised = denoised
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


def sample_dpmpp_2m_sde_heun(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """A1111's "DPM++ 2M SDE Heun": the 2M SDE sampler with the Heun-type correction."""
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, noise=noise, callback=callback, eta=eta, s_noise=s_noise,
                               solver_type="heun")


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep (lower order while warming up).
    Noise: one fresh draw per step from `noise` (no Brownian tree), as in `sample_dpmpp_2m_sde`."""
    s = _floats(sigmas)
    n = len(s) - 1
    den_1 = den_2 = None  # the previous two denoised estimates
    h_1 = h_2 = None  # the previous two step sizes in lambda
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - den_1) / r0
                d1_1 = (den_1 - den_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - den_1) / (h_1 / h)
            if eta:
                x = x + noise(x) * s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
            h_1, h_2 = h, h_1
        den_1, den_2 = denoised, den_1
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


# --- DPM-Solver with its own step placement: DPM fast and DPM adaptive ----------------------------


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps (Lu et al. 2022) in t = -log(sigma), eps-parameterised,
    with the model calls cached per step. `on_eval(x, sigma, denoised)` sees every model call."""

    def __init__(self, denoiser: Denoiser, on_eval: Callable[[torch.Tensor, float, torch.Tensor], None] | None = None):
        self.denoiser = denoiser
        self.on_eval = on_eval
        self.nfe = 0

    def eps(self, cache: dict[str, torch.Tensor], key: str, x: torch.Tensor, t: float) -> torch.Tensor:
        if key not in cache:
            sigma = math.exp(-t)
            denoised = self.denoiser(x, _sigma(x, sigma))
            self.nfe += 1
            if self.on_eval:
                self.on_eval(x, sigma, denoised)
            cache[key] = (x - denoised) / sigma
        return cache[key]

    def step_1(self, x: torch.Tensor, t: float, t_next: float, cache: dict) -> torch.Tensor:
        h = t_next - t
        return x - math.exp(-t_next) * math.expm1(h) * self.eps(cache, "eps", x, t)

    def step_2(self, x: torch.Tensor, t: float, t_next: float, cache: dict, r1: float = 0.5) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        sig = math.exp(-t_next)
        return x - sig * math.expm1(h) * eps - sig / (2 * r1) * math.expm1(h) * (eps_r1 - eps)

    def step_3(self, x: torch.Tensor, t: float, t_next: float, cache: dict, r1: float = 1 / 3, r2: float = 2 / 3) -> torch.Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - math.exp(-s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - math.exp(-s2) * math.expm1(r2 * h) * eps
              - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        sig = math.exp(-t_next)
        return x - sig * math.expm1(h) * eps - sig / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)

    def ancestral_target(self, t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
        """(t to solve to, noise to add after) for an ancestral step from t to t_next."""
        if not eta:
            return t_next, 0.0
        sd, _ = _ancestral(math.exp(-t), math.exp(-t_next), eta)
        t_down = min(t_end, -math.log(sd))
        return t_down, max(math.exp(-2 * t_next) - math.exp(-2 * t_down), 0.0) ** 0.5


def _nonzero_range(sigmas: torch.Tensor) -> tuple[float, float]:
    s = [v for v in _floats(sigmas) if v > 0]
    if not s:
        raise ValueError("DPM fast/adaptive need at least one nonzero sigma")
    return min(s), max(s)


@torch.no_grad()
def sample_dpm_fast(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-Fast: exactly `len(sigmas) - 1` model calls spread over order-3 steps evenly
    spaced in log sigma from the first to the last nonzero sigma (the schedule's inner points are
    not used; the result keeps that last sigma's noise level, as in k-diffusion). Progress: one
    callback per model call, so one per planned step. eta defaults to 1 as in A1111, which passes
    its "eta (ancestral)" setting to this sampler."""
    n = len(sigmas) - 1
    if n < 1:
        return x
    sigma_min, sigma_max = _nonzero_range(sigmas)
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    calls = 0

    def on_eval(xe: torch.Tensor, sigma: float, denoised: torch.Tensor) -> None:
        nonlocal calls
        _report(callback, calls, n, xe, _sigma(xe, sigma), denoised)
        calls += 1

    solver = _DPMSolver(denoiser, on_eval)
    m = n // 3 + 1
    ts = np.linspace(t_start, t_end, m + 1).tolist()
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_to, noise_up = solver.ancestral_target(t, t_next, t_end, eta)
        cache: dict[str, torch.Tensor] = {}
        x = (solver.step_1, solver.step_2, solver.step_3)[order - 1](x, t, t_to, cache)
        if noise_up > 0:
            x = x + noise(x) * s_noise * noise_up
    return x


class _PIDStepSize:
    """PID step-size controller for the adaptive solver (as in k-diffusion's DPM adaptive)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1 / (error + 1e-8)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 1.0, s_noise: float = 1.0, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
    h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81,
) -> torch.Tensor:
    """DPM-Solver-12/23 with adaptive step size from the first to the last nonzero sigma.

    It makes as many model calls as its error control needs (`order` per attempted step), so the
    planned steps are reported by position instead: planned step k counts as done once the
    solver's noise level has come down to sigmas[k + 1]; after each accepted step every planned
    step passed is reported, in order, and whatever is left is reported at the end. The callback
    thus still runs exactly once per planned step. eta defaults to 1 as in A1111."""
    if order not in (2, 3):
        raise ValueError(f"order must be 2 or 3 (got {order})")
    s = _floats(sigmas)
    n = len(s) - 1
    if n < 1:
        return x
    sigma_min, sigma_max = _nonzero_range(sigmas)
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    solver = _DPMSolver(denoiser)
    pid = _PIDStepSize(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    reported = 0
    t_cur = t_start
    x_prev = x
    last_denoised = None

    def report_passed(x: torch.Tensor, sigma_now: float, final: bool = False) -> None:
        nonlocal reported
        while reported < n and (final or sigma_now <= s[reported + 1] * (1 + 1e-6)):
            _report(callback, reported, n, x, _sigma(x, sigma_now), last_denoised if last_denoised is not None else x)
            reported += 1

    while t_cur < t_end - 1e-5:
        t_next = min(t_end, t_cur + pid.h)
        t_to, noise_up = solver.ancestral_target(t_cur, t_next, t_end, eta)
        cache: dict[str, torch.Tensor] = {}
        eps = solver.eps(cache, "eps", x, t_cur)
        last_denoised = x - math.exp(-t_cur) * eps
        if order == 2:
            x_low = solver.step_1(x, t_cur, t_to, cache)
            x_high = solver.step_2(x, t_cur, t_to, cache)
        else:
            x_low = solver.step_2(x, t_cur, t_to, cache, r1=1 / 3)
            x_high = solver.step_3(x, t_cur, t_to, cache)
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_prev.abs()), min=atol)
        error = float(torch.linalg.norm((x_low - x_high) / delta)) / x.numel() ** 0.5
        # a non-finite error (the model returned inf/NaN) is accepted as is, so the sampler ends
        # with a non-finite result like the others instead of shrinking the step forever
        if not math.isfinite(error) or pid.propose(error):
            x_prev = x_low
            x = x_high + (noise(x_high) * s_noise * noise_up if noise_up > 0 else 0)
            t_cur = t_next
            report_passed(x, math.exp(-t_cur))
    report_passed(x, math.exp(-t_cur), final=True)
    return x


# --- Restart (Xu et al. 2023) ---------------------------------------------------------------------


def _resample_log(s: list[float], m: int) -> list[float]:
    """`m` sigmas following the shape of the nonzero sigmas `s` (log-linear interpolation over
    their index), then 0."""
    nonzero = np.log(np.array([v for v in s if v > 0]))
    pos = np.linspace(0, len(nonzero) - 1, m)
    return [*np.exp(np.interp(pos, np.arange(len(nonzero)), nonzero)).tolist(), 0.0]


def _karras_list(m: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    ramp = np.linspace(0, 1, m)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return ((hi + ramp * (lo - hi)) ** rho).tolist()


@torch.no_grad()
def sample_restart(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    s_noise: float = 1.0, restart_list: dict[float, tuple[int, int, float]] | None = None,
) -> torch.Tensor:
    """Restart sampling: Heun ODE steps, and K times a jump back up from sigma_lo to sigma_hi
    with fresh noise followed by Heun steps down again.

    `restart_list` maps sigma_lo -> (restart steps, K, sigma_hi), each sigma snapped to the
    nearest sigma of the main schedule. Without it (A1111's defaults): under 20 steps no restarts
    (plain Heun); from 20 steps one restart of 9 steps, from 36 steps two of steps // 4, between
    0.1 and 2; the main schedule then has `steps - restart steps` steps, resampled
    log-linearly from the given sigmas so the chosen schedule type keeps its shape (A1111 uses a
    Karras schedule here), and each restart segment is a Karras (rho 7) schedule. Every Heun
    step counts as one step, so the callback runs once per planned step in the default setup."""
    s = _floats(sigmas)
    n = len(s) - 1
    if restart_list is None:
        restart_list = {}
        if n >= 20:
            steps, times = (n // 4, 2) if n >= 36 else (9, 1)
            s = _resample_log(s, n - steps * times)
            restart_list = {0.1: (steps, times, 2.0)}
    main = np.array(s)
    plan: list[tuple[float, float]] = []
    restarts = {int(np.abs(main - lo).argmin()): v for lo, v in restart_list.items()}
    for i in range(len(s) - 1):
        plan.append((s[i], s[i + 1]))
        if i + 1 in restarts:
            steps, times, hi = restarts[i + 1]
            hi_idx = int(np.abs(main - hi).argmin())
            if hi_idx < i + 1:
                segment = _karras_list(steps + 1, s[i + 1], s[hi_idx])
                plan += list(zip(segment[:-1], segment[1:])) * times
    total = len(plan)
    current = plan[0][0]
    for k, (sigma, sigma_next) in enumerate(plan):
        if sigma > current:  # a restart: noise back up to sigma
            x = x + noise(x) * s_noise * (sigma**2 - current**2) ** 0.5
        denoised = denoiser(x, _sigma(x, sigma))
        d = to_d(x, sigma, denoised)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigma_next, denoiser(x_2, _sigma(x, sigma_next)))
            x = x + (d + d_2) / 2 * dt
        current = sigma_next
        _report(callback, k, total, x, _sigma(x, sigma), denoised)
    return x


# --- the DDPM-era samplers, over sigmas ----------------------------------------------------------


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    eta: float = 0.0, s_noise: float = 1.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021) in the sigma parameterisation x/sqrt(alpha_bar): with eta = 0 the
    update x' = denoised + sigma' * eps is exactly an Euler step of the probability-flow ODE; with
    eta > 0 DDIM's added variance is the ancestral step's sigma_up scaled by eta."""
    s = _floats(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        sigma_down, sigma_up = _ancestral(s[i], s[i + 1], eta)
        x = denoised + to_d(x, s[i], denoised) * sigma_down
        if sigma_up > 0:
            x = x + noise(x) * s_noise * sigma_up
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_plms(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
) -> torch.Tensor:
    """PLMS (Liu et al. 2022, pseudo linear multistep): DDIM steps driven by an Adams-Bashforth
    combination of the last four eps predictions; the first step is a pseudo improved Euler step
    (one extra model call) and steps 2-3 use the lower-order formulas."""
    s = _floats(sigmas)
    n = len(s) - 1
    eps_hist: list[torch.Tensor] = []
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        eps = to_d(x, s[i], denoised)
        if not eps_hist and s[i + 1] > 0:
            x_next = x + eps * (s[i + 1] - s[i])
            eps_next = to_d(x_next, s[i + 1], denoiser(x_next, sigmas[i + 1]))
            eps_prime = (eps + eps_next) / 2
        elif not eps_hist:  # a single step straight to sigma 0
            eps_prime = eps
        elif len(eps_hist) == 1:
            eps_prime = (3 * eps - eps_hist[-1]) / 2
        elif len(eps_hist) == 2:
            eps_prime = (23 * eps - 16 * eps_hist[-1] + 5 * eps_hist[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * eps_hist[-1] + 37 * eps_hist[-2] - 9 * eps_hist[-3]) / 24
        eps_hist = [*eps_hist, eps][-3:]
        x = x + eps_prime * (s[i + 1] - s[i])
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


def _unipc_coefficients(rks: list[float], h: float, order: int, variant: str) -> tuple[float, np.ndarray, np.ndarray]:
    """(B(h), R, b) of UniPC's linear system for the data-prediction solver, hh = -h."""
    hh = -h
    h_phi_k = math.expm1(hh) / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    factorial = 1
    rows, b = [], []
    r = np.array([*rks, 1.0])
    for k in range(1, order + 1):
        rows.append(r ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b_h, np.array(rows), np.array(b)


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
    order: int = 3, variant: str = "bh2", lower_order_final: bool = True,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): the UniP predictor and UniC corrector on the data prediction,
    multistep with warm-up. The corrector for step i reuses the model call made at the new point
    for step i + 1, so there is one model call per step; the final step is not corrected.
    `lower_order_final` lowers the order near the end (order <= steps left), as diffusers does."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2' (got {variant!r})")
    if order < 1:
        raise ValueError(f"order must be at least 1 (got {order})")
    s = _floats(sigmas)
    n = len(s) - 1
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    outs: list[torch.Tensor] = []  # denoised estimates, newest last
    last_x: torch.Tensor | None = None
    last_order = 0
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        if last_x is not None:
            # UniC: correct x_i using the model output just computed at it
            h = lam[i] - lam[i - 1]
            m0 = outs[-1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, last_order)]
            d1s = [(outs[-1 - k] - m0) / rks[k - 1] for k in range(1, last_order)]
            b_h, R, b = _unipc_coefficients(rks, h, last_order, variant)
            rhos = [0.5] if last_order == 1 else np.linalg.solve(R, b).tolist()
            x_base = (s[i] / s[i - 1]) * last_x - math.expm1(-h) * m0
            corr = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
            x = x_base - b_h * (corr + rhos[-1] * (denoised - m0))
        outs = [*outs, denoised][-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)
        last_x, last_order = x, this_order
        if s[i + 1] == 0:
            x = denoised  # any order's predictor lands on the data prediction at sigma 0
        else:
            h = lam[i + 1] - lam[i]
            m0 = denoised
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, this_order)]
            d1s = [(outs[-1 - k] - m0) / rks[k - 1] for k in range(1, this_order)]
            x = (s[i + 1] / s[i]) * x - math.expm1(-h) * m0
            if d1s:
                b_h, R, b = _unipc_coefficients(rks, h, this_order, variant)
                rhos = [0.5] if this_order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
                x = x - b_h * sum((rho * d for rho, d in zip(rhos, d1s)), torch.zeros_like(x))
        _report(callback, i, n, x, sigmas[i], denoised)
    return x


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, noise: NoiseFn, callback: StepCallback | None = None,
) -> torch.Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023): jump to the denoised estimate, then
    re-noise it to the next sigma with fresh noise."""
    s = _floats(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoiser(x, sigmas[i])
        x = denoised
        if s[i + 1] > 0:
            x = x + noise(x) * s[i + 1]
        _report(callback, i, n, x, sigmas[i], denoised)
    return x
