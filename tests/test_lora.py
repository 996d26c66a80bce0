"""LoRA files on tiny models: the kohya (SD1 diffusers names, SDXL LDM names), LoCon and
diffusers/peft layouts, the merge formula, exact restore, several LoRAs, bad files; and the
network registry (names, previews, short hashes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from webui.models.errors import ModelError
from webui.models.hashing import HashCache, sha256_file
from webui.models.load import ModelBundle, load_bundle
from webui.networks.lora import apply_loras, load_lora, resolve
from webui.networks.lora_names import PATCHABLE, ldm_unet_name
from webui.networks.registry import NetworkRegistry
from webui.prompts.tokenizer import TokenizerFactory
from webui.runtime.devices import Runtime

CPU32 = Runtime(torch.device("cpu"), torch.float32, torch.float32)


def _bundle(store: Path, name: str, runtime: Runtime = CPU32) -> ModelBundle:
    return load_bundle(store / name, runtime=runtime, tokenizers=TokenizerFactory())


@pytest.fixture(scope="module")
def sd1(checkpoint_store: Path) -> ModelBundle:
    return _bundle(checkpoint_store, "sd1.safetensors")


@pytest.fixture(scope="module")
def sdxl(checkpoint_store: Path) -> ModelBundle:
    return _bundle(checkpoint_store, "sdxl.safetensors")


# --- writing LoRA files -------------------------------------------------------------------------


def _pair(gen: torch.Generator, out: int, inp: int, rank: int, kernel: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if kernel is None:
        down, up = torch.randn(rank, inp, generator=gen), torch.randn(out, rank, generator=gen)
    else:
        down, up = torch.randn(rank, inp, kernel, kernel, generator=gen), torch.randn(out, rank, 1, 1, generator=gen)
    return down * 0.3, up * 0.3


def kohya_file(path: Path, layers: dict[str, tuple], seed: int = 0, rank: int = 4, alpha: float | None = 2.0) -> Path:
    """layers: kohya name -> (out, in) or (out, in, kernel)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in layers.items():
        down, up = _pair(gen, shape[0], shape[1], rank, shape[2] if len(shape) > 2 else None)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(sd, path)
    return path


SD1_KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (32, 32),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": (512, 64),
    "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn1_to_out_0": (32, 32),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32, 1),  # 1x1 conv (SD1 uses conv projections)
    "lora_unet_down_blocks_0_resnets_0_conv1": (32, 32, 3),  # LoCon on a 3x3 conv
    "lora_unet_up_blocks_0_resnets_1_time_emb_proj": (64, 128),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
    "lora_te_text_model_encoder_layers_2_mlp_fc1": (64, 32),
}
SD1_KOHYA_MODULES = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "unet.down_blocks.0.attentions.0.proj_in",
    "unet.down_blocks.0.resnets.0.conv1",
    "unet.up_blocks.0.resnets.1.time_emb_proj",
    "text_encoders[0].encoder.layers.0.self_attn.q_proj",
    "text_encoders[0].encoder.layers.2.mlp.fc1",
}

# Tiny SDXL UNet: layers_per_block=1; down 0 plain (input_blocks 1, downsampler 2), down 1 with
# attention (input_blocks 3); up 0 with attention (output_blocks 0, 1 + upsampler at 1.2).
SDXL_KOHYA = {
    "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k": ((64, 80), "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"),
    "lora_unet_input_blocks_3_1_proj_in": ((64, 64), "unet.down_blocks.1.attentions.0.proj_in"),
    "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_v": ((64, 64), "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v"),
    "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_2": ((64, 256), "unet.up_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"),
    "lora_unet_output_blocks_1_2_conv": ((64, 64, 3), "unet.up_blocks.0.upsamplers.0.conv"),
    "lora_unet_input_blocks_2_0_op": ((32, 32, 3), "unet.down_blocks.0.downsamplers.0.conv"),
    "lora_unet_input_blocks_1_0_in_layers_2": ((32, 32, 3), "unet.down_blocks.0.resnets.0.conv1"),
    "lora_unet_output_blocks_2_0_skip_connection": ((32, 96, 1), "unet.up_blocks.1.resnets.0.conv_shortcut"),
    "lora_unet_label_emb_0_0": ((128, 96), "unet.add_embedding.linear_1"),
    "lora_unet_time_embed_2": ((128, 128), "unet.time_embedding.linear_2"),
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": ((32, 32), "text_encoders[0].encoder.layers.0.self_attn.k_proj"),
    "lora_te2_text_model_encoder_layers_2_mlp_fc2": ((48, 64), "text_encoders[1].text_model.encoder.layers.2.mlp.fc2"),
    "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": ((48, 48), "text_encoders[1].text_model.encoder.layers.1.self_attn.out_proj"),
}


