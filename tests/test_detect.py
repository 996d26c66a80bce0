"""Family and variant detection from keys and shapes, for tiny and full-size layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from webui.models.detect import UNET_PREFIX, detect
from webui.models.errors import ModelError
from webui.models.readers import read_state_dict
from webui.testing.make_checkpoint import make_state_dict


@pytest.mark.parametrize(
    "name, family, variant",
    [
        ("sd1.safetensors", "sd1", "normal"),
        ("sd2.safetensors", "sd2", "normal"),
        ("sdxl.safetensors", "sdxl", "normal"),
        ("sd1-inpaint.safetensors", "sd1", "inpaint"),
    ],
)
def test_each_family_is_detected(checkpoint_store: Path, name: str, family: str, variant: str) -> None:
    found = detect(read_state_dict(checkpoint_store / name))
    assert (found.family.name, found.variant) == (family, variant)


def test_full_size_sd15_layout_gives_the_sd15_architecture() -> None:
    with torch.device("meta"):  # shapes only: no 4 GB of memory
        sd = make_state_dict("sd1", full_size=True)
    found = detect(sd)
    u = found.unet_config
    assert found.family.name == "sd1"
    assert u["block_out_channels"] == [320, 640, 1280, 1280]
    assert u["layers_per_block"] == 2
    assert u["cross_attention_dim"] == 768
    assert u["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert u["attention_head_dim"] == 8 and not u["use_linear_projection"]
    assert found.vae_config["block_out_channels"] == [128, 256, 512, 512]
    te = found.text_configs[0]
    assert (te["hidden_size"], te["num_hidden_layers"], te["num_attention_heads"]) == (768, 12, 12)


def test_full_size_sdxl_layout_gives_the_sdxl_base_architecture() -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, infer_diffusers_model_type

    with torch.device("meta"):  # shapes only: no 14 GB of memory
        sd = make_state_dict("sdxl", full_size=True)
    assert infer_diffusers_model_type(sd) == "xl_base"  # diffusers recognises the layout too
    found = detect(sd)
    u = found.unet_config
    assert found.family.name == "sdxl"
    expected = {
        "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "attention_head_dim": [5, 10, 20], "use_linear_projection": True, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
    }
    assert {k: u[k] for k in expected} == expected
    assert list(u["transformer_layers_per_block"])[1:] == [2, 10]
    clip_l, big_g = found.text_configs
    assert (clip_l["hidden_size"], clip_l["num_hidden_layers"]) == (768, 12)
    assert (big_g["hidden_size"], big_g["num_hidden_layers"], big_g["projection_dim"]) == (1280, 32, 1280)
    weights = convert_ldm_unet_checkpoint({k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}, u)
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(u).state_dict()
    assert set(weights) == set(reference)
    assert all(weights[k].shape == reference[k].shape for k in reference)


def test_sdxl_size_conditioning_width_is_read_from_shapes(checkpoint_store: Path) -> None:
    found = detect(read_state_dict(checkpoint_store / "sdxl.safetensors"))
    assert found.unet_config["addition_embed_type"] == "text_time"
    assert found.unet_config["projection_class_embeddings_input_dim"] == 48 + 6 * 8
    assert found.unet_config["cross_attention_dim"] == 32 + 48


def test_v_pred_key_is_noticed(checkpoint_store: Path) -> None:
    sd = read_state_dict(checkpoint_store / "sd2.safetensors")
    assert not detect(sd).v_pred_key
    sd["v_pred"] = torch.zeros(0)
    assert detect(sd).v_pred_key and not detect(sd).ztsnr_key
    sd["ztsnr"] = torch.zeros(0)
    assert detect(sd).ztsnr_key


def test_unrecognised_files_say_what_they_are(checkpoint_store: Path) -> None:
    sd = read_state_dict(checkpoint_store / "sd1.safetensors")
    vae_only = {k.removeprefix("first_stage_model."): v for k, v in sd.items() if k.startswith("first_stage_model.")}
    with pytest.raises(ModelError, match="VAE"):
        detect(vae_only, Path("x.safetensors"))
    with pytest.raises(ModelError, match="LoRA"):
        detect({"lora_unet_down.lora_up.weight": torch.zeros(1)}, Path("x.safetensors"))
    no_text = {k: v for k, v in sd.items() if not k.startswith("cond_stage_model.")}
    with pytest.raises(ModelError, match="text encoder"):
        detect(no_text, Path("x.safetensors"))
    broken = {k: v for k, v in sd.items() if "attn2.to_k" not in k}
    with pytest.raises(ModelError):
        detect(broken, Path("x.safetensors"))


def test_the_pipeline_names_no_family() -> None:
    """Families are data (webui.models.families): the pipeline reads a family's fields (time ids,
    preview factors, TAESD stem, schedule list) and never tests its name, so a new family is a new
    spec plus detection."""
    import re

    root = Path(__file__).resolve().parents[1] / "webui"
    offenders = []
    for folder in ("pipeline", "samplers", "prompts", "networks"):
        for path in (root / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r'family\.name|startswith\("sd|== "sd(1|2|xl)"', line):
                    offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
