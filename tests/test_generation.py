"""Generation on tiny checkpoints: determinism, the Euler schedule against diffusers, every
family, saving with infotext, the model cache, VAE choice, precision."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import add_checkpoint
from webui.app import Engine, build_engine
from webui.config import Config
from webui.infotext import parse_infotext
from webui.pipeline.request import GenerationRequest
from webui.runtime.devices import cpu_has_native_bf16, pick_runtime
from webui.testing.make_checkpoint import vae_to_ldm


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube on a table", steps=6, width=64, height=64, seed=1234, sampler_name="Euler", save_images=False)
    base.update(kw)
    return GenerationRequest(**base)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int16)


@pytest.fixture
def engine(data_dir: Path) -> Engine:
    return build_engine(Config(data_dir=data_dir, dtype="float32"))


@pytest.mark.parametrize("sampler", ["Euler", "Euler a"])
def test_same_seed_same_pixels_other_seed_other_pixels(engine: Engine, sampler: str) -> None:
    a = engine.runner.generate(req(sampler_name=sampler)).images[0]
    b = engine.runner.generate(req(sampler_name=sampler)).images[0]
    c = engine.runner.generate(req(sampler_name=sampler, seed=99)).images[0]
    assert np.array_equal(pixels(a), pixels(b))
    assert np.abs(pixels(a) - pixels(c)).mean() > 1


def test_batch_images_use_consecutive_seeds(engine: Engine) -> None:
    batch = engine.runner.generate(req(batch_size=2, sampler_name="Euler a"))
    assert batch.seeds == [1234, 1235]
    single = engine.runner.generate(req(seed=1235, sampler_name="Euler a")).images[0]
    # each image's noise comes from its own seed, so image 2 of the batch is seed 1235 alone
    assert np.abs(pixels(batch.images[1]) - pixels(single)).max() <= 1
    assert "Seed: 1235" in batch.infotexts[1]


def test_random_seed_is_reported(engine: Engine) -> None:
    result = engine.runner.generate(req(seed=-1, n_iter=2))
    assert len(result.seeds) == 2 and result.seeds[1] == result.seeds[0] + 1
    assert parse_infotext(result.infotexts[0])["Seed"] == str(result.seeds[0])


def test_euler_matches_diffusers_pipeline(engine: Engine) -> None:
    """An independent computation: diffusers' own pipeline with EulerDiscreteScheduler
    (timestep_spacing="linspace") on the same weights and the same initial noise."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    ours = engine.runner.generate(req(steps=8, cfg_scale=5.0)).images[0]
    bundle = engine.bundle(None)
    te = bundle.text_encoders[0]
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="linspace", steps_offset=1
    )
    pipe = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=te.model, tokenizer=te.tokenizer, unet=bundle.unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(1234))
    theirs = pipe(
        prompt="a red cube on a table", negative_prompt="", num_inference_steps=8, guidance_scale=5.0,
        latents=noise, height=64, width=64, output_type="np",
    ).images[0]
    theirs = np.round(theirs * 255).astype(np.int16)
    diff = np.abs(pixels(ours) - theirs)
    assert pixels(ours).std() > 5  # a real image, not a flat one that would match anything
    assert diff.max() <= 3 and diff.mean() < 0.5, (diff.max(), diff.mean())


@pytest.mark.parametrize("name", ["sd2.safetensors", "sdxl.safetensors", "sd1-inpaint.safetensors"])
def test_every_family_generates(data_dir: Path, checkpoint_store: Path, name: str) -> None:
    add_checkpoint(data_dir, checkpoint_store, name)
    engine = build_engine(Config(data_dir=data_dir))
    result = engine.runner.generate(req(checkpoint=name, width=72, height=64, sampler_name="Euler a"))
    img = result.images[0]
    assert img.size == (72, 64)
    assert np.isfinite(np.asarray(img)).all() and pixels(img).std() > 1


def test_v_prediction_changes_the_image(data_dir: Path) -> None:
    eps = build_engine(Config(data_dir=data_dir)).runner.generate(req(checkpoint="sd2")).images[0]
    (data_dir / "models/Stable-diffusion/sd2.yaml").write_text("parameterization: v\n")
    engine = build_engine(Config(data_dir=data_dir))
    assert engine.bundle("sd2").prediction == "v"
    v = engine.runner.generate(req(checkpoint="sd2")).images[0]
    assert np.abs(pixels(eps) - pixels(v)).mean() > 1