def peft_file(path: Path, layers: dict[str, tuple[int, int]], seed: int = 0, rank: int = 4, style: str = "peft") -> Path:
    gen = torch.Generator().manual_seed(seed)
    names = {
        "peft": (".lora_A.weight", ".lora_B.weight"),
        "lora": (".lora.down.weight", ".lora.up.weight"),
    }[style]
    sd = {}
    for name, (out, inp) in layers.items():
        down, up = _pair(gen, out, inp, rank)
        sd[name + names[0]], sd[name + names[1]] = down, up
    save_file(sd, path)
    return path


# --- helpers ------------------------------------------------------------------------------------


def full_state(bundle: ModelBundle) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v.clone() for k, v in bundle.unet.state_dict().items()}
    for i, te in enumerate(bundle.text_encoders):
        out.update({f"te{i}.{k}": v.clone() for k, v in te.model.state_dict().items()})
    return out


def assert_bit_identical(before: dict[str, torch.Tensor], bundle: ModelBundle) -> None:
    after = full_state(bundle)
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"not restored: {changed[:5]}"


def unet_out(bundle: ModelBundle) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    unet = bundle.unet
    context = unet.config.cross_attention_dim
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    states = torch.randn(1, 5, context, generator=gen)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=gen), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=states, **kwargs).sample


def te_out(bundle: ModelBundle, index: int) -> torch.Tensor:
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 3])
    with torch.no_grad():
        return bundle.text_encoders[index].model(ids).last_hidden_state


def expected_delta(lora_module, weight: torch.Tensor) -> torch.Tensor:
    up, down = lora_module.up.float().flatten(1), lora_module.down.float().flatten(1)
    return (up @ down * lora_module.scale).reshape(weight.shape)


# --- kohya SD1 ----------------------------------------------------------------------------------


def test_kohya_sd1_layers_resolve_to_the_right_modules(tmp_path: Path, sd1: ModelBundle) -> None:
    lora = load_lora(kohya_file(tmp_path / "style.safetensors", SD1_KOHYA))
    assert lora.name == "style" and len(lora.modules) == len(SD1_KOHYA)
    r = resolve(lora, sd1)
    assert {p.module_name for p in r.patches} == SD1_KOHYA_MODULES
    assert r.unmatched == [] and r.wrong_shape == []
    assert all(p.lora.alpha == 2.0 and p.lora.scale == 0.5 for p in r.patches)


def test_merge_follows_the_formula_and_restores_bit_exactly(tmp_path: Path, sd1: ModelBundle) -> None:
    lora = load_lora(kohya_file(tmp_path / "a.safetensors", SD1_KOHYA, alpha=3.0))
    before = full_state(sd1)
    unet0, te0 = unet_out(sd1), te_out(sd1, 0)
    patches = resolve(lora, sd1).patches
    originals = {p.module_name: p.weight.detach().clone() for p in patches}
    pointers = {p.module_name: p.weight.data_ptr() for p in patches}
    with apply_loras(sd1, [(lora, 0.7)]) as applied:
        assert len(applied) == 1 and len(applied[0].patches) == len(SD1_KOHYA)
        for p in patches:
            want = originals[p.module_name] + 0.7 * expected_delta(p.lora, p.weight)
            torch.testing.assert_close(p.weight, want, rtol=1e-6, atol=1e-6)
            assert not torch.equal(p.weight, originals[p.module_name])
        assert (unet_out(sd1) - unet0).abs().max() > 1e-4
        assert (te_out(sd1, 0) - te0).abs().max() > 1e-4
    assert_bit_identical(before, sd1)
    assert {p.module_name: p.weight.data_ptr() for p in patches} == pointers  # same tensors, written back
    assert torch.equal(unet_out(sd1), unet0) and torch.equal(te_out(sd1, 0), te0)


