"""Recognise a single-file checkpoint (original CompVis/LDM key names) from keys and shapes.

The family follows from the text-encoder layout, cross-checked against the UNet's
cross-attention width (768 SD1, 1024 SD2, 2048 SDXL, 1280 SDXL refiner at full size; the sum
of the encoder widths in general). The variant follows from the UNet's input channels (4 normal,
9 inpainting, 8 instruct-pix2pix). All sizes are read from tensor shapes, so the same code
loads full-size checkpoints and the tiny ones the tests make.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from webui.models.errors import ModelError
from webui.models.families import FLUX, SD1, SD2, SD3, SDXL, SDXL_REFINER, FamilySpec, TextEncoderSpec

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

Variant = Literal["normal", "inpaint", "pix2pix"]
VARIANT_BY_IN_CHANNELS: dict[int, Variant] = {4: "normal", 9: "inpaint", 8: "pix2pix"}


@dataclass(frozen=True)
class Detected:
    family: FamilySpec
    variant: Variant
    unet_config: dict[str, Any]  # the denoiser's diffusers config (UNet, or SD3's MMDiT)
    vae_config: dict[str, Any] | None  # None when the file carries no VAE
    text_configs: tuple[dict[str, Any] | None, ...]  # None: an optional encoder the file lacks
    v_pred_key: bool = False  # the file marks itself as v-prediction
    ztsnr_key: bool = False  # ... and as trained for zero terminal SNR (NoobAI-XL v-pred and the like)
    notes: tuple[str, ...] = field(default=())


# Black Forest Labs' Flux files (and GGUF quantisations of Flux and SD3.5) hold the transformer
# alone, without the `model.diffusion_model.` level
_BARE_TRANSFORMER = ("double_blocks.0.img_attn.norm.key_norm.scale", "joint_blocks.0.context_block.attn.qkv.weight")


def normalise_keys(sd: dict[str, torch.Tensor]) -> None:
    """A bare Flux / SD3 transformer's keys under `model.diffusion_model.`, as other files have them."""
    if any(key in sd for key in _BARE_TRANSFORMER):
        for k in [k for k in sd if not k.startswith(("text_encoders.", VAE_PREFIX))]:
            sd[UNET_PREFIX + k] = sd.pop(k)


def detect(sd: dict[str, torch.Tensor], path: Path | None = None) -> Detected:
    normalise_keys(sd)
    if not any(k.startswith(UNET_PREFIX) for k in sd):
        if any(k.startswith(("encoder.", "decoder.")) for k in sd) and not any("diffusion_model" in k for k in sd):
            raise ModelError("this is a VAE, not a checkpoint; put it in models/VAE/", path)
        if any("lora" in k.lower() for k in list(sd)[:50]):
            raise ModelError("this is a LoRA, not a checkpoint; put it in models/Lora/", path)
        raise ModelError("not a Stable Diffusion checkpoint (no UNet weights under 'model.diffusion_model.')", path)

    family = _family_from_keys(sd, path)
    text_configs = tuple(
        None if spec.optional and not any(k.startswith(spec.prefix) for k in sd) else text_encoder_config(sd, spec, path)
        for spec in family.text_encoders)
    if family.denoiser != "unet":
        return _detect_transformer(sd, family, text_configs, path)
    unet_config = unet_config_from_shapes(sd, family, text_configs, path)
    expected_context = sum(c["hidden_size"] for c in text_configs)
    if unet_config["cross_attention_dim"] != expected_context:
        raise ModelError(
            f"UNet cross-attention width {unet_config['cross_attention_dim']} does not match the "
            f"{family.label} text encoder width {expected_context}; the file is not a known layout",
            path,
        )
    variant = VARIANT_BY_IN_CHANNELS.get(unet_config["in_channels"])
    if variant is None:
        raise ModelError(f"unsupported UNet with {unet_config['in_channels']} input channels", path)
    vae_config = vae_config_from_shapes(sd, VAE_PREFIX, family, path) if f"{VAE_PREFIX}decoder.conv_in.weight" in sd else None
    return Detected(
        family=family,
        variant=variant,
        unet_config=unet_config,
        vae_config=vae_config,
        text_configs=text_configs,
        v_pred_key="v_pred" in sd,
        ztsnr_key="ztsnr" in sd,
    )


