"""The SDXL refiner as a model family: detection from keys and shapes (tiny and full-size
layouts), loading through `load_bundle`, its one text encoder (bigG) and a UNet step with
5 time ids (size, crop, aesthetic score)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from webui.models.detect import UNET_PREFIX, detect
from webui.models.families import FAMILIES
from webui.models.load import ModelBundle, load_bundle
from webui.models.readers import read_state_dict
from webui.prompts.encode import TextConditioner
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.devices import Runtime
from webui.testing.make_checkpoint import (
    TINY_REFINER_PROJECTION,
    TINY_REFINER_TEXT,
    make_state_dict,
    write_checkpoint,
)

CPU32 = Runtime(torch.device("cpu"), torch.float32, torch.float32)


@pytest.fixture(scope="module")
def refiner_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("refiner") / "refiner.safetensors", "sdxl-refiner", seed=7)


@pytest.fixture(scope="module")
def refiner(refiner_file: Path) -> ModelBundle:
    return load_bundle(refiner_file, runtime=CPU32, tokenizers=TokenizerFactory())


def test_family_records_what_the_denoiser_needs() -> None:
    family = FAMILIES["sdxl_refiner"]
    assert family.label == "SDXL Refiner"
    assert family.num_time_ids == 5 and family.aesthetic_score
    assert family.latent_space == FAMILIES["sdxl"].latent_space == "sdxl"
    assert family.latent_scaling_factor == FAMILIES["sdxl"].latent_scaling_factor
    assert (FAMILIES["sdxl"].num_time_ids, FAMILIES["sdxl"].aesthetic_score) == (6, False)
    assert [(s.kind, s.prefix, s.pooled) for s in family.text_encoders] == [
        ("openclip", "conditioner.embedders.0.model.", True)
    ]


def test_tiny_refiner_is_detected_from_keys_and_shapes(refiner_file: Path) -> None:
    found = detect(read_state_dict(refiner_file))
    assert (found.family.name, found.variant) == ("sdxl_refiner", "normal")
    u = found.unet_config
    width = TINY_REFINER_TEXT["hidden_size"]
    assert u["cross_attention_dim"] == width
    assert u["addition_embed_type"] == "text_time"
    assert u["addition_time_embed_dim"] == 8
    assert u["projection_class_embeddings_input_dim"] == TINY_REFINER_PROJECTION + 5 * 8
    assert u["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    # the middle block is as deep as the attention levels although the last level has none
    assert u["transformer_layers_per_block"] == [1, 2, 2]
    (te,) = found.text_configs
    assert (te["hidden_size"], te["projection_dim"], te["hidden_act"], te["pad_token_id"]) == (
        width, TINY_REFINER_PROJECTION, "gelu", 0
    )


def test_refiner_loads_and_runs_a_unet_step(refiner: ModelBundle) -> None:
    assert refiner.family.name == "sdxl_refiner" and refiner.family.aesthetic_score
    assert len(refiner.text_encoders) == 1
    cond = TextConditioner(refiner).batch(["a red cube on a table", ""])
    width = TINY_REFINER_TEXT["hidden_size"]
    assert cond.context.shape == (2, 77, width)
    assert cond.pooled is not None and cond.pooled.shape == (2, TINY_REFINER_PROJECTION)

    # context = bigG penultimate hidden state without the final layer norm; pooled = projection
    enc = refiner.text_encoders[0]
    ids = enc.tokenizer(["a red cube on a table"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert ids[0, -1].item() == 0  # OpenCLIP pads with "!"
    with torch.no_grad():
        out = enc.model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(cond.context[0], out.hidden_states[-2][0])
    torch.testing.assert_close(cond.pooled[0], out.text_embeds[0])

    latent = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))

    def unet(aesthetic: float) -> torch.Tensor:
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, aesthetic]])  # size h, w; crop top, left; score
        with torch.no_grad():
            return refiner.unet(
                latent,
                torch.tensor([500.0]),
                encoder_hidden_states=cond.context[:1],
                added_cond_kwargs={"text_embeds": cond.pooled[:1], "time_ids": time_ids},
            ).sample

    eps, low = unet(6.0), unet(2.5)
    assert eps.shape == latent.shape and torch.isfinite(eps).all()
    assert not torch.equal(eps, low)  # the aesthetic score reaches the UNet


def test_full_size_refiner_layout_gives_the_refiner_architecture() -> None:
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, infer_diffusers_model_type

    with torch.device("meta"):  # shapes only: no 9 GB of memory
        sd = make_state_dict("sdxl-refiner", full_size=True)
    assert infer_diffusers_model_type(sd) == "xl_refiner"  # diffusers recognises the layout too
    found = detect(sd)
    assert found.family.name == "sdxl_refiner"
    u = found.unet_config
    expected = {
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [384, 768, 1536, 1536],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": 1280,
        "attention_head_dim": [6, 12, 24, 24],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2560,
        "sample_size": 128,
    }
    assert {k: u[k] for k in expected} == expected
    # middle levels and the middle block: 4 transformer blocks (diffusers reads the middle's from [-1])
    assert u["transformer_layers_per_block"][1:] == [4, 4, 4]
    (te,) = found.text_configs
    assert (te["hidden_size"], te["num_hidden_layers"], te["num_attention_heads"], te["projection_dim"]) == (
        1280, 32, 20, 1280
    )
    # the file's UNet tensors fit the module built from that config, key for key and shape for shape
    weights = convert_ldm_unet_checkpoint({k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}, u)
    with torch.device("meta"):
        reference = UNet2DConditionModel.from_config(u).state_dict()
    assert set(weights) == set(reference)
    assert all(weights[k].shape == reference[k].shape for k in reference)
    assert sd[UNET_PREFIX + "label_emb.0.0.weight"].shape == (1536, 2560)


def test_sdxl_embedding_gives_its_bigG_vectors_to_the_refiner(refiner: ModelBundle) -> None:
    from webui.networks.embeddings import Embedding

    width = TINY_REFINER_TEXT["hidden_size"]
    g = torch.randn((1, width), generator=torch.Generator().manual_seed(1))
    emb = Embedding("shinystyle", {"clip_l": torch.randn((1, 32)), "clip_g": g})
    context = TextConditioner(refiner, embeddings=[emb]).encode("a shinystyle cube").context
    plain = TextConditioner(refiner).encode("a shinystyle cube").context
    assert context.shape == (77, width) and not torch.equal(context, plain)