def test_restores_when_the_body_raises(tmp_path: Path, sd1: ModelBundle) -> None:
    lora = load_lora(kohya_file(tmp_path / "a.safetensors", SD1_KOHYA))
    before = full_state(sd1)
    with pytest.raises(RuntimeError, match="job failed"):
        with apply_loras(sd1, [(lora, 1.0)]):
            assert not torch.equal(
                sd1.unet.get_submodule("down_blocks.0.resnets.0.conv1").weight, before["unet.down_blocks.0.resnets.0.conv1.weight"]
            )
            raise RuntimeError("job failed")
    assert_bit_identical(before, sd1)


def test_several_loras_at_once_add_up(tmp_path: Path, sd1: ModelBundle) -> None:
    a = load_lora(kohya_file(tmp_path / "a.safetensors", SD1_KOHYA, seed=1))
    shared = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    b = load_lora(kohya_file(tmp_path / "b.safetensors", {shared: (32, 32), "lora_te_text_model_encoder_layers_1_mlp_fc2": (32, 64)}, seed=2, alpha=None))
    before = full_state(sd1)
    target = sd1.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q").weight
    w0 = target.detach().clone()
    da = next(m for m in a.modules if m.key == shared)
    db = next(m for m in b.modules if m.key == shared)
    with apply_loras(sd1, [(a, 0.5), (b, -1.25)]) as applied:
        assert [len(r.patches) for r in applied] == [len(SD1_KOHYA), 2]
        want = w0 + 0.5 * expected_delta(da, target) - 1.25 * expected_delta(db, target)
        torch.testing.assert_close(target, want, rtol=1e-6, atol=1e-6)
        fc2 = sd1.text_encoders[0].model.get_submodule("encoder.layers.1.mlp.fc2").weight
        assert not torch.equal(fc2, before["te0.encoder.layers.1.mlp.fc2.weight"])
    assert_bit_identical(before, sd1)


def test_nested_and_zero_weight(tmp_path: Path, sd1: ModelBundle) -> None:
    a = load_lora(kohya_file(tmp_path / "a.safetensors", SD1_KOHYA, seed=1))
    b = load_lora(kohya_file(tmp_path / "b.safetensors", SD1_KOHYA, seed=2))
    before = full_state(sd1)
    with apply_loras(sd1, [(a, 0.0)]) as applied:
        assert applied == []
        assert_bit_identical(before, sd1)
    with apply_loras(sd1, [(a, 1.0)]):
        mid = full_state(sd1)
        with apply_loras(sd1, [(b, 1.0)]):
            pass
        assert_bit_identical(mid, sd1)
    assert_bit_identical(before, sd1)


def test_low_precision_weights_merge_in_their_dtype_and_restore(tmp_path: Path, checkpoint_store: Path) -> None:
    bundle = _bundle(checkpoint_store, "sd1.safetensors", Runtime(torch.device("cpu"), torch.bfloat16, torch.float32))
    lora = load_lora(kohya_file(tmp_path / "a.safetensors", SD1_KOHYA))
    before = full_state(bundle)
    patch = resolve(lora, bundle).patches[0]
    w0 = patch.weight.detach().clone()
    with apply_loras(bundle, [(lora, 1.0)]):
        assert patch.weight.dtype == torch.bfloat16
        want = (w0.float() + expected_delta(patch.lora, w0)).to(torch.bfloat16)
        assert torch.equal(patch.weight, want)  # summed in float32, rounded once
    assert_bit_identical(before, bundle)


# --- kohya SDXL (LDM names) ---------------------------------------------------------------------


