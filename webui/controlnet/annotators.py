"""ControlNet preprocessors that need weights ("annotators"), loaded from the user's
`models/ControlNet/annotators/<name>/` folder, never downloaded.

Depth, for the depth ControlNets and T2I-Adapters: a depth-estimation model in transformers'
format (`config.json` + `model.safetensors`, as `save_pretrained` writes it and as the model pages
offer it), read with `AutoModelForDepthEstimation`:

- `depth_anything`, `depth_anything_v2`: Depth Anything (v1 or v2; e.g. the `-small-hf` ones);
- `depth_midas`: DPT (e.g. Intel's `dpt-hybrid-midas`, the model A1111's `depth_midas` is).

The map is relative inverse depth, stretched to 0-255: near is white, as the depth models were
trained on. A name whose folder is missing is listed all the same, and a unit that asks for it
is told which files to put where.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Kind:
    model_types: tuple[str, ...]  # what config.json's model_type may be
    multiple: int  # the input's sides are multiples of this (the backbone's patch or stride)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    example: str  # a model users can get, for the message when the folder is missing


_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
KINDS: dict[str, Kind] = {
    "depth_anything": Kind(("depth_anything",), 14, *_IMAGENET, "LiheYoung/depth-anything-small-hf"),
    "depth_anything_v2": Kind(("depth_anything",), 14, *_IMAGENET, "depth-anything/Depth-Anything-V2-Small-hf"),
    "depth_midas": Kind(("dpt",), 32, *_HALF, "Intel/dpt-hybrid-midas"),
}


def is_annotator(name: str) -> bool:
    return name.strip().lower() in KINDS


class Annotators:
    """The annotator models of one folder, loaded on first use and kept (one per name and device)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str], Any] = {}

    def problem(self, name: str) -> str | None:
        """Why `name` cannot run here (None: it can)."""
        key = name.strip().lower()
        folder = self.folder / key
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return None
        return (f"preprocessor {key} needs a depth model that is not there: put its config.json and "
                f"model.safetensors (e.g. from {KINDS[key].example}) in {folder}")

    def run(self, name: str, image: Image.Image, device: torch.device | str = "cpu") -> Image.Image:
        """The depth map of `image` at its own size (RGB, near = white)."""
        import torch

        key = name.strip().lower()
        if (why := self.problem(key)) is not None:
            raise ValueError(why)
        kind = KINDS[key]
        model = self._model(key, torch.device(device))
        rgb = image.convert("RGB")
        w, h = (max(kind.multiple, round(side / kind.multiple) * kind.multiple) for side in rgb.size)
        array = np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        array = (array - np.asarray(kind.mean, dtype=np.float32)) / np.asarray(kind.std, dtype=np.float32)
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(device=model.device, dtype=torch.float32)
        with torch.no_grad():
            depth = model(pixel_values=pixels).predicted_depth[:, None].float()
        depth = torch.nn.functional.interpolate(depth, size=(rgb.height, rgb.width), mode="bicubic",
                                                align_corners=False)[0, 0].cpu().numpy()
        low, high = float(depth.min()), float(depth.max())
        scaled = (depth - low) / (high - low) if high > low else np.zeros_like(depth)
        return Image.fromarray(np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")

    def _model(self, key: str, device: torch.device) -> Any:
        import torch
        from transformers import AutoConfig, AutoModelForDepthEstimation

        with self._lock:
            if (key, str(device)) not in self._loaded:
                folder = self.folder / key
                config = AutoConfig.from_pretrained(folder, local_files_only=True)
                if config.model_type not in KINDS[key].model_types:
                    raise ValueError(f"preprocessor {key}: {folder} holds a {config.model_type!r} model, not one of "
                                     f"{', '.join(KINDS[key].model_types)} (e.g. {KINDS[key].example})")
                model = AutoModelForDepthEstimation.from_pretrained(folder, local_files_only=True, use_safetensors=True)
                self._loaded[(key, str(device))] = model.to(device=device, dtype=torch.float32).eval()
            return self._loaded[(key, str(device))]