def test_saved_png_names_and_infotext(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir))
    first = engine.runner.generate(req(save_images=True, batch_size=2, negative_prompt="blurry"))
    second = engine.runner.generate(req(save_images=True))
    paths = first.paths + second.paths
    assert [p.name for p in paths] == ["00000-1234.png", "00001-1235.png", "00002-1234.png"]
    folder = paths[0].parent
    assert folder.parent.name == "txt2img-images" and folder.parent.parent == data_dir / "outputs"
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]
    text = Image.open(paths[0]).info["parameters"]
    fields = parse_infotext(text)
    h10 = engine.registry.find("sd1").hash10
    assert fields["Prompt"] == "a red cube on a table" and fields["Negative prompt"] == "blurry"
    for key, value in {
        "Steps": "6", "Sampler": "Euler", "Schedule type": "Automatic", "CFG scale": "7", "Seed": "1234",
        "Size": "64x64", "Model hash": h10, "Model": "sd1",
    }.items():
        assert fields[key] == value, key
    assert fields["Version"].startswith("v")


def test_switching_checkpoints_frees_the_previous_model(data_dir: Path) -> None:
    engine = build_engine(Config(data_dir=data_dir))
    first = engine.bundle("sd1")
    ref = weakref.ref(first.unet)
    del first
    engine.bundle("sd2")
    gc.collect()
    assert ref() is None, "the first model is still in memory"
    assert len(engine.cache.keys()) == 1


def test_bad_checkpoint_fails_that_job_only(data_dir: Path) -> None:
    from webui.models.errors import ModelError

    broken = data_dir / "models/Stable-diffusion/broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    engine = build_engine(Config(data_dir=data_dir))
    with pytest.raises(ModelError, match=r"^broken\.safetensors: "):
        engine.runner.generate(req(checkpoint="broken"))
    assert engine.runner.generate(req(checkpoint="sd1")).images


def test_vae_override_and_paired_vae(data_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    torch.manual_seed(7)
    other = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    bare = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(other).items()}
    save_file(bare, data_dir / "models/VAE/other.safetensors")
    base = build_engine(Config(data_dir=data_dir)).runner.generate(req()).images[0]
    chosen = build_engine(Config(data_dir=data_dir, vae="other.safetensors"))
    b = chosen.bundle(None)
    assert b.vae_name == "other.safetensors"
    assert torch.equal(b.vae.decoder.conv_out.weight.float(), other.decoder.conv_out.weight.to(b.vae.dtype).float())
    with_vae = chosen.runner.generate(req())
    assert np.abs(pixels(base) - pixels(with_vae.images[0])).mean() > 1
    assert "VAE: other" in with_vae.infotexts[0]
    # foo.vae.safetensors beside foo.safetensors is picked automatically
    save_file(bare, data_dir / "models/Stable-diffusion/sd1.vae.safetensors")
    paired = build_engine(Config(data_dir=data_dir))
    assert "sd1.vae.safetensors" not in " ".join(paired.registry.titles())
    assert paired.bundle("sd1").vae_name == "sd1.vae.safetensors"


def test_precision_choice() -> None:
    auto = pick_runtime(Config())
    assert auto.device.type == "cpu" or torch.cuda.is_available()
    if auto.device.type == "cpu":
        assert auto.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert pick_runtime(Config(no_half=True)).dtype == torch.float32
    r = pick_runtime(Config(no_half_vae=True, dtype="bfloat16"))
    assert (r.dtype, r.vae_dtype) == (torch.bfloat16, torch.float32)


def test_bfloat16_generation_is_close_to_float32(data_dir: Path) -> None:
    f32 = build_engine(Config(data_dir=data_dir, dtype="float32")).runner.generate(req()).images[0]
    bf16 = build_engine(Config(data_dir=data_dir, dtype="bfloat16")).runner.generate(req()).images[0]
    assert np.abs(pixels(f32) - pixels(bf16)).mean() < 12


def test_long_prompt_is_chunked(engine: Engine) -> None:
    from webui.prompts.encode import encode

    bundle = engine.bundle(None)
    long = ", ".join(["a red cube"] * 30)  # 119 tokens: two chunks
    cond = encode(bundle, [long, ""])
    assert cond.context.shape[1] == 77 * 2
    assert engine.runner.generate(req(prompt=long)).images


