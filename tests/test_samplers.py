"""Samplers and schedule types.

Most tests drive the samplers with the exact denoiser of a Gaussian data distribution
N(mu, s^2) (per element): denoised = (x s^2 + mu sigma^2) / (s^2 + sigma^2). Its probability-flow
ODE has a closed-form solution, x(0) = mu + (x_T - mu) * s / sqrt(s^2 + sigma_T^2), so the
deterministic samplers are checked against the exact answer and the stochastic ones against the
target distribution. Independent references: diffusers' schedulers driven by the same denoiser
(eps = (x - denoised) / sigma) on the same sigmas, and the published Karras formula.
"""

from __future__ import annotations

import inspect
import math
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from webui.models.families import FLOW_SAMPLERS
from webui.samplers import kdiffusion as K
from webui.samplers.schedules import AYS_SIGMAS, DiscreteSchedule, make_sigmas, sampler_sigmas
from webui.samplers.table import SAMPLERS, SCHEDULES, SamplerSpec, effective_schedule, resolve

# compat-facts §4: the names users type
USER_SAMPLERS = ("Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE",
                 "DPM++ 2M SDE", "DPM++ 3M SDE", "DPM fast", "DPM adaptive", "Restart", "DDIM", "PLMS", "UniPC", "LCM")
USER_SCHEDULES = ("Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform", "KL Optimal",
                  "Align Your Steps", "Simple", "Normal", "DDIM", "Beta")

T = 1000
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float32) ** 2  # SD's scaled_linear
SCHEDULE = DiscreteSchedule(torch.cumprod(1 - BETAS, dim=0))
DIFFUSERS_BASE = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

SPECS = {s.name: s for s in SAMPLERS}
DETERMINISTIC = [s.name for s in SAMPLERS if not s.stochastic]
STOCHASTIC = [s.name for s in SAMPLERS if s.stochastic]


