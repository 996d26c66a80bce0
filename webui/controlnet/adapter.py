"""T2I-Adapters (TencentARC) in ControlNet units: recognised by their keys, built as diffusers'
`T2IAdapter` on the loaded UNet's channels, checked against it.

An adapter turns the control image into one feature map per UNet level, once per size; the UNet
adds them inside its down blocks every step (diffusers' `down_intrablock_additional_residuals`),
which is far cheaper than a ControlNet's second encoder pass. Two layouts are read:

- diffusers' (`adapter.conv_in.*`, `adapter.body.L.in_conv.*`, `adapter.body.L.resnets.R.block1.*`);
- TencentARC's original `.pth` files (`t2iadapter_*_sd14v1.pth`, `*_sd15v2.pth`): a flat list of
  blocks `body.K.{in_conv,block1,block2}` (K = level x blocks per level + block), 1x1 second
  convolutions and average-pool downsampling, which is the layout diffusers' full adapter has.

SDXL adapters (TencentARC's `t2i-adapter-*-sdxl-1.0`, diffusers' layout) unshuffle by 16 and give
four maps for SDXL's three levels, the last for the middle block. The "light" adapter
(`t2iadapter_color_sd14v1.pth`, for the `t2ia_color_grid` preprocessor: per level a 1x1 `in_conv`
to a quarter of the width, small resnets `body.L.body.R`, a 1x1 `out_conv`) is diffusers'
`light_adapter`; the "style" adapter (CLIP vision tokens, another architecture) is refused by name.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from webui.models.errors import ModelError

if TYPE_CHECKING:
    import torch

    from webui.models.load import ModelBundle

_ORIGINAL = re.compile(r"^body\.(\d+)\.(in_conv|block1|block2)\.(weight|bias)$")
_LIGHT = re.compile(r"^body\.(\d+)\.body\.(\d+)\.")


def is_adapter(state: dict[str, torch.Tensor]) -> bool:
    return ("adapter.conv_in.weight" in state or ("conv_in.weight" in state and "body.0.block1.weight" in state)
            or _is_light(state) or "style_embedding" in state)


def _is_light(state: dict[str, torch.Tensor]) -> bool:
    return "adapter.body.0.out_conv.weight" in state or "body.0.out_conv.weight" in state


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout adapter's weights under diffusers' names (diffusers' own are kept)."""
    if "adapter.conv_in.weight" in state or "adapter.body.0.out_conv.weight" in state:
        return state
    if _is_light(state):  # body.L.body.R.blockN -> adapter.body.L.resnets.R.blockN
        return {"adapter." + _LIGHT.sub(r"body.\1.resnets.\2.", k): v for k, v in state.items()}
    blocks = sorted({int(m.group(1)) for k in state if (m := _ORIGINAL.match(k))})
    # a level starts at each block that changes the width (has in_conv); level 0 has none
    starts = [0, *(k for k in blocks if f"body.{k}.in_conv.weight" in state)]
    per_level = starts[1] if len(starts) > 1 else len(blocks)
    out = {f"adapter.conv_in.{p}": state[f"conv_in.{p}"] for p in ("weight", "bias")}
    for k in blocks:
        level, block = divmod(k, per_level)
        for part in ("block1", "block2"):
            for p in ("weight", "bias"):
                out[f"adapter.body.{level}.resnets.{block}.{part}.{p}"] = state[f"body.{k}.{part}.{p}"]
        if block == 0 and f"body.{k}.in_conv.weight" in state:
            for p in ("weight", "bias"):
                out[f"adapter.body.{level}.in_conv.{p}"] = state[f"body.{k}.in_conv.{p}"]
    return out


