"""The ControlNet models in `models/ControlNet/`: listed as `name [hash8]` (the A1111 extension's
titles), found by title, name or file name, and loaded for the checkpoint in use.

A model is built on the loaded UNet's own configuration (`ControlNetModel.from_unet`: a
ControlNet copies its UNet's encoder), so no config file is needed: original-layout files
(lllyasviel's `control_model.*` keys) are converted with diffusers' converter, diffusers-layout
files load as they are; Stability's control-LoRAs (`lora_controlnet`) are the UNet's encoder with
their low-rank changes added. A file whose weights do not fit that configuration (a ControlNet for
another family) is refused by name, with the family it would need. T2I-Adapters in the same
folder are recognised by their keys and built by `webui.controlnet.adapter`.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from webui.controlnet import adapter, ip_adapter
from webui.controlnet.annotators import Annotators
from webui.controlnet.ip_adapter import ClipVision
from webui.models.errors import ModelError
from webui.models.hashing import HashCache

if TYPE_CHECKING:  # torch loads with the model side, not at start-up (the API lists models without it)
    import torch

    from webui.models.load import ModelBundle

SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
CACHE_SIZE = 2  # ControlNets kept loaded (each about a third of its UNet)
UNION_HEADS = 8  # the control-type transformer's heads in xinsir's union models (not in the weights)


@dataclass(frozen=True)
class ControlNetFile:
    name: str  # relative path without extension
    path: Path

    def title(self, hashes: HashCache) -> str:
        return f"{self.name} [{hashes.get(self.path, 'sha256')[:8]}]"


class ControlNetLibrary:
    def __init__(self, folder: Path, hashes: HashCache, clip_vision: Path | None = None) -> None:
        self.folder = Path(folder)
        self.hashes = hashes
        self.annotators = Annotators(self.folder / "annotators")  # the preprocessors' own weights
        self.clip_vision = ClipVision(clip_vision or self.folder.parent / "clip_vision")  # IP-Adapter's encoders
        self._loaded: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._lock = threading.Lock()

    def files(self) -> list[ControlNetFile]:
        if not self.folder.is_dir():
            return []
        found = [p for p in sorted(self.folder.rglob("*")) if p.suffix.lower() in SUFFIXES and p.is_file()
                 and "annotators" not in p.relative_to(self.folder).parts]
        return [ControlNetFile(p.relative_to(self.folder).with_suffix("").as_posix(), p) for p in found]

    def titles(self) -> list[str]:
        return [f.title(self.hashes) for f in self.files()]

    def find(self, query: str) -> ControlNetFile:
        """By title (`name [hash8]`), name or file name. Only names are compared: the hash in a
        title is not checked, so no file is hashed to find one (a renamed file keeps working)."""
        q = query.strip()
        bare = q.split(" [")[0] if q.endswith("]") else q
        for f in self.files():
            if q in (f.name, f.path.name, f.path.stem) or bare in (f.name, f.path.stem):
                return f
        names = ", ".join(f.name for f in self.files()) or f"none in {self.folder}"
        raise ModelError(f"ControlNet model {query!r} not found (available: {names})")

    def load(self, query: str, bundle: ModelBundle) -> torch.nn.Module:
        """The ControlNet `query` for `bundle`'s UNet, on its device and dtype (cached)."""
        f = self.find(query)
        key = (str(f.path.resolve()), id(bundle.unet))
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            model = self._build(f, bundle)
            self._loaded[key] = model
            while len(self._loaded) > CACHE_SIZE:
                self._loaded.popitem(last=False)
            return model

    @staticmethod
    def _build(f: ControlNetFile, bundle: ModelBundle) -> torch.nn.Module:
        import torch
        from diffusers import ControlNetModel

        from webui.models.readers import read_state_dict

        try:
            state = read_state_dict(f.path)
        except (OSError, ValueError) as err:
            raise ModelError(f"ControlNet {f.path.name}: cannot read it: {err}") from None
        if adapter.is_adapter(state):
            return adapter.build(state, f.name, bundle)
        if ip_adapter.is_ip_adapter(state):
            return ip_adapter.build(state, f.name, bundle)
        if "task_embedding" in state:  # xinsir's union models (diffusers layout): one model, several control types
            if getattr(bundle.unet.config, "addition_time_embed_dim", None) is None:
                raise ModelError(f"ControlNet {f.name} is a union model for SDXL; it does not fit {bundle.model_name} "
                                 f"({bundle.family.label})")
            return _fitted(_union_model(state, bundle), state, f, bundle)
        with torch.device("meta"):
            model = ControlNetModel.from_unet(bundle.unet, load_weights_from_unet=False)
        if "lora_controlnet" in state:  # Stability's control-LoRAs: the UNet's encoder plus low-rank changes
            return _fitted(model, _control_lora(state, dict(model.config), bundle), f, bundle)
        if any(k.startswith(("control_model.", "input_hint_block.")) for k in state):
            state = _from_original(state, dict(model.config))
        return _fitted(model, state, f, bundle)