class Gaussian:
    """The exact denoiser of N(mu, s^2) per element; counts its calls."""

    def __init__(self, shape: tuple[int, ...], seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.mu = torch.randn(shape, generator=g) * 0.5
        self.s = torch.rand(shape, generator=g) * 0.5 + 0.25
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert torch.is_tensor(sigma) and sigma.dtype == torch.float32
        self.calls += 1
        s2, v = self.s**2, float(sigma) ** 2
        return (x * s2 + self.mu * v) / (s2 + v)

    def exact(self, x_start: torch.Tensor, sigma_start: float) -> torch.Tensor:
        return self.mu + (x_start - self.mu) * self.s / (self.s**2 + sigma_start**2) ** 0.5

    def z(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mu) / self.s


def seeded_noise(seeds: list[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Like the runner's: one CPU generator per image."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda like: torch.cat([torch.randn((1, *like.shape[1:]), generator=g) for g in gens])


def no_noise(like: torch.Tensor) -> torch.Tensor:
    raise AssertionError("a deterministic sampler drew noise")


def start(shape: tuple[int, ...], sigma: float, seed: int = 5) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * sigma


def run(name: str, sigmas: torch.Tensor, model: Gaussian, x: torch.Tensor, seeds: list[int] | None = None,
        callback: Callable | None = None, **options) -> torch.Tensor:
    noise = seeded_noise(seeds or [1, 2]) if SPECS[name].stochastic or options else no_noise
    return SPECS[name].fn(model, x.clone(), sigmas, noise=noise, callback=callback, **options)


# --- the table ------------------------------------------------------------------------------------


def test_table_lists_every_user_name_and_schedule_in_order() -> None:
    assert SCHEDULES == USER_SCHEDULES
    for name in USER_SAMPLERS:
        spec, schedule = resolve(name)
        assert (spec.name, schedule) == (name, "Automatic")


@pytest.mark.parametrize("schedule", USER_SCHEDULES[1:])
def test_legacy_combined_names(schedule: str) -> None:
    for name in ("DPM++ 2M", "DPM++ SDE", "Euler a", "DDIM", "DPM++ 2M SDE"):
        spec, got = resolve(f"{name} {schedule}")
        assert (spec.name, got) == (name, schedule)
    assert resolve(f"dpm++ 2m {schedule.lower()}")[1] == schedule  # any case
    assert resolve(f"k_dpmpp_2m {schedule}")[0].name == "DPM++ 2M"  # aliases too
    assert resolve("DPM++ 2M Karras", "Exponential")[1] == "Karras"  # the suffix wins, as in A1111


def test_resolve_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown sampler"):
        resolve("Euler b")
    with pytest.raises(ValueError, match="not available"):
        resolve("Euler", "Wiggly")
    assert resolve("Euler", "karras")[1] == "Karras"


def test_default_schedules_follow_a1111() -> None:
    assert effective_schedule(SPECS["DPM++ 2M"], "Automatic") == "Karras"
    assert effective_schedule(SPECS["DPM++ 2M SDE"], "Automatic") == "Exponential"
    assert effective_schedule(SPECS["DPM++ 2M"], "Beta") == "Beta"
    assert effective_schedule(SPECS["Euler"], "Automatic") == "Automatic"
    assert not SPECS["DPM fast"].uses_schedule and not SPECS["DPM adaptive"].uses_schedule
    for spec in SAMPLERS:
        assert spec.default_schedule in SCHEDULES


@pytest.mark.parametrize("spec", SAMPLERS, ids=lambda s: s.name)
def test_declared_options_are_the_function_keywords(spec: SamplerSpec) -> None:
    params = inspect.signature(spec.fn).parameters
    assert list(params)[:3] == ["denoiser", "x", "sigmas"]
    keywords = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY} - {"noise", "callback"}
    assert keywords == set(spec.options)
    assert not any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values())


def test_table_does_not_import_torch() -> None:
    code = "import sys, webui.samplers.table as t; t.resolve('DPM++ 2M Karras'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


# --- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", USER_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 150])
def test_schedule_shape_and_range(name: str, steps: int) -> None:
    for family in ("sd1", "sdxl"):
        s = make_sigmas(SCHEDULE, name, steps, family)
        assert s.dtype == torch.float32 and s.shape == (steps + 1,)
        assert s[-1] == 0 and torch.isfinite(s).all()
        body = s[:-1]
        assert (body[1:] < body[:-1]).all(), f"{name} not descending: {body}"
        assert body.min() >= SCHEDULE.sigma_min * (1 - 1e-5)
        assert body.max() <= SCHEDULE.sigma_max * (1 + 1e-5)


def test_karras_is_the_published_formula() -> None:
    steps, rho = 12, 7.0
    lo, hi = SCHEDULE.sigma_min, SCHEDULE.sigma_max
    i = np.arange(steps)
    expected = (hi ** (1 / rho) + i / (steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    got = make_sigmas(SCHEDULE, "Karras", steps).double().numpy()
    np.testing.assert_allclose(got[:-1], expected, rtol=1e-6)
    assert got[0] == pytest.approx(hi, rel=1e-6) and got[-2] == pytest.approx(lo, rel=1e-6)


def test_schedule_identities() -> None:
    for steps in (3, 10, 33):
        auto = make_sigmas(SCHEDULE, "Automatic", steps)
        assert torch.equal(make_sigmas(SCHEDULE, "Uniform", steps), auto)
        assert torch.equal(make_sigmas(SCHEDULE, "Normal", steps), auto)
        torch.testing.assert_close(make_sigmas(SCHEDULE, "Polyexponential", steps),
                                   make_sigmas(SCHEDULE, "Exponential", steps))  # rho = 1
        # SGM Uniform: steps + 1 uniform timesteps, the last dropped
        torch.testing.assert_close(make_sigmas(SCHEDULE, "SGM Uniform", steps)[:-1],
                                   make_sigmas(SCHEDULE, "Automatic", steps + 1)[:-2])
        # Simple: every (T / steps)-th training sigma from the top
        simple = make_sigmas(SCHEDULE, "Simple", steps)
        assert simple[0] == SCHEDULE.sigmas[-1]
        assert simple[1] == SCHEDULE.sigmas[-1 - int(T / steps)]
        # KL Optimal: evenly spaced in arctan(sigma)
        atan = make_sigmas(SCHEDULE, "KL Optimal", steps)[:-1].double().atan()
        np.testing.assert_allclose(np.diff(atan.numpy()), np.diff(atan.numpy())[0], rtol=1e-4)
    with pytest.raises(ValueError, match="unknown schedule type"):
        make_sigmas(SCHEDULE, "Wiggly", 10)


def test_align_your_steps_uses_the_published_lists() -> None:
    for family in ("sd1", "sdxl"):
        published = torch.tensor(AYS_SIGMAS[family])
        got = make_sigmas(SCHEDULE, "Align Your Steps", 11, family)  # the list's own length: as published
        torch.testing.assert_close(got[1:-2], published[1:-1].float())
        # the ends are clamped to the model's range: 14.615 -> 14.6146, 0.029 -> 0.0292
        assert got[0] == pytest.approx(SCHEDULE.sigma_max, rel=1e-6)
        assert got[-2] == pytest.approx(SCHEDULE.sigma_min, rel=1e-6)
        longer = make_sigmas(SCHEDULE, "Align Your Steps", 21, family)
        torch.testing.assert_close(longer[2:-2:2], published[1:-1].float(), rtol=1e-5, atol=0)  # log-linear
        log_mid = (math.log(published[1]) + math.log(published[2])) / 2
        assert float(longer[3]) == pytest.approx(math.exp(log_mid), rel=1e-5)
    sd1 = make_sigmas(SCHEDULE, "Align Your Steps", 10)
    assert torch.equal(sd1, make_sigmas(SCHEDULE, "Align Your Steps", 10, "sd2"))
    assert not torch.equal(sd1, make_sigmas(SCHEDULE, "Align Your Steps", 10, "sdxl"))


def test_ddim_schedule_is_the_ddim_timesteps() -> None:
    from diffusers import DDIMScheduler

    for steps in (4, 7, 20, 50):
        ddim = DDIMScheduler(**DIFFUSERS_BASE, steps_offset=1, timestep_spacing="leading")
        ddim.set_timesteps(steps)
        expected = SCHEDULE.sigmas[ddim.timesteps.long()]
        assert torch.equal(make_sigmas(SCHEDULE, "DDIM", steps)[:-1], expected)


@pytest.mark.parametrize("steps", [2, 7, 20])
def test_schedules_match_diffusers(steps: int) -> None:
    """Karras / Exponential / Beta: diffusers computes the same formulas between the same end
    points, so they agree to float32 rounding. Automatic: diffusers interpolates sigma linearly
    between training timesteps, we (like k-diffusion) log-linearly, so the tolerance is looser
    (1e-4 relative; the largest difference seen is 1.5e-5). One step is left out: diffusers then
    starts at sigma_min (linspace(0, 999, 1) = [0]), k-diffusion and we at sigma_max."""
    from diffusers import EulerDiscreteScheduler

    for name, flags, rtol in [("Karras", dict(use_karras_sigmas=True), 1e-6),
                              ("Exponential", dict(use_exponential_sigmas=True), 1e-6),
                              ("Beta", dict(use_beta_sigmas=True), 1e-6),
                              ("Automatic", {}, 1e-4)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = EulerDiscreteScheduler(**DIFFUSERS_BASE, timestep_spacing="linspace", **flags)
        ref.set_timesteps(steps)
        torch.testing.assert_close(make_sigmas(SCHEDULE, name, steps), ref.sigmas, rtol=rtol, atol=0)


def test_sampler_sigmas_apply_defaults_and_discard() -> None:
    assert torch.equal(sampler_sigmas(SCHEDULE, SPECS["DPM++ 2M"], "Automatic", 9), make_sigmas(SCHEDULE, "Karras", 9))
    assert torch.equal(sampler_sigmas(SCHEDULE, SPECS["Euler"], "Beta", 9), make_sigmas(SCHEDULE, "Beta", 9))
    dpm2 = sampler_sigmas(SCHEDULE, SPECS["DPM2"], "Automatic", 9)
    full = make_sigmas(SCHEDULE, "Karras", 10)
    assert len(dpm2) == 10 and torch.equal(dpm2, torch.cat([full[:-2], full[-1:]]))


# --- every sampler x every schedule ----------------------------------------------------------------


@pytest.mark.parametrize("name", SPECS)
def test_every_schedule_is_finite_reproducible_and_reports_each_step(name: str) -> None:
    shape = (2, 4, 6, 6)
    for schedule in USER_SCHEDULES:
        steps = 7
        sigmas = sampler_sigmas(SCHEDULE, SPECS[name], schedule, steps)  # as the runner prepares them
        x = start(shape, float(sigmas[0]))
        model = Gaussian(shape)
        seen: list[tuple[int, int]] = []
        a = run(name, sigmas, model, x, callback=lambda st: seen.append((st.step, st.total)))
        b = run(name, sigmas, Gaussian(shape), x)
        assert torch.isfinite(a).all(), (name, schedule)
        assert torch.equal(a, b), (name, schedule)
        assert seen == [(i, steps) for i in range(steps)], (name, schedule)
        # a loose bound only: at 7 steps some pairs are poor (second-order and multistep SDE
        # steps overshoot across a wide last gap in log sigma, e.g. Beta's or Automatic's last
        # step before sigma_min; LCM under-disperses); accuracy is tested below
        z = model.z(a)
        assert abs(float(z.mean())) < 0.5 and 0.3 < float(z.std()) < 3, (name, schedule, z.mean(), z.std())


@pytest.mark.parametrize("name", SPECS)
def test_callback_can_stop_the_sampler(name: str) -> None:
    sigmas = make_sigmas(SCHEDULE, "Karras", 10)
    model = Gaussian((1, 4, 4, 4))

    class Stop(Exception):
        pass

    def callback(state: K.SamplerStep) -> None:
        if state.step == 2:
            calls_at_stop.append(model.calls)
            raise Stop

    calls_at_stop: list[int] = []
    with pytest.raises(Stop):
        run(name, sigmas, model, start((1, 4, 4, 4), float(sigmas[0])), callback=callback)
    assert model.calls == calls_at_stop[0]


def test_model_calls_per_sampler() -> None:
    steps = 10
    sigmas = make_sigmas(SCHEDULE, "Karras", steps)
    expected = {"Heun": 2 * steps - 1, "DPM2": 2 * steps - 1, "DPM2 a": 2 * steps - 1, "DPM++ 2S a": 2 * steps - 1,
                "DPM++ SDE": 2 * steps - 1, "Restart": 2 * steps - 1, "PLMS": steps + 1}
    for name in SPECS:
        model = Gaussian((1, 4, 4, 4))
        run(name, sigmas, model, start((1, 4, 4, 4), float(sigmas[0])))
        if name == "DPM adaptive":
            assert model.calls % 3 == 0 and model.calls >= 3
        else:
            assert model.calls == expected.get(name, steps), name


# --- correctness against the exact solution and the target distribution ----------------------------

# max |x - exact| over 2048 elements after 30 Karras steps; the floor (~0.005) is the last step
# from sigma_min = 0.029 to 0 (first order in every sampler but LMS)
EXACT_TOLERANCE = {"Euler": 0.2, "DDIM": 0.2, "LMS": 0.01, "Heun": 0.02, "DPM2": 0.02, "DPM++ 2M": 0.02,
                   "PLMS": 0.02, "UniPC": 0.02}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_solve_the_flow_exactly(name: str) -> None:
    shape = (2, 4, 16, 16)
    model = Gaussian(shape)
    sigmas = make_sigmas(SCHEDULE, "Karras", 30)
    x = start(shape, float(sigmas[0]))
    out = run(name, sigmas, model, x)
    err = float((out - model.exact(x, float(sigmas[0]))).abs().max())
    assert err < EXACT_TOLERANCE[name], err
    if name in ("Euler", "DDIM"):  # first order: 4x the steps, about a quarter of the error
        fine = make_sigmas(SCHEDULE, "Karras", 120)
        err_fine = float((run(name, fine, model, x) - model.exact(x, float(fine[0]))).abs().max())
        assert err_fine < err / 3


class FlowGaussian(Gaussian):
    """The exact denoiser of N(mu, s^2) for a flow model: x_t = (1 - t) x0 + t noise, t in (0, 1].
    Along its ODE the standardised z = (x - (1 - t) mu) / sqrt((1 - t)^2 s^2 + t^2) is constant,
    so from pure noise at t = 1 the answer is mu + s x_start."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        t = float(sigma)
        s2 = self.s**2
        return self.mu + (1 - t) * s2 / ((1 - t) ** 2 * s2 + t * t) * (x - (1 - t) * self.mu)

    def exact(self, x_start: torch.Tensor, sigma_start: float) -> torch.Tensor:
        assert sigma_start == 1.0
        return self.mu + self.s * x_start


@pytest.mark.parametrize("name", [n for n in FLOW_SAMPLERS if n != "Euler a"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_samplers_solve_a_flow_models_ode(name: str, shift: float) -> None:
    """Every deterministic sampler offered for SD3 / Flux, on the flow schedule with its default
    schedule type (as a user gets it), from pure noise at t = 1: close to the exact answer, the
    higher-order ones several times closer than Euler with the same steps. (At 40 steps: with
    shift 3 the last step, from t = 0.07 to 0, is first order in all of them and sets the floor.)"""
    from webui.samplers.schedules import FlowSchedule

    shape = (2, 4, 16, 16)
    model = FlowGaussian(shape)
    x = start(shape, 1.0)

    def error(sampler: str, steps: int = 40) -> float:
        sigmas = sampler_sigmas(FlowSchedule(shift), SPECS[sampler], "Automatic", steps)
        assert float(sigmas[0]) == 1.0
        return float((run(sampler, sigmas, model, x) - model.exact(x, 1.0)).abs().max())

    err, euler = error(name), error("Euler")
    if name == "Euler":  # first order: 0.07 (shift 1) and 0.12 (shift 3); 4x the steps, a quarter
        assert err < 0.15 and error(name, 160) < err / 3, err
    else:
        assert err < 0.04 and err < euler / 3, (err, euler)


@pytest.mark.parametrize("name", [n for n in STOCHASTIC if n != "LCM"])
def test_stochastic_samplers_reach_the_target_distribution(name: str) -> None:
    """z = (x - mu) / s over 4096 elements: mean 0, std 1 up to discretisation. Euler a is
    first order and known to under-disperse at moderate step counts (0.95 at 60 steps)."""
    shape = (4, 4, 16, 16)
    model = Gaussian(shape)
    sigmas = make_sigmas(SCHEDULE, "Karras", 60)
    out = run(name, sigmas, model, start(shape, float(sigmas[0])), seeds=[11, 12, 13, 14])
    z = model.z(out)
    assert abs(float(z.mean())) < 0.05
    assert abs(float(z.std()) - 1) < (0.07 if name == "Euler a" else 0.04), float(z.std())


def test_lcm_jumps_to_the_denoised_estimate() -> None:
    """LCM expects a consistency model; with an ordinary denoiser its last step is the denoised
    estimate at the last nonzero sigma, re-noised in between (so no distribution check)."""
    shape = (1, 4, 4, 4)
    sigmas = make_sigmas(SCHEDULE, "Karras", 3)
    model = Gaussian(shape)
    states: list[K.SamplerStep] = []
    out = run("LCM", sigmas, model, start(shape, float(sigmas[0])), seeds=[3], callback=states.append)
    assert torch.equal(out, states[-1].denoised)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_other_seed_other_result(name: str) -> None:
    shape = (2, 4, 6, 6)
    sigmas = make_sigmas(SCHEDULE, "Karras", 20 if name == "Restart" else 8)  # Restart adds noise from 20 steps
    x = start(shape, float(sigmas[0]))
    a = run(name, sigmas, Gaussian(shape), x, seeds=[1, 2])
    b = run(name, sigmas, Gaussian(shape), x, seeds=[1, 3])
    assert (a[1] - b[1]).abs().mean() > 1e-3
    if name == "DPM adaptive":  # its step sizes follow the error of the whole batch (as in k-diffusion)
        assert (a[0] - b[0]).abs().max() < 0.1
    else:  # image 0 keeps its seed: each image's noise is its own
        assert torch.equal(a[0], b[0])


def test_deterministic_sampler_eta_makes_ddim_stochastic() -> None:
    shape = (1, 4, 6, 6)
    sigmas = make_sigmas(SCHEDULE, "DDIM", 8)
    x = start(shape, float(sigmas[0]))
    a = run("DDIM", sigmas, Gaussian(shape), x, seeds=[1], eta=1.0)
    b = run("DDIM", sigmas, Gaussian(shape), x, seeds=[2], eta=1.0)
    assert (a - b).abs().mean() > 1e-3
    # DDIM with eta is the ancestral Euler step with the same eta
    c = run("Euler a", sigmas, Gaussian(shape), x, seeds=[1], eta=1.0)
    torch.testing.assert_close(a, c)


def test_dpm_adaptive_reports_planned_steps_in_order() -> None:
    sigmas = make_sigmas(SCHEDULE, "Karras", 5)
    model = Gaussian((1, 4, 8, 8))
    seen: list[K.SamplerStep] = []
    run("DPM adaptive", sigmas, model, start((1, 4, 8, 8), float(sigmas[0])), seeds=[1], callback=seen.append)
    assert [s.step for s in seen] == list(range(5)) and model.calls > 5
    reported = [float(s.sigma) for s in seen]
    assert reported == sorted(reported, reverse=True)
    for state in seen[:-2]:  # step k is reported once the solver is at or below sigmas[k + 1]
        assert float(state.sigma) <= float(sigmas[state.step + 1]) * (1 + 1e-5)


def test_restart_restarts_from_20_steps() -> None:
    shape = (1, 4, 8, 8)
    x = start(shape, SCHEDULE.sigma_max)
    for steps, restarted in ((19, False), (20, True), (40, True)):
        sigmas = make_sigmas(SCHEDULE, "Karras", steps)
        seen: list[float] = []
        model = Gaussian(shape)
        out = K.sample_restart(model, x.clone(), sigmas, noise=seeded_noise([1]), callback=lambda st: seen.append(float(st.sigma)))
        assert len(seen) == steps and torch.isfinite(out).all()
        jumps_up = sum(b > a for a, b in zip(seen, seen[1:]))
        assert jumps_up == (0 if not restarted else 1 if steps < 36 else 2)
        if not restarted:
            heun = K.sample_heun(Gaussian(shape), x.clone(), sigmas, noise=no_noise)
            assert torch.equal(out, heun)


# --- agreement with diffusers' schedulers -----------------------------------------------------------


def _unique(sigmas: torch.Tensor) -> torch.Tensor:
    out: list[float] = []
    for v in sigmas.tolist():
        if not out or v != out[-1]:
            out.append(v)
    return torch.tensor(out, dtype=torch.float32)


def _drive_k_style(sched, model: Gaussian, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Schedulers working on x in sigma units (Euler, Heun, LMS, KDPM2, Euler ancestral)."""
    for t in sched.timesteps:
        sched.scale_model_input(x, t)  # sets the step index
        sigma = sched.sigmas[sched.step_index]
        if hasattr(sched, "sigmas_interpol") and not sched.state_in_first_order:
            sigma = sched.sigmas_interpol[sched.step_index]
        eps = (x - model(x, sigma.float())) / sigma
        x = sched.step(eps, t, x, **({"generator": generator} if generator else {})).prev_sample
    return x


def _drive_vp(sched, model: Gaussian, x: torch.Tensor, sigma_of: Callable, generator=None) -> torch.Tensor:
    """Schedulers working on the variance-preserving x * alpha (DPM-Solver, UniPC, DDIM, PNDM)."""
    sigma0 = float(sigma_of(sched, 0, sched.timesteps[0]))
    x = x / math.sqrt(1 + sigma0**2)
    for i, t in enumerate(sched.timesteps):
        sigma = float(sigma_of(sched, i, t))
        x_ve = x * math.sqrt(1 + sigma**2)
        eps = (x_ve - model(x_ve, torch.tensor(sigma, dtype=torch.float32))) / sigma
        x = sched.step(eps, t, x, **({"generator": generator} if generator else {})).prev_sample
    return x


def _sigma_by_index(sched, i, t):
    return sched.sigmas[sched.step_index if sched.step_index is not None else 0]


def _sigma_by_timestep(sched, i, t):
    ac = sched.alphas_cumprod[int(t)]
    return ((1 - ac) / ac) ** 0.5


REFERENCES = [
    # (our sampler, diffusers class, config, driver, our options); identical algorithms on identical sigmas
    ("DPM++ 2M", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=2), "vp", {}),
    ("Heun", "HeunDiscreteScheduler", {}, "k", {}),
    ("LMS", "LMSDiscreteScheduler", {}, "k", {}),
    ("Euler", "EulerDiscreteScheduler", {}, "k", {}),
    ("DPM2", "KDPM2DiscreteScheduler", {}, "k", {}),
    # 3M SDE at eta 0 is the DPM-Solver++(3M) ODE solver; its second-order warm-up step is the
    # "heun" form. (diffusers' third-order *SDE* update is not used as a reference: its D2
    # coefficient tends to -1 instead of 0 as h -> 0, unlike k-diffusion's and its own ODE form.)
    ("DPM++ 3M SDE", "DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver++", solver_order=3,
                                                         solver_type="heun", lower_order_final=False), "vp",
     dict(eta=0.0)),
    ("UniPC", "UniPCMultistepScheduler", dict(solver_order=3, solver_type="bh2"), "vp", {}),
    ("UniPC", "UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh2"), "vp", dict(order=2)),
]


@pytest.mark.parametrize("name,cls,config,driver,options", REFERENCES,
                         ids=[f"{r[0]}-{r[1]}-{r[2].get('solver_order', '')}" for r in REFERENCES])
@pytest.mark.parametrize("schedule", ["karras", "default"])
def test_matches_diffusers(name: str, cls: str, config: dict, driver: str, options: dict, schedule: str) -> None:
    """Same algorithm, same sigmas (diffusers' own, Karras or its default linspace), same
    denoiser: agreement to float32 rounding (atol 1e-5 on values of size ~2)."""
    import diffusers

    flags = dict(use_karras_sigmas=True) if schedule == "karras" else {}
    sched = getattr(diffusers, cls)(**DIFFUSERS_BASE, timestep_spacing="linspace", **config, **flags)
    steps = 12
    sched.set_timesteps(steps)
    sigmas = _unique(sched.sigmas)
    assert len(sigmas) == steps + 1
    shape = (2, 4, 8, 8)
    x = start(shape, float(sigmas[0]))
    if driver == "k":
        ref = _drive_k_style(sched, Gaussian(shape), x.clone())
    else:
        ref = _drive_vp(sched, Gaussian(shape), x.clone(), _sigma_by_index)
    ours = run(name, sigmas, Gaussian(shape), x, **options)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_ddim_and_plms_match_diffusers(steps: int) -> None:
    """DDIM (eta 0) and PNDM with skip_prk_steps (= PLMS) over our DDIM schedule, which has the
    same timesteps ("leading" spacing, offset 1); set_alpha_to_one makes diffusers' last step end
    at sigma 0 like ours. PNDM's first step makes the same extra model call."""
    from diffusers import DDIMScheduler, PNDMScheduler

    shape = (2, 4, 8, 8)
    sigmas = make_sigmas(SCHEDULE, "DDIM", steps)
    x = start(shape, float(sigmas[0]))
    ddim = DDIMScheduler(**DIFFUSERS_BASE, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading",
                         clip_sample=False)
    ddim.set_timesteps(steps)
    ref = _drive_vp(ddim, Gaussian(shape), x.clone(), _sigma_by_timestep)
    torch.testing.assert_close(run("DDIM", sigmas, Gaussian(shape), x), ref, atol=1e-5, rtol=1e-5)
    if steps > 1:  # PNDM repeats the first timestep for its improved-Euler start
        pndm = PNDMScheduler(**DIFFUSERS_BASE, set_alpha_to_one=True, steps_offset=1, skip_prk_steps=True,
                             timestep_spacing="leading")
        pndm.set_timesteps(steps)
        model = Gaussian(shape)
        ref = _drive_vp(pndm, model, x.clone(), _sigma_by_timestep)
        ours_model = Gaussian(shape)
        torch.testing.assert_close(run("PLMS", sigmas, ours_model, x), ref, atol=1e-5, rtol=1e-5)
        assert ours_model.calls == model.calls == steps + 1


@pytest.mark.parametrize("name,cls,config", [
    ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2,
                                                          use_karras_sigmas=True)),
    ("DPM++ 2M SDE Heun", "DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=2,
                                                               solver_type="heun", use_karras_sigmas=True)),
])
def test_stochastic_samplers_match_diffusers_with_the_same_noise(name: str, cls: str, config: dict) -> None:
    """diffusers draws one torch.randn per step from the generator it is given; ours draws from
    `noise` in the same order and shape, so the same seed gives the same path."""
    import diffusers

    sched = getattr(diffusers, cls)(**DIFFUSERS_BASE, timestep_spacing="linspace", **config)
    sched.set_timesteps(10)
    sigmas = _unique(sched.sigmas)
    shape = (1, 4, 8, 8)
    x = start(shape, float(sigmas[0]))
    generator = torch.Generator().manual_seed(77)
    if "Ancestral" in cls:
        ref = _drive_k_style(sched, Gaussian(shape), x.clone(), generator)
    else:
        ref = _drive_vp(sched, Gaussian(shape), x.clone(), _sigma_by_index, generator)
    ours = run(name, sigmas, Gaussian(shape), x, seeds=[77])
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# --- end to end through the runner ------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, checkpoint_store: Path):
    from tests.conftest import add_checkpoint
    from webui.app import build_engine
    from webui.config import Config

    root = tmp_path_factory.mktemp("samplers")
    add_checkpoint(root, checkpoint_store, "sd1.safetensors")
    (root / "models" / "VAE").mkdir(parents=True, exist_ok=True)
    return build_engine(Config(data_dir=root, dtype="float32"))