def build(state: dict[str, torch.Tensor], name: str, bundle: ModelBundle) -> torch.nn.Module:
    """The adapter in `state` (either layout), on `bundle`'s device and dtype; ModelError when it
    is not a full or light adapter or its levels do not match `bundle`'s UNet."""
    if "style_embedding" in state:
        raise ModelError(f"T2I-Adapter {name}: a style adapter (CLIP vision tokens); only the full and light "
                         "adapters (canny, sketch, depth, openpose, color, ...) are supported")
    state = to_diffusers(state)
    if _is_light(state):
        return _light(state, name, bundle)
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("adapter.body.")})
    channels = [state[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0] for i in levels]
    blocks = len({k.split(".")[4] for k in state if k.startswith("adapter.body.0.resnets.")})
    pixels = state["adapter.conv_in.weight"].shape[1]  # input channels x downscale factor²
    xl = pixels in (256, 768)  # SDXL adapters unshuffle by 16, the others by 8
    factor = 16 if xl else 8
    in_channels, rest = divmod(pixels, factor * factor)
    unet = bundle.unet.config
    widths = list(unet.block_out_channels)
    unet_xl = unet.addition_embed_type == "text_time"
    if xl:  # one level per down block, the last repeated (its map goes to the middle block)
        fits = unet_xl and channels[:len(widths)] == widths and set(channels[len(widths):]) <= {widths[-1]}
        wanted = f"an SDXL adapter with {widths} + {widths[-1]} channels"
    else:  # one level per down block, as wide as its output
        fits = not unet_xl and channels == widths
        wanted = f"an SDXL adapter with {widths} + {widths[-1]} channels" if unet_xl else f"{widths} channels"
    if rest or in_channels not in (1, 3) or not fits:
        raise ModelError(f"T2I-Adapter {name} does not fit {bundle.model_name} ({bundle.family.label}): it is "
                         f"{'an SDXL' if xl else 'an SD 1.x/2.x'} adapter with {channels} channels, this UNet needs "
                         f"{wanted} (an adapter is made for one model family)")
    return _made(state, name, bundle, in_channels=in_channels, channels=channels, num_res_blocks=blocks,
                 downscale_factor=factor, adapter_type="full_adapter_xl" if xl else "full_adapter")


def _light(state: dict[str, torch.Tensor], name: str, bundle: ModelBundle) -> torch.nn.Module:
    """A light adapter (diffusers' names) for an SD 1.x/2.x UNet: one level per down block, each
    as wide as the block's output."""
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("adapter.body.")})
    maps = [state[f"adapter.body.{i}.out_conv.weight"].shape[0] for i in levels]  # its last level repeats
    blocks = len({k.split(".")[4] for k in state if k.startswith("adapter.body.0.resnets.")})
    in_channels, rest = divmod(state["adapter.body.0.in_conv.weight"].shape[1], 64)  # unshuffled by 8
    unet = bundle.unet.config
    widths = list(unet.block_out_channels)
    if rest or in_channels not in (1, 3) or unet.addition_embed_type == "text_time" or maps != widths:
        raise ModelError(f"T2I-Adapter {name} does not fit {bundle.model_name} ({bundle.family.label}): it is a "
                         f"light SD 1.x/2.x adapter with {maps} channels, this UNet has {widths} (an adapter is "
                         "made for one model family)")
    return _made(state, name, bundle, in_channels=in_channels, channels=maps[:-1], num_res_blocks=blocks,
                 downscale_factor=8, adapter_type="light_adapter")


def _made(state: dict[str, torch.Tensor], name: str, bundle: ModelBundle, **config: Any) -> torch.nn.Module:
    """diffusers' `T2IAdapter(**config)` holding `state`, on `bundle`'s device and dtype."""
    import torch
    from diffusers import T2IAdapter

    from webui.models.load import load_meta_module

    with torch.device("meta"):
        model = T2IAdapter(**config)
    try:
        return load_meta_module(model, state, bundle.runtime.device, bundle.runtime.dtype)
    except ModelError as err:
        raise ModelError(f"T2I-Adapter {name}: {err}") from None
