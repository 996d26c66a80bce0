"""Tiny random-weight ControlNets for tests, in lllyasviel's original single-file layout
(`control_model.*` keys) or diffusers' layout, built on a checkpoint's UNet configuration; and
full T2I-Adapters, in TencentARC's original layout (`body.K.*`) or diffusers'; SDXL union
ControlNets (xinsir's, diffusers layout: `task_embedding`, `transformer_layes.*`).

`strength` scales the zero convolutions, which a real ControlNet learns and a fresh one has at
zero: 0 gives a ControlNet whose residuals are all zero (the image must not change), more gives
one that visibly steers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, ControlNetUnionModel, T2IAdapter, UNet2DConditionModel
from safetensors.torch import save_file

from webui.testing.make_checkpoint import unet_keys_to_ldm


def make_controlnet(unet: UNet2DConditionModel, strength: float = 0.0, seed: int = 0) -> ControlNetModel:
    gen = torch.Generator().manual_seed(seed)
    net = ControlNetModel.from_unet(unet, load_weights_from_unet=True)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.copy_(torch.randn(p.shape, generator=gen) * strength)
            elif name.startswith("controlnet_cond_embedding"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


def make_union_controlnet(unet: UNet2DConditionModel, strength: float = 0.0, seed: int = 0,
                          types: int = 8) -> ControlNetUnionModel:
    """A union ControlNet for an SDXL `unet` knowing `types` control types (8: ProMax, 6: the first),
    its control-type transformer as wide as the UNet's first level."""
    gen = torch.Generator().manual_seed(seed)
    base = ControlNetUnionModel.from_unet(unet, load_weights_from_unet=True)
    width = unet.config.block_out_channels[0]
    settable = {k: v for k, v in base.config.items() if not k.startswith("_")}  # not diffusers' own notes
    net = ControlNetUnionModel.from_config({**settable, "num_control_type": types, "num_trans_channel": width,
                                            "num_proj_channel": width})
    fits = {k: v for k, v in base.state_dict().items() if not k.startswith(("task_embedding", "transformer_layes",
                                                                             "spatial_ch_projs", "control_add"))}
    net.load_state_dict(fits, strict=False)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                p.copy_(torch.randn(p.shape, generator=gen) * strength)
            elif name.startswith(("controlnet_cond_embedding", "task_embedding", "spatial_ch_projs",
                                  "transformer_layes", "control_add_embedding")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


def controlnet_to_ldm(net: ControlNetModel) -> dict[str, torch.Tensor]:
    """The original layout: the encoder as the UNet's `input_blocks`/`middle_block`, the hint
    encoder as `input_hint_block` (convolutions at 0, 2, 4, ...), `zero_convs.N.0`,
    `middle_block_out.0`; every key under `control_model.`."""
    state = net.state_dict()
    encoder = {k: v for k, v in state.items() if not k.startswith(("controlnet_", "controlnet_cond_embedding"))}
    out = unet_keys_to_ldm(encoder, net.config)
    blocks = len(net.controlnet_cond_embedding.blocks)
    for k, v in state.items():
        parts = k.split(".")
        if k.startswith("controlnet_cond_embedding."):
            if parts[1] == "conv_in":
                slot = 0
            elif parts[1] == "conv_out":
                slot = 2 * (blocks + 1)
            else:
                slot = 2 * (int(parts[2]) + 1)
            out[f"input_hint_block.{slot}.{parts[-1]}"] = v
        elif k.startswith("controlnet_down_blocks."):
            out[f"zero_convs.{parts[1]}.0.{parts[-1]}"] = v
        elif k.startswith("controlnet_mid_block."):
            out[f"middle_block_out.0.{parts[-1]}"] = v
    return {"control_model." + k: v.contiguous() for k, v in out.items()}


def write_controlnet(path: Path, unet: UNet2DConditionModel, strength: float = 0.0, seed: int = 0,
                     layout: str = "original", union_types: int = 0) -> Path:
    """A ControlNet file; `union_types` > 0: a union model knowing that many types (diffusers layout)."""
    net = (make_union_controlnet(unet, strength, seed, union_types) if union_types
           else make_controlnet(unet, strength, seed))
    state = (controlnet_to_ldm(net) if layout == "original" and not union_types
             else {k: v.contiguous() for k, v in net.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def write_control_lora(path: Path, unet: UNet2DConditionModel, strength: float = 0.5, seed: int = 0,
                       rank: int = 4, full: Path | None = None) -> Path:
    """A control-LoRA as Stability publishes them (original layout, no prefix, a `lora_controlnet`
    marker): the encoder's convolutions and linear layers as `.up` / `.down` factors of their change
    from `unet`'s weights, the rest whole, the time embedding left out (it is the UNet's). `full`:
    also write the same ControlNet with whole weights there (original layout), to compare."""
    gen = torch.Generator().manual_seed(seed + 1000)
    net = make_controlnet(unet, strength, seed)
    original = {k.removeprefix("control_model."): v for k, v in controlnet_to_ldm(net).items()}
    lora: dict[str, torch.Tensor] = {"lora_controlnet": torch.zeros(0)}
    whole = {}
    for key, value in original.items():
        if key.startswith(("input_blocks.", "middle_block.")) and key.endswith(".weight") and value.ndim >= 2:
            up = torch.randn(value.shape[0], rank, *([1] * (value.ndim - 2)), generator=gen) * 0.1
            down = torch.randn(rank, *value.shape[1:], generator=gen) * 0.1
            whole[key] = value + (up.flatten(1) @ down.flatten(1)).reshape(value.shape)
            lora[f"{key[:-7]}.up"], lora[f"{key[:-7]}.down"] = up, down
        else:
            whole[key] = value
            if not key.startswith("time_embed."):
                lora[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in lora.items()}, str(path))
    if full is not None:
        save_file({f"control_model.{k}": v.contiguous() for k, v in whole.items()}, str(full))
    return path


def make_adapter(unet: UNet2DConditionModel, strength: float = 1.0, seed: int = 0,
                 in_channels: int = 3, light: bool = False) -> T2IAdapter:
    """A full T2I-Adapter for `unet` (one level per down block; for SDXL's UNet the XL adapter,
    whose last level repeats), or a light one (`light`: the colour adapter's kind, for a UNet whose
    last two levels are as wide), random weights times `strength`."""
    gen = torch.Generator().manual_seed(seed)
    widths = list(unet.config.block_out_channels)
    if light:  # its last level repeats the one before: as wide as SD 1.x's last two levels
        adapter = T2IAdapter(in_channels=in_channels, channels=widths[:-1], num_res_blocks=4, downscale_factor=8,
                             adapter_type="light_adapter")
    elif unet.config.addition_embed_type == "text_time":
        adapter = T2IAdapter(in_channels=in_channels, channels=[*widths, *[widths[-1]] * (4 - len(widths))],
                             num_res_blocks=2, downscale_factor=16, adapter_type="full_adapter_xl")
    else:
        adapter = T2IAdapter(in_channels=in_channels, channels=widths, num_res_blocks=2, downscale_factor=8,
                             adapter_type="full_adapter")
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1 * strength)
    return adapter


def adapter_to_original(adapter: T2IAdapter) -> dict[str, torch.Tensor]:
    """TencentARC's layout: the blocks as one list, `body.K` with K = level x blocks per level + block;
    a light adapter's as `body.L.body.R`."""
    if adapter.config.adapter_type == "light_adapter":
        return {k.removeprefix("adapter.").replace(".resnets.", ".body."): v for k, v in adapter.state_dict().items()}
    per_level = adapter.config.num_res_blocks
    out = {}
    for k, v in adapter.state_dict().items():
        parts = k.split(".")
        if parts[1] == "conv_in":
            out[".".join(parts[1:])] = v
        elif parts[3] == "in_conv":
            out[f"body.{int(parts[2]) * per_level}.in_conv.{parts[-1]}"] = v
        else:  # adapter.body.L.resnets.R.blockN.param
            out[f"body.{int(parts[2]) * per_level + int(parts[4])}.{parts[5]}.{parts[-1]}"] = v
    return out


def write_adapter(path: Path, unet: UNet2DConditionModel, strength: float = 1.0, seed: int = 0,
                  layout: str = "original", in_channels: int = 3, light: bool = False) -> Path:
    adapter = make_adapter(unet, strength, seed, in_channels, light)
    state = adapter_to_original(adapter) if layout == "original" else adapter.state_dict()
    state = {k: v.contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:  # TencentARC's files are torch.save pickles of a plain state dict
        torch.save(state, path)
    return path


def make_clip_vision(hidden: int = 32, projection: int = 24, layers: int = 2, image_size: int = 28,
                     patch: int = 14, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny CLIP vision model with projection, as transformers names its weights (the layout of
    the `models/clip_vision/*.safetensors` files)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=projection,
                              num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), patch_size=patch,
                              image_size=image_size, hidden_act="gelu", layer_norm_eps=1e-5)
    return {k: v.contiguous() for k, v in CLIPVisionModelWithProjection(config).state_dict().items()}


def make_ip_adapter(unet: UNet2DConditionModel, image_embed_dim: int, tokens: int = 4, seed: int = 0,
                    strength: float = 1.0, plus: bool = False) -> dict[str, torch.Tensor]:
    """An IP-Adapter for `unet` in h94's layout: `image_proj.proj/norm` (plain: the image embedding to
    `tokens` context tokens) or h94's Resampler (`plus`: `image_proj.latents`, `proj_in`, `layers.*`,
    reading CLIP's `image_embed_dim`-wide hidden tokens), and `ip_adapter.N.to_k_ip/to_v_ip` for each
    cross-attention layer, N = 1, 3, 5, ... in the UNet's processor order."""
    gen = torch.Generator().manual_seed(seed)
    context = unet.config.cross_attention_dim
    widths = list(unet.config.block_out_channels)

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * scale * strength

    if plus:  # h94's Resampler: learnt queries attending to the CLIP tokens, 4 layers
        dim = 64  # one head of 64
        state = {"image_proj.latents": rand(1, tokens, dim), "image_proj.proj_in.weight": rand(dim, image_embed_dim),
                 "image_proj.proj_in.bias": rand(dim), "image_proj.proj_out.weight": rand(context, dim),
                 "image_proj.proj_out.bias": rand(context), "image_proj.norm_out.weight": torch.ones(context),
                 "image_proj.norm_out.bias": torch.zeros(context)}
        for i in range(4):
            layer = f"image_proj.layers.{i}"
            for norm in ("0.norm1", "0.norm2", "1.0"):
                state[f"{layer}.{norm}.weight"], state[f"{layer}.{norm}.bias"] = torch.ones(dim), torch.zeros(dim)
            state.update({f"{layer}.0.to_q.weight": rand(dim, dim), f"{layer}.0.to_kv.weight": rand(2 * dim, dim),
                          f"{layer}.0.to_out.weight": rand(dim, dim), f"{layer}.1.1.weight": rand(4 * dim, dim),
                          f"{layer}.1.3.weight": rand(dim, 4 * dim)})
    else:
        state = {"image_proj.proj.weight": rand(context * tokens, image_embed_dim, scale=0.5),
                 "image_proj.proj.bias": rand(context * tokens), "image_proj.norm.weight": torch.ones(context),
                 "image_proj.norm.bias": torch.zeros(context)}
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = widths[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(widths))[int(name[len("up_blocks.")])]
        else:
            hidden = widths[int(name[len("down_blocks.")])]
        state[f"ip_adapter.{key}.to_k_ip.weight"] = rand(hidden, context)
        state[f"ip_adapter.{key}.to_v_ip.weight"] = rand(hidden, context)
        key += 2
    return state