def test_kohya_sdxl_ldm_names(tmp_path: Path, sdxl: ModelBundle) -> None:
    layers = {k: shape for k, (shape, _) in SDXL_KOHYA.items()}
    lora = load_lora(kohya_file(tmp_path / "xl.safetensors", layers, seed=3))
    r = resolve(lora, sdxl)
    got = {p.lora.key: p.module_name for p in r.patches}
    assert got == {k: module for k, (_, module) in SDXL_KOHYA.items()}
    assert r.unmatched == [] and r.wrong_shape == []
    before = full_state(sdxl)
    outs = unet_out(sdxl), te_out(sdxl, 0), te_out(sdxl, 1)
    with apply_loras(sdxl, [(lora, 0.8)]):
        for p in r.patches:
            want = before_weight(before, p.module_name) + 0.8 * expected_delta(p.lora, p.weight)
            torch.testing.assert_close(p.weight, want, rtol=1e-6, atol=1e-6)
        new = unet_out(sdxl), te_out(sdxl, 0), te_out(sdxl, 1)
        assert all((x - y).abs().max() > 1e-4 for x, y in zip(outs, new))
    assert_bit_identical(before, sdxl)
    assert all(torch.equal(x, y) for x, y in zip(outs, (unet_out(sdxl), te_out(sdxl, 0), te_out(sdxl, 1))))


def before_weight(state: dict[str, torch.Tensor], module_name: str) -> torch.Tensor:
    owner, path = module_name.split(".", 1)
    prefix = "unet" if owner == "unet" else f"te{owner[len('text_encoders[')]}"
    return state[f"{prefix}.{path}.weight"]


