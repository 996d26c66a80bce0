"""The names LoRA files use for the modules of our models, and how to look them up.

LoRA trainers name the layer a LoRA pair patches in several ways:
- kohya/sd-scripts: the module path with `.` replaced by `_`, after `lora_unet_` /
  `lora_te_` (`lora_te1_`, `lora_te2_` for SDXL's two encoders). SD1/SD2 files use diffusers
  UNet paths (`down_blocks_0_attentions_0_...`), SDXL files the original LDM paths
  (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`). Text encoder paths are transformers
  CLIP paths under `text_model.`.
- diffusers/peft: the dotted diffusers / transformers path after `unet.` / `text_encoder.` /
  `text_encoder_2.` (older diffusers: attention-processor names such as
  `attn1.processor.to_q_lora`).

Rather than parse `_`-joined names back into paths (ambiguous: `to_q` vs `to.q`), every name
is brought to one "flat" form (`_` for `.`) and compared with the flat forms of the modules
that really exist in the loaded bundle, under each naming scheme. That table is built here.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

PATCHABLE = (nn.Linear, nn.Conv2d)

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_FIXED_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# attention-processor era diffusers names -> module names
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_TEXT = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def flat(name: str) -> str:
    return name.replace(".", "_")


def _per_block(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


def ldm_unet_name(name: str, config: Any) -> str | None:
    """The original (CompVis/SGM) path of a diffusers UNet module, or None if it has none."""
    for new, old in _FIXED_TO_LDM.items():
        if name == new or name.startswith(new + "."):
            return old + name[len(new) :]
    parts = name.split(".")
    n_down = len(config.down_block_types)
    layers = _per_block(config.layers_per_block, n_down)
    if parts[0] == "down_blocks" and len(parts) >= 4:
        i, kind = int(parts[1]), parts[2]
        start = 1 + sum(layers[k] + 1 for k in range(i))  # each earlier block: resnets + downsampler
        if kind == "downsamplers":
            if parts[4:5] != ["conv"]:
                return None
            return ".".join([f"input_blocks.{start + layers[i]}.0.op", *parts[5:]])
        return _block_item(f"input_blocks.{start + int(parts[3])}", kind, parts[4:])
    if parts[0] == "mid_block" and len(parts) >= 3:
        j, kind = int(parts[2]), parts[1]
        if kind == "resnets":
            return _block_item(f"middle_block.{2 * j}", kind, parts[3:], slot=False)
        if kind == "attentions" and j == 0:
            return ".".join(["middle_block.1", *parts[3:]])
        return None
    if parts[0] == "up_blocks" and len(parts) >= 4:
        i, kind = int(parts[1]), parts[2]
        up_layers = [n + 1 for n in reversed(layers)]
        start = sum(up_layers[:i])
        if kind == "upsamplers":
            if parts[4:5] != ["conv"]:
                return None
            has_attn = "CrossAttn" in config.up_block_types[i]
            return ".".join([f"output_blocks.{start + up_layers[i] - 1}.{2 if has_attn else 1}.conv", *parts[5:]])
        return _block_item(f"output_blocks.{start + int(parts[3])}", kind, parts[4:])
    return None


def _block_item(base: str, kind: str, rest: list[str], slot: bool = True) -> str | None:
    if kind == "resnets":
        if not rest or rest[0] not in _RESNET_TO_LDM:
            return None
        head = f"{base}.0" if slot else base
        return ".".join([head, _RESNET_TO_LDM[rest[0]], *rest[1:]])
    if kind == "attentions":
        return ".".join([f"{base}.1", *rest])
    return None


def unet_table(unet: nn.Module) -> dict[str, str]:
    """flat alias -> module path, for every patchable UNet module, under both naming schemes."""
    table: dict[str, str] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, PATCHABLE):
            continue
        table[flat(name)] = name
        ldm = ldm_unet_name(name, unet.config)
        if ldm is not None:
            table.setdefault(flat(ldm), name)
    return table


def text_canonical(name: str) -> str:
    """transformers 5 `CLIPTextModel` drops the `text_model.` level; LoRA files keep it."""
    return name if name.startswith(("text_model.", "text_projection")) else "text_model." + name


def text_table(model: nn.Module) -> dict[str, str]:
    """flat alias -> module path, for every patchable text-encoder module."""
    return {
        flat(text_canonical(name)): name for name, module in model.named_modules() if isinstance(module, PATCHABLE)
    }


_PROCESSOR_RE = re.compile(r"(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora$")


def diffusers_target(path: str, text: bool) -> str:
    """A dotted diffusers/peft module path (component prefix removed) -> flat alias."""
    m = _PROCESSOR_RE.search(path)
    if m:
        table = _PROCESSOR_TEXT if text else _PROCESSOR_UNET
        path = path[: m.start()] + "." + table[m.group(1)]
    path = path.replace(".processor.", ".")
    if text:
        path = text_canonical(path)
    return flat(path)