def _detect_transformer(sd: dict[str, torch.Tensor], family: FamilySpec,
                        text_configs: tuple[dict[str, Any] | None, ...], path: Path | None) -> Detected:
    """SD3's MMDiT or Flux's transformer: its config from the shapes, checked against the text
    encoders' widths (pooled vectors, T5's context) and the family's latent channels."""
    config = (mmdit_config_from_shapes if family.denoiser == "mmdit" else flux_config_from_shapes)(sd, path)
    pooled = sum(c["projection_dim"] if spec.projected else c["hidden_size"]
                 for c, spec in zip(text_configs, family.text_encoders) if c and spec.pooled)
    if pooled != config["pooled_projection_dim"]:
        raise ModelError(f"the {family.label} transformer takes pooled text vectors {config['pooled_projection_dim']} "
                         f"wide, the CLIP encoders give {pooled}; the file is not a known layout", path)
    for c, spec in zip(text_configs, family.text_encoders):
        if c is not None and spec.kind == "t5" and c["d_model"] != config["joint_attention_dim"]:
            raise ModelError(f"T5 width {c['d_model']} does not match the {family.label} transformer's context width "
                             f"{config['joint_attention_dim']}", path)
    if config["in_channels"] != family.latent_channels * family.packed_patch**2:
        raise ModelError(f"unsupported {family.label} transformer with {config['in_channels']} input channels", path)
    vae_config = vae_config_from_shapes(sd, VAE_PREFIX, family, path) if f"{VAE_PREFIX}decoder.conv_in.weight" in sd else None
    return Detected(family=family, variant="normal", unet_config=config, vae_config=vae_config,
                    text_configs=text_configs)


def flux_config_from_shapes(sd: dict[str, torch.Tensor], path: Path | None) -> dict[str, Any]:
    """A diffusers FluxTransformer2DModel config read from the transformer's tensor shapes (dev
    has the guidance embedder, schnell not)."""
    u = UNET_PREFIX
    width, in_ch = _shape(sd, u + "img_in.weight", path)
    head = int(_shape(sd, u + "double_blocks.0.img_attn.norm.query_norm.scale", path)[0])
    if head != 128:
        raise ModelError(f"unsupported Flux transformer with {head}-wide attention heads (Flux.1 has 128)", path)
    return {
        "patch_size": 1,
        "in_channels": int(in_ch),
        "num_layers": _count(sd, re.escape(u + "double_blocks.") + r"(\d+)\."),
        "num_single_layers": _count(sd, re.escape(u + "single_blocks.") + r"(\d+)\."),
        "attention_head_dim": head,
        "num_attention_heads": int(width) // head,
        "joint_attention_dim": int(_shape(sd, u + "txt_in.weight", path)[1]),
        "pooled_projection_dim": int(_shape(sd, u + "vector_in.in_layer.weight", path)[1]),
        "guidance_embeds": u + "guidance_in.in_layer.weight" in sd,
        "axes_dims_rope": (16, 56, 56),
    }


def family_of(sd: dict[str, torch.Tensor]) -> FamilySpec | None:
    """The family the keys name, or None (not a checkpoint we know)."""
    normalise_keys(sd)
    try:
        return _family_from_keys(sd, None)
    except ModelError:
        return None


@dataclass(frozen=True)
class ModelControls:
    """What the page offers for a model beyond the common controls."""

    fields: frozenset[str] = frozenset()  # request fields only some models take (`shift`, `distilled_cfg_scale`)
    samplers: tuple[str, ...] | None = None  # the samplers it can use; None: all