def test_ldm_names_agree_with_diffusers_checkpoint_conversion() -> None:
    """Our module-level LDM names, checked against diffusers' own LDM->diffusers converter on a
    UNet with the real block structure (2 layers per block, SDXL and SD1 layouts)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from webui.testing.make_checkpoint import unet_to_ldm

    xl = dict(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16, 32), transformer_layers_per_block=(1, 2, 3), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32,
    )
    sd1 = dict(
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(8, 16, 32, 32),
    )
    for extra in (xl, sd1):
        unet = UNet2DConditionModel(layers_per_block=2, cross_attention_dim=8, attention_head_dim=1, norm_num_groups=4, sample_size=8, **extra)
        ldm_keys = list(unet_to_ldm(unet))
        tagged = {k: torch.full((1,), float(i)) for i, k in enumerate(ldm_keys)}
        converted = convert_ldm_unet_checkpoint(dict(tagged), dict(unet.config))
        diffusers_of = {v.item(): k for k, v in converted.items()}
        checked = 0
        for name, module in unet.named_modules():
            if isinstance(module, PATCHABLE):
                ldm = ldm_unet_name(name, unet.config)
                assert ldm is not None, name
                assert diffusers_of[tagged[f"model.diffusion_model.{ldm}.weight"].item()] == f"{name}.weight"
                checked += 1
        assert checked > 50


# --- diffusers / peft ---------------------------------------------------------------------------


def test_diffusers_peft_layouts(tmp_path: Path, sd1: ModelBundle, sdxl: ModelBundle) -> None:
    peft = peft_file(
        tmp_path / "peft.safetensors",
        {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": (32, 32),
            "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0": (32, 32),
            "text_encoder.text_model.encoder.layers.2.self_attn.out_proj": (32, 32),
        },
    )
    old = peft_file(
        tmp_path / "old.safetensors",
        {
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora": (64, 64),
            "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (64, 32),
            "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora": (32, 32),
        },
        style="lora",
    )
    r = resolve(load_lora(peft), sd1)
    assert {p.module_name for p in r.patches} == {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "text_encoders[0].encoder.layers.2.self_attn.out_proj",
    }
    assert all(p.lora.alpha is None and p.lora.scale == 1.0 for p in r.patches)
    # attention-processor names ("...processor.to_out_lora.down.weight" style with .lora.down)
    r_old = resolve(load_lora(old), sd1)
    assert {p.module_name for p in r_old.patches} == {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "text_encoders[0].encoder.layers.0.self_attn.q_proj",
    }
    xl = peft_file(
        tmp_path / "xl.safetensors",
        {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q": (64, 64),
            "text_encoder.text_model.encoder.layers.1.mlp.fc1": (64, 32),
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (48, 48),
        },
    )
    before = full_state(sdxl)
    lora = load_lora(xl)
    with apply_loras(sdxl, [(lora, 1.0)]) as (res,):
        assert {p.module_name for p in res.patches} == {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q",
            "text_encoders[0].encoder.layers.1.mlp.fc1",
            "text_encoders[1].text_model.encoder.layers.0.self_attn.q_proj",
        }
        q = sdxl.text_encoders[1].model.get_submodule("text_model.encoder.layers.0.self_attn.q_proj").weight
        m = next(x for x in lora.modules if x.component == "te2")
        torch.testing.assert_close(q, before["te1.text_model.encoder.layers.0.self_attn.q_proj.weight"] + expected_delta(m, q))
    assert_bit_identical(before, sdxl)


def test_attention_processor_text_names(tmp_path: Path, sd1: ModelBundle) -> None:
    gen = torch.Generator().manual_seed(5)
    down, up = _pair(gen, 32, 32, 2)
    path = tmp_path / "proc.safetensors"
    save_file(
        {
            "text_encoder.text_model.encoder.layers.1.self_attn.to_v_lora.down.weight": down,
            "text_encoder.text_model.encoder.layers.1.self_attn.to_v_lora.up.weight": up,
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.down.weight": down.clone(),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.up.weight": up.clone(),
        },
        path,
    )
    r = resolve(load_lora(path), sd1)
    assert {p.module_name for p in r.patches} == {
        "text_encoders[0].encoder.layers.1.self_attn.v_proj",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    }


# --- partial matches and bad files --------------------------------------------------------------


def test_unmatched_and_wrong_shape_keys_are_reported(tmp_path: Path, sd1: ModelBundle) -> None:
    layers = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
        "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),  # no such block
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k": (32, 32),  # real layer is 64x64
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),  # SD1 has one encoder
    }
    r = resolve(load_lora(kohya_file(tmp_path / "part.safetensors", layers)), sd1)
    assert [p.lora.key for p in r.patches] == ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert sorted(r.unmatched) == [
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_unet_down_blocks_7_attentions_0_transformer_blocks_0_attn1_to_q",
    ]
    assert r.wrong_shape == ["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_k"]
    assert len(r.warnings()) == 2


def test_lora_for_another_family_is_an_error_naming_the_file(tmp_path: Path, sdxl: ModelBundle) -> None:
    unet_only = {k: v for k, v in SD1_KOHYA.items() if k.startswith("lora_unet_down_blocks_0_attentions")}
    lora = load_lora(kohya_file(tmp_path / "sd1-style.safetensors", unet_only))
    before = full_state(sdxl)
    with pytest.raises(ModelError, match=r"sd1-style\.safetensors: none of its 3 LoRA layers match a layer of this SDXL model"):
        with apply_loras(sdxl, [(lora, 1.0)]):
            pass
    assert_bit_identical(before, sdxl)


def test_bad_files_are_model_errors(tmp_path: Path) -> None:
    not_lora = tmp_path / "weights.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4)}, not_lora)
    with pytest.raises(ModelError, match=r"weights\.safetensors: not a LoRA in a known layout"):
        load_lora(not_lora)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelError, match="garbage.safetensors"):
        load_lora(garbage)

    loha = tmp_path / "loha.safetensors"
    save_file(
        {f"lora_unet_mid_block_attentions_0_proj_in.{k}": torch.zeros(2, 2) for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        | {"lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(1.0)},
        loha,
    )
    with pytest.raises(ModelError, match="not supported"):
        load_lora(loha)

    bad_rank = tmp_path / "rank.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4), "lora_unet_conv_in.lora_up.weight": torch.zeros(4, 3)}, bad_rank)
    with pytest.raises(ModelError, match="malformed LoRA pair"):
        load_lora(bad_rank)

    missing = tmp_path / "missing.txt"
    with pytest.raises(ModelError, match="not found"):
        load_lora(missing)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_lora_is_read_weights_only(tmp_path: Path, sd1: ModelBundle) -> None:
    gen = torch.Generator().manual_seed(0)
    down, up = _pair(gen, 32, 32, 4)
    good = tmp_path / "old.pt"
    torch.save({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": up}, good)
    assert len(resolve(load_lora(good), sd1).patches) == 1
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"lora_unet_conv_in.lora_down.weight": down, "x": _Payload(marker)}, evil)
    with pytest.raises(ModelError, match="refused"):
        load_lora(evil)
    assert not marker.exists()


def test_dora_layers_are_skipped_not_misapplied(tmp_path: Path, sd1: ModelBundle) -> None:
    path = kohya_file(tmp_path / "dora.safetensors", {k: SD1_KOHYA[k] for k in list(SD1_KOHYA)[:2]})
    from safetensors.torch import load_file

    sd = load_file(path)
    first = list(SD1_KOHYA)[0]
    sd[f"{first}.dora_scale"] = torch.ones(1, 32)
    save_file(sd, path)
    lora = load_lora(path)
    assert [m.key for m in lora.modules] == [list(SD1_KOHYA)[1]]
    assert lora.unsupported == [f"{first}.dora_scale"]
    assert any("unsupported" in w for w in resolve(lora, sd1).warnings())


# --- registry -----------------------------------------------------------------------------------


def test_registry_names_previews_and_hashes(tmp_path: Path) -> None:
    lora_dir, emb_dir = tmp_path / "Lora", tmp_path / "embeddings"
    (lora_dir / "styles").mkdir(parents=True)
    emb_dir.mkdir()
    a = kohya_file(lora_dir / "Detail.safetensors", {"lora_unet_conv_in": (32, 4, 3)})
    b = kohya_file(lora_dir / "styles" / "ink.safetensors", {"lora_unet_conv_in": (32, 4, 3)}, seed=1)
    (lora_dir / "styles" / "ink.preview.png").write_bytes(b"png")
    (lora_dir / "Detail.jpg").write_bytes(b"jpg")
    (lora_dir / "notes.txt").write_text("ignored")
    (emb_dir / "neg.pt").write_bytes(b"x")
    hashes = HashCache(tmp_path / "cache" / "hashes.json")
    reg = NetworkRegistry(lora_dir, emb_dir, hashes)
    reg.refresh()
    assert [f.name for f in reg.loras()] == ["Detail", "styles/ink"]
    assert [f.name for f in reg.embeddings()] == ["neg"]
    assert reg.find_lora("ink").path == b and reg.find_lora("styles/ink").path == b
    assert reg.find_lora("detail").path == a  # case-insensitive fallback
    assert reg.find_lora("Detail.safetensors").path == a
    assert reg.find_lora("ink").preview == lora_dir / "styles" / "ink.preview.png"
    assert reg.find_lora("Detail").preview == lora_dir / "Detail.jpg"
    # LoRA .safetensors: A1111's "addnet" hash, the sha256 of the bytes after the header
    header = 8 + int.from_bytes(a.read_bytes()[:8], "little")
    assert reg.find_lora("Detail").short_hash(hashes) == hashlib.sha256(a.read_bytes()[header:]).hexdigest()[:12]
    assert hashes.cached(a, "addnet") == sha256_file(a, skip_safetensors_header=True)
    # an embedding is hashed whole
    emb = reg.embeddings()[0]
    assert emb.short_hash(hashes) == sha256_file(emb.path)[:12]
    with pytest.raises(ModelError, match=r"LoRA 'nope' not found .*available: Detail, styles/ink"):
        reg.find_lora("nope")
    # a file dropped in after the last refresh is found on a miss
    kohya_file(lora_dir / "late.safetensors", {"lora_unet_conv_in": (32, 4, 3)})
    assert reg.find_lora("late").name == "late"
