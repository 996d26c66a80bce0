"""Tiny random-weight ControlNets for tests, in lllyasviel's original single-file layout
(`control_model.*` keys) or diffusers' layout, built on a checkpoint's UNet configuration.

`strength` scales the zero convolutions, which a real ControlNet learns and a fresh one has at
zero: 0 gives a ControlNet whose residuals are all zero (the image must not change), more gives
one that visibly steers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
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
                     layout: str = "original") -> Path:
    net = make_controlnet(unet, strength, seed)
    state = controlnet_to_ldm(net) if layout == "original" else {k: v.contiguous() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
