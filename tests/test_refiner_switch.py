"""A second model taking over for the last part of the steps (the refiner switch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import add_checkpoint
from webui.app import Engine, build_engine
from webui.config import Config
from webui.infotext import parse_infotext
from webui.models.errors import ModelError
from webui.pipeline.request import GenerationRequest


def req(**kw) -> GenerationRequest:
    base = dict(prompt="a red cube", steps=6, width=64, height=64, seed=77, sampler_name="Euler",
                save_images=False, checkpoint="sd1.safetensors")
    base.update(kw)
    return GenerationRequest(**base)


@pytest.fixture
def engine(data_dir: Path, checkpoint_store: Path) -> Engine:
    add_checkpoint(data_dir, checkpoint_store, "sd1-other.safetensors")
    return build_engine(Config(data_dir=data_dir, dtype="float32", model_cache_size=2))


def px(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.int16)


def test_same_model_as_refiner_changes_nothing(engine: Engine) -> None:
    # Euler is single-step: splitting its sigmas between two runs of one model is seamless.
    plain = engine.runner.generate(req())
    split = engine.runner.generate(req(refiner_checkpoint="sd1.safetensors", refiner_switch_at=0.5))
    assert np.abs(px(plain) - px(split)).max() <= 1


def test_refiner_takes_over_and_is_recorded(engine: Engine) -> None:
    plain = engine.runner.generate(req())
    steps = []
    refined = engine.runner.generate(req(refiner_checkpoint="sd1-other.safetensors", refiner_switch_at=0.5),
                                     progress=lambda p: steps.append(p.step))
    assert steps == [1, 2, 3, 4, 5, 6]  # one progress count across both models
    assert np.abs(px(plain) - px(refined)).mean() > 1
    fields = parse_infotext(refined.infotexts[0])
    assert fields["Model"] == "sd1"
    assert fields["Refiner"].startswith("sd1-other")
    assert fields["Refiner switch at"] == "0.5"
    # switching at 1.0 never runs the refiner
    late = engine.runner.generate(req(refiner_checkpoint="sd1-other.safetensors", refiner_switch_at=1.0))
    assert np.abs(px(plain) - px(late)).max() <= 1
    assert "Refiner" not in parse_infotext(late.infotexts[0])


def test_refiner_in_a_batch_and_with_hires(engine: Engine) -> None:
    result = engine.runner.generate(req(refiner_checkpoint="sd1-other.safetensors", n_iter=2,
                                        enable_hr=True, hr_scale=1.5, denoising_strength=0.5))
    assert [im.size for im in result.images] == [(96, 96), (96, 96)]
    for text in result.infotexts:
        assert parse_infotext(text)["Model"] == "sd1"
    # the next job without a refiner runs on the base model again
    again = engine.runner.generate(req())
    assert np.abs(px(again) - px(engine.runner.generate(req()))).max() == 0


def test_refiner_from_another_latent_space_is_refused(engine: Engine, data_dir: Path,
                                                      checkpoint_store: Path) -> None:
    add_checkpoint(data_dir, checkpoint_store, "sdxl.safetensors")
    engine.registry.refresh(compute_hashes=False)
    with pytest.raises(ModelError, match="latent spaces differ"):
        engine.runner.generate(req(refiner_checkpoint="sdxl.safetensors"))
    assert engine.runner.generate(req()).images  # the next job runs


def test_missing_refiner_is_named(engine: Engine) -> None:
    with pytest.raises(ModelError, match="nope"):
        engine.runner.generate(req(refiner_checkpoint="nope.safetensors"))


def test_sdxl_base_hands_over_to_an_sdxl_refiner(data_dir: Path, checkpoint_store: Path) -> None:
    from webui.testing.make_checkpoint import write_checkpoint

    add_checkpoint(data_dir, checkpoint_store, "sdxl.safetensors")
    write_checkpoint(data_dir / "models" / "Stable-diffusion" / "sdxl-refiner.safetensors", "sdxl-refiner", seed=8)
    engine = build_engine(Config(data_dir=data_dir, dtype="float32", model_cache_size=2))
    base = req(checkpoint="sdxl.safetensors", width=64, height=64)
    plain = engine.runner.generate(base)
    refined = engine.runner.generate(base.model_copy(update={"refiner_checkpoint": "sdxl-refiner",
                                                             "refiner_switch_at": 0.5}))
    image = refined.images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 1
    assert np.abs(px(plain) - px(refined)).mean() > 1
    fields = parse_infotext(refined.infotexts[0])
    assert fields["Model"] == "sdxl" and fields["Refiner"].startswith("sdxl-refiner")


def test_refiner_gets_the_loras_and_tiling_and_both_models_come_back(engine: Engine, data_dir: Path) -> None:
    from tests.test_lora import SD1_KOHYA, kohya_file

    (data_dir / "models" / "Lora").mkdir(parents=True, exist_ok=True)
    kohya_file(data_dir / "models" / "Lora" / "shiny.safetensors", SD1_KOHYA, seed=3)
    engine.networks.refresh()
    base, refiner = engine.bundle("sd1.safetensors"), engine.bundle("sd1-other.safetensors")
    target = refiner.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    originals = {name: {k: v.clone() for k, v in b.unet.state_dict().items()} for name, b in
                 (("base", base), ("refiner", refiner))}
    seen: list[tuple[int, bool, str]] = []

    def progress(p) -> None:  # after each step: is the refiner's weight merged, its padding circular?
        merged = not torch.equal(target.weight, originals["refiner"]["down_blocks.0.attentions.0.transformer_blocks.0"
                                                                        ".attn1.to_q.weight"])
        seen.append((p.step, merged, refiner.unet.conv_in.padding_mode))

    engine.runner.generate(req(prompt="a red cube <lora:shiny:1>", tiling=True,
                               refiner_checkpoint="sd1-other.safetensors", refiner_switch_at=0.5), progress=progress)
    assert [s[1:] for s in seen[3:]] == [(True, "circular")] * 3  # the refiner's steps
    assert [s[1:] for s in seen[:3]] == [(False, "zeros")] * 3  # before it took over: untouched
    for name, b in (("base", base), ("refiner", refiner)):
        after = b.unet.state_dict()
        assert all(torch.equal(after[k], v) for k, v in originals[name].items()), name
        assert b.unet.conv_in.padding_mode == "zeros"