def test_ckpt_and_safetensors_of_the_same_weights_give_the_same_image(data_dir: Path, checkpoint_store: Path) -> None:
    add_checkpoint(data_dir, checkpoint_store, "sd1.ckpt", "pickled.ckpt")
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    a = engine.runner.generate(req(checkpoint="sd1.safetensors")).images[0]
    b = engine.runner.generate(req(checkpoint="pickled.ckpt")).images[0]
    assert np.array_equal(pixels(a), pixels(b))


def test_zero_terminal_snr_models(data_dir: Path, checkpoint_store: Path) -> None:
    """An SDXL file carrying `v_pred` and `ztsnr` keys (NoobAI-XL v-pred and the like) samples as
    v-prediction on the schedule rescaled to zero terminal SNR, as diffusers rescales it (its last
    value kept finite, as A1111 and Forge do), and makes a picture; the keys change it."""
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale
    from safetensors.torch import load_file, save_file

    from webui.models.load import ZTSNR_LAST_ALPHA_BAR, rescale_zero_terminal_snr
    from webui.samplers.schedules import DiscreteSchedule

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    theirs = torch.cumprod(1.0 - diffusers_rescale(betas), dim=0)
    ours = rescale_zero_terminal_snr(torch.cumprod(1.0 - betas, dim=0))
    torch.testing.assert_close(ours[:-1], theirs[:-1], rtol=1e-4, atol=1e-7)
    assert theirs[-1] == 0 and ours[-1] == pytest.approx(ZTSNR_LAST_ALPHA_BAR)

    folder = data_dir / "models" / "Stable-diffusion"
    sd = load_file(checkpoint_store / "sdxl.safetensors")
    save_file({**sd, "v_pred": torch.zeros(0)}, folder / "xl-vpred.safetensors")
    save_file({**sd, "v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)}, folder / "xl-ztsnr.safetensors")
    engine = build_engine(Config(data_dir=data_dir, dtype="float32"))
    bundle = engine.bundle("xl-ztsnr")
    assert bundle.prediction == "v" and bundle.zero_terminal_snr
    assert DiscreteSchedule(bundle.alphas_cumprod).sigma_max == pytest.approx(4518.8, rel=1e-3)
    ztsnr = engine.runner.generate(req(checkpoint="xl-ztsnr", steps=4)).images[0]
    vpred = engine.runner.generate(req(checkpoint="xl-vpred", steps=4)).images[0]
    assert not engine.bundle("xl-vpred").zero_terminal_snr
    assert np.isfinite(pixels(ztsnr)).all() and pixels(ztsnr).std() > 1
    assert np.abs(pixels(ztsnr) - pixels(vpred)).mean() > 1
    # the Settings' (or a request's) "Zero Terminal SNR" noise schedule: the v-pred file without the
    # key then samples exactly as the file with it; the file with it is not rescaled twice
    on = req(checkpoint="xl-vpred", steps=4, noise_schedule="Zero Terminal SNR")
    chosen = engine.runner.generate(on)
    assert np.array_equal(pixels(chosen.images[0]), pixels(ztsnr))
    assert parse_infotext(chosen.infotexts[0])["Noise Schedule"] == "Zero Terminal SNR"
    twice = engine.runner.generate(req(checkpoint="xl-ztsnr", steps=4, noise_schedule="Zero Terminal SNR"))
    assert np.array_equal(pixels(twice.images[0]), pixels(ztsnr))
    engine.settings.update({"sd_noise_schedule": "Zero Terminal SNR"})
    assert np.array_equal(pixels(engine.runner.generate(req(checkpoint="xl-vpred", steps=4)).images[0]),
                          pixels(ztsnr))
    off = engine.runner.generate(req(checkpoint="xl-vpred", steps=4, noise_schedule="Default"))
    assert np.array_equal(pixels(off.images[0]), pixels(vpred)) and "Noise Schedule" not in off.infotexts[0]
    from webui.api.models import GenerationBody

    body = GenerationBody(prompt="x", override_settings={"sd_noise_schedule": "Zero Terminal SNR"})
    assert body.to_request()[0].noise_schedule == "Zero Terminal SNR"
