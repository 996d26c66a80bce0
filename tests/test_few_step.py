"""Few-step models (LCM, Lightning, Hyper-SD, Turbo): recognised from metadata or, as a guess,
from file names; the engine's recommendation (a LoRA in the prompt first); the route; the
schedules they need against diffusers' own; a recommended run samples."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.test_samplers import DIFFUSERS_BASE, SCHEDULE
from tests.test_shipped_prompt_extensions import engine_for, infos, req
from webui.models.fewstep import recognise
from webui.samplers.schedules import make_sigmas


@pytest.mark.parametrize(("name", "kind", "sampler", "scheduler", "steps", "cfg"), [
    ("lcm-lora-sdv1-5", "LCM", "LCM", "SGM Uniform", 4, 1.0),
    ("LCM_Dreamshaper_v7", "LCM", "LCM", "SGM Uniform", 4, 1.0),
    ("sdxl_lightning_4step_lora", "Lightning", "Euler", "SGM Uniform", 4, 1.0),
    ("sdxl_lightning_8step_unet", "Lightning", "Euler", "SGM Uniform", 8, 1.0),
    ("juggernautXL_lightning_4steps", "Lightning", "Euler", "SGM Uniform", 4, 1.0),
    ("Hyper-SD15-8steps-lora", "Hyper-SD", "Euler", "SGM Uniform", 8, 1.0),
    ("Hyper-SDXL-12steps-CFG-lora", "Hyper-SD", "Euler", "SGM Uniform", 12, 5.0),
    ("sd_xl_turbo_1.0_fp16", "Turbo", "Euler a", "Simple", 4, 1.0),
    ("DreamShaperXL_Turbo_v2", "Turbo", "Euler a", "Simple", 4, 1.0),
])
def test_recognised_from_the_file_name_as_a_guess(name, kind, sampler, scheduler, steps, cfg) -> None:
    found = recognise(Path(f"{name}.ckpt"))
    assert found is not None
    assert (found.kind, found.sampler_name, found.scheduler, found.steps, found.cfg_scale) == (
        kind, sampler, scheduler, steps, cfg)
    assert found.guessed and "guessed from its file name" in found.describe()


@pytest.mark.parametrize("name", ["v1-5-pruned-emaonly", "lightning_bolt_style", "turbocharged_cars", "flcmx",
                                  "realisticVision_v60"])
def test_ordinary_models_are_not_recognised(name: str) -> None:
    assert recognise(Path(f"{name}.safetensors")) is None  # no such file: no metadata, the name says nothing


def test_recognised_from_metadata(tmp_path: Path) -> None:
    """LCM-LoRA as downloaded is `pytorch_lora_weights.safetensors`: only its metadata can tell."""
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={"modelspec.title": "LCM-LoRA SD1.5"})
    found = recognise(path)
    assert found is not None and found.kind == "LCM" and found.source == "metadata" and not found.guessed
    plain = tmp_path / "style.safetensors"
    save_file({"w": torch.zeros(1)}, plain, metadata={"ss_output_name": "watercolour"})
    assert recognise(plain) is None
    broken = tmp_path / "lcm_broken.safetensors"
    broken.write_bytes(b"\x00" * 5)
    assert recognise(broken).kind == "LCM"  # an unreadable header: the name still says it


def test_the_engine_prefers_a_lora_in_the_prompt(data_dir: Path) -> None:
    models = data_dir / "models"
    shutil.copy(models / "Stable-diffusion" / "sd1.safetensors", models / "Stable-diffusion" / "sd_turbo.safetensors")
    (models / "Lora").mkdir(exist_ok=True)
    save_file({"w": torch.zeros(1)}, models / "Lora" / "Hyper-SD15-4steps-lora.safetensors",
              metadata={"ss_output_name": "Hyper-SD15-4steps-lora"})
    engine = engine_for(data_dir)
    assert engine.few_step("sd1") is None
    turbo = engine.few_step("sd_turbo", "a cat")
    assert turbo is not None and turbo.kind == "Turbo" and turbo.file == "sd_turbo.safetensors"
    hyper = engine.few_step("sd_turbo", "a cat <lora:Hyper-SD15-4steps-lora:1>")
    assert hyper is not None and (hyper.kind, hyper.steps, hyper.source) == ("Hyper-SD", 4, "metadata")
    assert engine.few_step("sd1", "a cat <lora:missing:1>") is None  # the job will name the missing LoRA


def test_a_recommended_run_samples_without_the_negative(data_dir: Path) -> None:
    """The LCM preset (4 steps, CFG 1): an image, and at CFG 1 the negative rows are not computed."""
    engine = engine_for(data_dir)
    unet = engine.bundle(None).unet
    rows: list[int] = []
    handle = unet.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    try:
        result = engine.runner.generate(req(steps=4, sampler_name="LCM", scheduler="SGM Uniform", cfg_scale=1.0))
        guided = engine.runner.generate(req(steps=4, sampler_name="LCM", scheduler="SGM Uniform", cfg_scale=7.0))
    finally:
        handle.remove()
    assert result.images[0].size == (64, 64) and guided.images
    assert rows == [1] * 4 + [2] * 4
    info = infos(result)[0]
    assert info["Sampler"] == "LCM" and info["Schedule type"] == "SGM Uniform" and info["Steps"] == "4"


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_turbo_and_lightning_schedules_match_diffusers_trailing(steps: int) -> None:
    """Turbo and Lightning were distilled on "trailing" timesteps: our Simple schedule is exactly
    diffusers' trailing Euler schedule; SGM Uniform (what ByteDance names for ComfyUI) is within
    half a percent of it (fractional timesteps)."""
    from diffusers import EulerDiscreteScheduler

    sched = EulerDiscreteScheduler(**DIFFUSERS_BASE, timestep_spacing="trailing")
    sched.set_timesteps(steps)
    trailing = sched.sigmas.float()
    torch.testing.assert_close(make_sigmas(SCHEDULE, "Simple", steps), trailing, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(make_sigmas(SCHEDULE, "SGM Uniform", steps), trailing, rtol=5e-3, atol=1e-6)


def test_the_route(data_dir: Path) -> None:
    """Over HTTP on the real server (API only)."""
    import requests

    from tests.conftest import start_server, stop_server

    lora_dir = data_dir / "models" / "Lora"
    lora_dir.mkdir(exist_ok=True)
    save_file({"w": torch.zeros(1)}, lora_dir / "lcm-lora-sdv1-5.safetensors", metadata={"ss_network_dim": "64"})
    s = start_server(data_dir, "--nowebui", ready="/sdapi/v1/sd-models")
    try:
        route = s.url + "/sdapi/v1/few-step"
        answer = requests.get(route, params={"prompt": "x <lora:lcm-lora-sdv1-5:1>"}, timeout=30).json()
        assert answer["recognised"] and answer["kind"] == "LCM" and answer["guessed"] and answer["steps"] == 4
        assert requests.get(route, params={"checkpoint": "sd1"}, timeout=30).json() == {"recognised": False}
        missing = requests.get(route, params={"checkpoint": "nope"}, timeout=30)
        assert missing.status_code == 404 and "nope" in missing.json()["detail"]
        loras = requests.get(s.url + "/sdapi/v1/loras", timeout=30).json()
        assert loras[0]["metadata"] == {"ss_network_dim": "64"}  # as A1111 lists a LoRA's training metadata
    finally:
        stop_server(s)


def test_lcm_sampler_matches_diffusers_lcm_scheduler() -> None:
    """Our LCM sampler on the sigmas of diffusers' LCMScheduler timesteps, with the same noise and
    the same epsilon model, gives diffusers' result (its boundary condition c_skip is ~1e-5 at
    these timesteps, hence the tolerance)."""
    from diffusers import LCMScheduler

    from webui.samplers.kdiffusion import sample_lcm

    sched = LCMScheduler(**DIFFUSERS_BASE)
    sched.set_timesteps(4)
    alphas = sched.alphas_cumprod

    def eps(x_vp: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        return 0.3 * x_vp + 0.002 * float(t) / 1000

    shape = (1, 4, 8, 8)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    theirs = start.clone()
    gen = torch.Generator().manual_seed(7)
    for t in sched.timesteps:  # the last step's prev_sample is its denoised estimate
        theirs = sched.step(eps(theirs, t), t, theirs, generator=gen).prev_sample
    sigmas_at = ((1 - alphas) / alphas) ** 0.5
    sigmas = torch.cat([sigmas_at[sched.timesteps.long()], torch.zeros(1)]).float()

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = SCHEDULE.sigma_to_t(sigma.reshape(1))
        return x - sigma * eps(x / (1 + sigma**2) ** 0.5, t)

    ours_gen = torch.Generator().manual_seed(7)
    ours = sample_lcm(denoiser, start * (1 + sigmas[0] ** 2) ** 0.5, sigmas,  # VP -> k-diffusion scale
                      noise=lambda like: torch.randn(like.shape, generator=ours_gen))
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3)


def test_lora_metadata_is_read_once_per_version_of_the_file(data_dir: Path) -> None:
    """A LoRA's listed metadata comes from its header; a file written again is read again."""
    import os

    lora_dir = data_dir / "models" / "Lora"
    lora_dir.mkdir(exist_ok=True)
    path = lora_dir / "style.safetensors"
    save_file({"w": torch.zeros(1)}, path, metadata={"ss_output_name": "style-v1"})
    engine = engine_for(data_dir)
    engine.networks.refresh()
    (lora,) = engine.networks.loras()
    assert engine.networks.metadata(lora) == {"ss_output_name": "style-v1"}
    save_file({"w": torch.zeros(2)}, path, metadata={"ss_output_name": "style-v2"})
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert engine.networks.metadata(lora) == {"ss_output_name": "style-v2"}
    (lora_dir / "old.pt").write_bytes(b"not read")
    engine.networks.refresh()
    assert engine.networks.metadata(next(f for f in engine.networks.loras() if f.stem == "old")) == {}