def _from_original(original: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """lllyasviel's layout (keys with or without `control_model.`) in diffusers' names; keys it
    lacks are left out (diffusers' converter maps those present)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    prefixed = {k if k.startswith("control_model.") else f"control_model.{k}": v for k, v in original.items()}
    state = {k: v for k, v in convert_controlnet_checkpoint(prefixed, config).items() if v is not None}
    # SDXL's size/pooled-text embedding: diffusers' converter leaves it out
    for ldm, new in (("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")):
        for part in ("weight", "bias"):
            if f"control_model.{ldm}{part}" in prefixed:
                state[f"{new}{part}"] = prefixed[f"control_model.{ldm}{part}"]
    return state


def _control_lora(state: dict[str, torch.Tensor], config: dict[str, Any],
                  bundle: ModelBundle) -> dict[str, torch.Tensor]:
    """A control-LoRA (original layout, no prefix) as full ControlNet weights: a layer given as
    `.up` / `.down` is the UNet's own weight plus up @ down; a layer given whole is taken as it
    is; a layer the file leaves out is a copy of the UNet's (LoRAs change the UNet's weights in
    place for a job: the ControlNet must not share them)."""
    changes, whole = {}, {}
    for key, value in state.items():
        if key.endswith(".up"):
            down = state[f"{key[:-3]}.down"]
            delta = value.flatten(1).float() @ down.flatten(1).float()
            changes[f"{key[:-3]}.weight"] = delta.reshape(value.shape[0], *down.shape[1:])
        elif not key.endswith(".down") and key != "lora_controlnet":
            whole[key] = value
    unet = bundle.unet.state_dict()  # a ControlNet's encoder has its UNet's names
    out = {k: v.clone() for k, v in unet.items() if k.startswith(("conv_in.", "time_embedding.", "add_embedding.",
                                                                     "down_blocks.", "mid_block."))}
    for key, delta in _from_original(changes, config).items():
        if key not in unet or tuple(unet[key].shape) != tuple(delta.shape):
            raise ModelError(f"control-LoRA layer {key} does not fit {bundle.model_name} ({bundle.family.label})")
        out[key] = unet[key].float() + delta.to(unet[key].device)
    out.update(_from_original(whole, config))
    return out


def _union_model(state: dict[str, torch.Tensor], bundle: ModelBundle) -> torch.nn.Module:
    """An empty (meta) `ControlNetUnionModel` for `bundle`'s UNet, shaped as `state` says: how many
    control types, the hint encoder's widths, the type transformer's width and depth."""
    import torch
    from diffusers import ControlNetUnionModel

    hint = [state["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    i = 1
    while f"controlnet_cond_embedding.blocks.{i}.weight" in state:
        hint.append(state[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0])
        i += 2
    types, width = state["task_embedding"].shape
    layers = len({k.split(".")[1] for k in state if k.startswith("transformer_layes.")})
    with torch.device("meta"):
        model = ControlNetUnionModel.from_unet(bundle.unet, conditioning_embedding_out_channels=tuple(hint),
                                               load_weights_from_unet=False)
        settable = {k: v for k, v in model.config.items() if not k.startswith("_")}  # not diffusers' own notes
        config = {**settable, "num_control_type": int(types), "num_trans_channel": int(width),
                  "num_proj_channel": int(state["spatial_ch_projs.weight"].shape[0]), "num_trans_layer": layers,
                  "num_trans_head": UNION_HEADS if width % UNION_HEADS == 0 else 1}
        return ControlNetUnionModel.from_config(config)


def _fitted(model: torch.nn.Module, state: dict[str, torch.Tensor], f: ControlNetFile,
            bundle: ModelBundle) -> torch.nn.Module:
    """`model` (empty) with `state`'s weights on the bundle's device and dtype; a ModelError naming
    what does not fit when they are not for its family."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or wrong:
        what = f"{len(missing)} weights missing" if missing else f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}"
        raise ModelError(f"ControlNet {f.name} does not fit {bundle.model_name} ({bundle.family.label}): {what} "
                         "(a ControlNet is made for one model family)")
    rt = bundle.runtime  # weights go straight to the device and dtype: no float32 copy of the model on the way
    # each file tensor is let go once converted, so the file's weights and the model's are not all
    # in memory at once
    model.load_state_dict({k: state.pop(k).to(device=rt.device, dtype=rt.dtype) for k in expected}, assign=True)
    if rt.channels_last:  # the memory format its UNet runs in (a ControlNet is a copy of its encoder)
        from webui.runtime.compile import to_channels_last

        to_channels_last(model)
    return model.eval().requires_grad_(False)