def model_controls(names: list[str]) -> ModelControls:
    """For a file with these tensor names: a flow model's `shift` and samplers, Flux dev's
    `distilled_cfg_scale` (its guidance embedder)."""
    family = family_of(dict.fromkeys(names))
    if family is None or not family.flow:
        return ModelControls()
    guided = any(n.endswith("guidance_in.in_layer.weight") for n in names)
    return ModelControls(frozenset({"shift", "distilled_cfg_scale"} if guided else {"shift"}), family.samplers)


def mmdit_config_from_shapes(sd: dict[str, torch.Tensor], path: Path | None) -> dict[str, Any]:
    """A diffusers SD3Transformer2DModel config read from the MMDiT's tensor shapes (SD3 Medium,
    SD3.5 Medium with its second attention in the first blocks and q/k norms, SD3.5 Large)."""
    u = UNET_PREFIX
    width, in_ch, patch, _ = _shape(sd, u + "x_embedder.proj.weight", path)
    layers = _count(sd, re.escape(u + "joint_blocks.") + r"(\d+)\.")
    positions = _shape(sd, u + "pos_embed", path)[1]
    side = round(positions**0.5)
    if side * side != positions or layers == 0:
        raise ModelError("MMDiT position embedding or blocks are not laid out as expected", path)
    dual = sorted({int(m.group(1)) for k in sd if (m := re.match(re.escape(u + "joint_blocks.") + r"(\d+)\.x_block\.attn2\.", k))})
    return {
        "sample_size": 128,
        "patch_size": int(patch),
        "in_channels": int(in_ch),
        "out_channels": int(_shape(sd, u + "final_layer.linear.weight", path)[0]) // int(patch) ** 2,
        "num_layers": layers,
        "attention_head_dim": 64,
        "num_attention_heads": int(width) // 64,
        "joint_attention_dim": int(_shape(sd, u + "context_embedder.weight", path)[1]),
        "caption_projection_dim": int(_shape(sd, u + "context_embedder.weight", path)[0]),
        "pooled_projection_dim": int(_shape(sd, u + "y_embedder.mlp.0.weight", path)[1]),
        "pos_embed_max_size": side,
        "dual_attention_layers": tuple(dual),
        "qk_norm": "rms_norm" if f"{u}joint_blocks.0.x_block.attn.ln_q.weight" in sd else None,
    }


def _family_from_keys(sd: dict[str, torch.Tensor], path: Path | None) -> FamilySpec:
    if any(k.startswith(UNET_PREFIX + "joint_blocks.") for k in sd):
        return SD3
    if any(k.startswith(UNET_PREFIX + "double_blocks.") for k in sd):
        return FLUX
    if any(k.startswith("conditioner.embedders.1.model.") for k in sd):
        return SDXL
    if any(k.startswith("conditioner.embedders.0.model.") for k in sd):
        return SDXL_REFINER  # bigG alone, where SDXL base has CLIP-L
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        return SD2
    if any(k.startswith("cond_stage_model.transformer.") for k in sd):
        return SD1
    raise ModelError("no text encoder weights found; the family (SD1/SD2/SDXL) cannot be told", path)


