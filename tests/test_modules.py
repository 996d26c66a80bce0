""""VAE / Text encoder" (#19): files of their own chosen per job in place of a checkpoint's VAE or
text encoders, as Forge's additional modules: listed from models/VAE and models/text_encoder, read
for what they hold, used by the job, written to the infotext and chosen again from it; over the
API as `modules`, A1111's `sd_vae` and Forge's `forge_additional_modules`; bad choices named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import save_file

from webui.app import Engine, build_engine
from webui.config import Config
from webui.infotext import infotext_to_fields, parse_infotext
from webui.models.errors import ModelError
from webui.models.modules import part_of
from webui.pipeline.request import GenerationRequest
from webui.testing.make_checkpoint import vae_to_ldm
from webui.testing.make_flux import tiny_parts, write_flux


def req(**kw) -> GenerationRequest:
    base = {"prompt": "a red cube", "steps": 3, "width": 64, "height": 64, "seed": 7, "sampler_name": "Euler",
            "save_images": False}
    return GenerationRequest(**(base | kw))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.int16)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, checkpoint_store: Path) -> Path:
    from diffusers import AutoencoderKL

    from tests.conftest import add_checkpoint

    root = tmp_path_factory.mktemp("modules")
    add_checkpoint(root, checkpoint_store, "sd1.safetensors")
    write_flux(root / "models", name="flux1-dev", seed=1)
    te = root / "models" / "text_encoder"
    # a CLIP-L fine-tune under a name that is not a role's (users keep such files)
    other_clip = tiny_parts(seed=5).clip_l
    save_file({k: v.contiguous() for k, v in other_clip.state_dict().items() if "position_ids" not in k},
              str(te / "ViT-L-14-detail.safetensors"))
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(te / "notes.safetensors"))
    torch.manual_seed(7)
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_ldm(vae).items()},
              str(root / "models" / "VAE" / "other.safetensors"))
    return root


@pytest.fixture(scope="module")
def engine(root: Path) -> Engine:
    return build_engine(Config(data_dir=root, dtype="float32"))


def test_the_files_offered_and_what_each_holds(engine: Engine, root: Path) -> None:
    assert engine.module_names() == ["ae.safetensors", "other.safetensors", "clip_l.safetensors", "notes.safetensors",
                                     "t5xxl_fp16.safetensors", "ViT-L-14-detail.safetensors"]
    parts = {name: part_of(path) for name, path in engine.module_files()}
    assert parts == {"ae.safetensors": "vae", "other.safetensors": "vae", "clip_l.safetensors": "clip_l",
                     "notes.safetensors": None, "t5xxl_fp16.safetensors": "t5xxl",
                     "ViT-L-14-detail.safetensors": "clip_l"}


def test_a_chosen_text_encoder_takes_the_place_of_the_found_one(engine: Engine) -> None:
    auto = engine.runner.generate(req(checkpoint="flux1-dev", cfg_scale=1.0))
    chosen = engine.runner.generate(req(checkpoint="flux1-dev", cfg_scale=1.0,
                                        modules=("ViT-L-14-detail.safetensors",)))
    assert np.abs(pixels(auto) - pixels(chosen)).mean() > 0.5  # CLIP-L's pooled vector steers Flux
    fields = parse_infotext(chosen.infotexts[0])
    assert [fields[f"Module {i}"] for i in (1, 2, 3)] == ["ae", "ViT-L-14-detail", "t5xxl_fp16"]
    # PNG Info / paste choose the same files again, and the same image comes out
    restored = infotext_to_fields(fields)["modules"]
    assert restored == ("ae", "ViT-L-14-detail", "t5xxl_fp16")
    again = engine.runner.generate(req(checkpoint="flux1-dev", cfg_scale=1.0, modules=restored))
    assert np.array_equal(pixels(again), pixels(chosen))


def test_a_chosen_vae_for_an_sd1_checkpoint(engine: Engine) -> None:
    base = engine.runner.generate(req(checkpoint="sd1"))
    chosen = engine.runner.generate(req(checkpoint="sd1", modules=("other",)))
    assert np.abs(pixels(base) - pixels(chosen)).mean() > 1
    fields = parse_infotext(chosen.infotexts[0])
    assert (fields["VAE"], fields["Module 1"]) == ("other", "other")
    assert "Module 1" not in parse_infotext(base.infotexts[0])  # the checkpoint's own VAE: nothing to choose


@pytest.mark.parametrize("checkpoint,modules,message", [
    ("sd1", ("nope.safetensors",), r"modules: VAE / text encoder 'nope.safetensors' not found \(available: ae"),
    ("sd1", ("t5xxl_fp16",), r"modules: t5xxl_fp16.safetensors is a T5-XXL text encoder, and a SD 1.x model takes "
                             r"its text encoders from the checkpoint itself: remove it"),
    ("flux1-dev", ("clip_l", "ViT-L-14-detail"), r"two files chosen for the CLIP-L text encoder: clip_l.safetensors "
                                                 r"and ViT-L-14-detail.safetensors"),
    ("flux1-dev", ("notes",), r"notes.safetensors: neither a VAE nor a CLIP-L, CLIP-G or T5-XXL text encoder"),
])
def test_bad_choices_are_named_before_the_job_is_queued(engine: Engine, checkpoint: str, modules: tuple,
                                                        message: str) -> None:
    with pytest.raises((ModelError, ValueError), match=message) as err:  # not found: ModelError, as a checkpoint
        engine.check(req(checkpoint=checkpoint, modules=modules))
    assert isinstance(err.value, ModelError) == ("not found" in message)


def test_a_vae_of_another_latent_space_is_refused_when_loading(engine: Engine) -> None:
    with pytest.raises(ModelError, match="other.safetensors") as err:
        engine.runner.generate(req(checkpoint="flux1-dev", modules=("other",)))
    assert "channels" in str(err.value), err.value
    assert engine.runner.generate(req(checkpoint="sd1")).images  # the next job runs


def test_over_the_api_in_a1111_and_forge_terms(root: Path) -> None:
    from tests.conftest import start_server, stop_server

    s = start_server(root, "--api")
    try:
        api = s.url + "/sdapi/v1"
        listed = requests.get(api + "/sd-modules", timeout=30).json()
        assert isinstance(listed, list), listed
        assert [m["model_name"] for m in listed][:2] == ["ae.safetensors", "other.safetensors"]
        clip = next(m["filename"] for m in listed if m["model_name"] == "ViT-L-14-detail.safetensors")
        body = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "seed": 7, "cfg_scale": 1,
                "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "flux1-dev",
                                                               "forge_additional_modules": [clip]}}
        answer = requests.post(api + "/txt2img", json=body, timeout=300)
        assert answer.status_code == 200, answer.text
        assert "Module 2: ViT-L-14-detail" in answer.json()["info"]
        sd1 = {"prompt": "a red cube", "steps": 2, "width": 64, "height": 64, "override_settings":
               {"sd_model_checkpoint": "sd1", "sd_vae": "other.safetensors"}}
        answer = requests.post(api + "/txt2img", json=sd1, timeout=300)
        assert answer.status_code == 200 and "VAE: other" in answer.json()["info"], answer.text
        for automatic in ("Automatic", None):  # A1111's default, and what a client sends for "unset"
            sd1["override_settings"]["sd_vae"] = automatic
            assert "VAE:" not in requests.post(api + "/txt2img", json=sd1, timeout=300).json()["info"]
        sd1["override_settings"]["sd_vae"] = "missing.safetensors"
        answer = requests.post(api + "/txt2img", json=sd1, timeout=60)
        assert answer.status_code == 404 and "missing.safetensors" in answer.text, answer.text  # as a checkpoint
        answer = requests.post(api + "/txt2img", json={**sd1, "modules": ["t5xxl_fp16"],
                                                      "override_settings": {"sd_model_checkpoint": "sd1"}}, timeout=60)
        assert answer.status_code == 422 and "remove it from 'VAE / Text encoder'" in answer.text, answer.text
    finally:
        stop_server(s)