@pytest.mark.parametrize("index,name", list(enumerate(USER_SAMPLERS)))
def test_runner_generates_with_every_sampler(engine, index: int, name: str) -> None:
    from webui.pipeline.request import GenerationRequest

    schedule = USER_SCHEDULES[index % len(USER_SCHEDULES)]  # every schedule type once, too
    request = GenerationRequest(prompt="a red cube", sampler_name=name, scheduler=schedule, steps=4, width=64,
                                height=64, seed=4321, save_images=False)
    steps_seen: list[int] = []
    result = engine.runner.generate(request, progress=lambda p: steps_seen.append(p.step))
    assert len(result.images) == 1 and result.images[0].size == (64, 64)
    assert steps_seen == [1, 2, 3, 4]
    pixels = np.asarray(result.images[0])
    assert pixels.std() > 0  # an image, not a flat fill from NaNs
    if name == "DPM++ SDE":  # reproducibility per sampler is covered above; once end to end
        again = engine.runner.generate(request).images[0]
        assert np.array_equal(np.asarray(again), pixels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler", ["Euler", "Euler a", "DPM++ 2M", "Heun"])
def test_sampling_loop_never_waits_for_the_gpu(data_dir: Path, sampler: str) -> None:
    """Between the first and the last step nothing copies to or from the host: the host queues
    the next step's kernels while the GPU still runs the last ones."""
    from webui.app import build_engine
    from webui.config import Config
    from webui.pipeline.request import GenerationRequest

    engine = build_engine(Config(data_dir=data_dir))
    request = GenerationRequest(prompt="a red cube", steps=5, width=64, height=64, seed=3, sampler_name=sampler,
                                save_images=False)
    engine.runner.generate(request)  # warm-up: loading and first-use allocations may sync

    def progress(p) -> None:
        torch.cuda.set_sync_debug_mode("error" if p.step < p.total_steps else "default")

    try:
        engine.runner.generate(request, progress=progress)
    finally:
        torch.cuda.set_sync_debug_mode("default")