def _count(sd: dict[str, torch.Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def _shape(sd: dict[str, torch.Tensor], key: str, path: Path | None) -> torch.Size:
    t = sd.get(key)
    if t is None:
        raise ModelError(f"missing tensor {key!r}; the file is incomplete or of an unknown layout", path)
    return t.shape


def text_encoder_config(sd: dict[str, torch.Tensor], spec: TextEncoderSpec, path: Path | None) -> dict[str, Any]:
    """A transformers CLIPTextConfig (as a dict) sized from the tensors under `spec.prefix`."""
    p = spec.prefix
    if spec.kind == "t5":
        return t5_config(sd, p, path)
    if spec.kind == "clip":
        tm = p + "text_model." if any(k.startswith(p + "text_model.") for k in sd) else p
        vocab, hidden = _shape(sd, tm + "embeddings.token_embedding.weight", path)
        positions = _shape(sd, tm + "embeddings.position_embedding.weight", path)[0]
        layers = _count(sd, re.escape(tm + "encoder.layers.") + r"(\d+)\.")
        intermediate = _shape(sd, tm + "encoder.layers.0.mlp.fc1.weight", path)[0]
        # SD3's CLIPs carry their projection (HF layout, beside text_model.)
        projection = _shape(sd, p + "text_projection.weight", path)[0] if p + "text_projection.weight" in sd else hidden
    else:
        vocab, hidden = _shape(sd, p + "token_embedding.weight", path)
        positions = _shape(sd, p + "positional_embedding", path)[0]
        layers = _count(sd, re.escape(p + "transformer.resblocks.") + r"(\d+)\.")
        intermediate = _shape(sd, p + "transformer.resblocks.0.mlp.c_fc.weight", path)[0]
        projection = _shape(sd, p + "text_projection", path)[1] if p + "text_projection" in sd else hidden
    if layers == 0:
        raise ModelError("text encoder has no layers", path)
    return {
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(intermediate),
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, int(hidden) // 64),
        "max_position_embeddings": int(positions),
        "hidden_act": spec.hidden_act,
        "layer_norm_eps": 1e-5,
        "projection_dim": int(projection),
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407 if spec.pad_token != "!" else 0,
    }


def t5_config(sd: dict[str, torch.Tensor], p: str, path: Path | None) -> dict[str, Any]:
    """A transformers T5Config (as a dict) for a T5 encoder in HF layout under `p` (T5 v1.1's
    gated-GELU feed-forward; the original T5's ReLU one where `wi` stands alone)."""
    vocab, width = _shape(sd, p + "shared.weight", path) if p + "shared.weight" in sd else \
        _shape(sd, p + "encoder.embed_tokens.weight", path)
    block = p + "encoder.block.0.layer."
    heads = _shape(sd, block + "0.SelfAttention.relative_attention_bias.weight", path)[1]
    gated = block + "1.DenseReluDense.wi_0.weight" in sd
    d_ff = _shape(sd, block + ("1.DenseReluDense.wi_0.weight" if gated else "1.DenseReluDense.wi.weight"), path)[0]
    return {
        "vocab_size": int(vocab),
        "d_model": int(width),
        "d_kv": int(_shape(sd, block + "0.SelfAttention.q.weight", path)[0]) // int(heads),
        "d_ff": int(d_ff),
        "num_layers": _count(sd, re.escape(p + "encoder.block.") + r"(\d+)\."),
        "num_heads": int(heads),
        "relative_attention_num_buckets": int(_shape(sd, block + "0.SelfAttention.relative_attention_bias.weight", path)[0]),
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "use_cache": False,
        "dropout_rate": 0.0,
    }


def unet_config_from_shapes(
    sd: dict[str, torch.Tensor],
    family: FamilySpec,
    text_configs: tuple[dict[str, Any], ...],
    path: Path | None,
) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config read from the LDM UNet's tensor shapes."""
    u = UNET_PREFIX
    in_ch = _shape(sd, u + "input_blocks.0.0.weight", path)[1]
    out_ch = _shape(sd, u + "out.2.weight", path)[0]
    n_input = _count(sd, re.escape(u + "input_blocks.") + r"(\d+)\.")
    downsamples = sorted(
        int(m.group(1)) for k in sd if (m := re.match(re.escape(u + "input_blocks.") + r"(\d+)\.0\.op\.weight$", k))
    )
    levels = len(downsamples) + 1
    if n_input < 2 or n_input % levels != 0:
        raise ModelError("UNet input blocks are not laid out as expected", path)
    per_level = n_input // levels  # resnets per level + 1 (a downsample or, on level 0, conv_in)
    layers_per_block = per_level - 1

    channels, has_attn, depth = [], [], []
    for level in range(levels):
        first = 1 + level * per_level
        channels.append(int(_shape(sd, f"{u}input_blocks.{first}.0.out_layers.3.weight", path)[0]))
        attn = f"{u}input_blocks.{first}.1."
        has_attn.append(any(k.startswith(attn) for k in sd))
        depth.append(_count(sd, re.escape(attn + "transformer_blocks.") + r"(\d+)\.") or 1)

    attn_keys = [k for k in sd if k.startswith(u) and k.endswith("attn2.to_k.weight")]
    if not attn_keys:
        raise ModelError("UNet has no cross-attention layers", path)
    context = int(sd[attn_keys[0]].shape[1])
    # diffusers takes the middle block's transformer depth from the last level's entry; where
    # that level has no attention (SD1, the SDXL refiner) the entry is free to carry it.
    mid_depth = _count(sd, re.escape(u + "middle_block.1.transformer_blocks.") + r"(\d+)\.") or 1
    layers = [d if a else 1 for d, a in zip(depth, has_attn)]
    if not has_attn[-1]:
        layers[-1] = mid_depth
    elif mid_depth != layers[-1]:
        raise ModelError("UNet middle block depth differs from the last level's; not a known layout", path)
    proj_in = next(k for k in sd if k.startswith(u) and k.endswith(".proj_in.weight"))
    linear_projection = sd[proj_in].ndim == 2
    if family.fixed_heads is not None:
        heads: int | list[int] = family.fixed_heads
    else:
        heads = [max(1, c // (family.head_dim or 64)) for c in channels]

    config: dict[str, Any] = {
        "sample_size": family.default_size // 8,
        "in_channels": int(in_ch),
        "out_channels": int(out_ch),
        "layers_per_block": layers_per_block,
        "block_out_channels": channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attn)],
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "use_linear_projection": linear_projection,
        "upcast_attention": family.upcast_attention,
        "transformer_layers_per_block": layers,
    }
    if family.num_time_ids:
        # label_emb takes [pooled text embedding, num_time_ids sinusoidal embeddings of one width]
        adm_in = int(_shape(sd, u + "label_emb.0.0.weight", path)[1])
        pooled = next(c["projection_dim"] for c, spec in zip(text_configs, family.text_encoders) if spec.pooled)
        if adm_in <= pooled or (adm_in - pooled) % family.num_time_ids:
            raise ModelError(f"{family.label} size conditioning has an unexpected width", path)
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(adm_in - pooled) // family.num_time_ids,
            projection_class_embeddings_input_dim=adm_in,
        )
    return config


def vae_config_from_shapes(
    sd: dict[str, torch.Tensor], prefix: str, family: FamilySpec, path: Path | None
) -> dict[str, Any]:
    """A diffusers AutoencoderKL config read from the LDM VAE's tensor shapes under `prefix`."""
    e = prefix + "encoder."
    levels = _count(sd, re.escape(e + "down.") + r"(\d+)\.")
    if levels == 0:
        raise ModelError("VAE encoder has no blocks", path)
    channels = [int(_shape(sd, f"{e}down.{i}.block.0.conv1.weight", path)[0]) for i in range(levels)]
    return {
        "in_channels": int(_shape(sd, e + "conv_in.weight", path)[1]),
        "out_channels": int(_shape(sd, prefix + "decoder.conv_out.weight", path)[0]),
        "latent_channels": int(_shape(sd, prefix + "decoder.conv_in.weight", path)[1]),
        "block_out_channels": channels,
        "layers_per_block": _count(sd, re.escape(e + "down.0.block.") + r"(\d+)\."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "sample_size": family.default_size,
        "scaling_factor": family.latent_scaling_factor,
        "shift_factor": family.latent_shift or None,
        # SD3's VAE has no 1x1 convolutions around the latent
        "use_quant_conv": prefix + "quant_conv.weight" in sd,
        "use_post_quant_conv": prefix + "post_quant_conv.weight" in sd,
    }
