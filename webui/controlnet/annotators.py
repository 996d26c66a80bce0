"""ControlNet preprocessors that need weights ("annotators"), loaded from the user's
`models/ControlNet/annotators/<name>/` folder, never downloaded.

Depth, for the depth ControlNets and T2I-Adapters: a depth-estimation model in transformers'
format (`config.json` + `model.safetensors`, as `save_pretrained` writes it and as the model pages
offer it), read with `AutoModelForDepthEstimation`:

- `depth_anything`, `depth_anything_v2`: Depth Anything (v1 or v2; e.g. the `-small-hf` ones);
- `depth_midas`: DPT (e.g. Intel's `dpt-hybrid-midas`, the model A1111's `depth_midas` is).

The map is relative inverse depth, stretched to 0-255: near is white, as the depth models were
trained on.

Normal map, for the normal ControlNets (`control_v11p_sd15_normalbae` takes it too, though it was
trained on BAE's maps): `normal_midas` from the `depth_midas` model's depth, as the first normal
ControlNet was trained: the depth's horizontal and vertical slopes (Sobel) and a constant depth
component of 2 pi make each pixel's normal, (x, y, z) into R, G, B; where the depth, stretched to
0-1, is below threshold A ("background", 0.4) the surface is taken as facing the viewer.

Edges and lines, from the single files the A1111 extension's users have (anywhere under the
annotators folder; the networks are in `webui.controlnet.annotator_nets`):

- `softedge_hed` (and its older name `hed`): `ControlNetHED.pth`;
- `lineart_realistic`: `sk_model.pth`; `lineart_coarse`: `sk_model2.pth`.

People's poses, for the openpose ControlNets: `openpose` (body keypoints) from `body_pose_model.pth`
(`webui.controlnet.openpose`).

A name whose files are missing is listed all the same, and a unit that asks for it is told which
files to put where.
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


@dataclass(frozen=True)
class Net:
    file: str  # the weight file's name, found anywhere under the annotators folder
    kind: str  # "hed" or "lineart" (webui.controlnet.annotator_nets)


NETS: dict[str, Net] = {
    "softedge_hed": Net("ControlNetHED.pth", "hed"),
    "hed": Net("ControlNetHED.pth", "hed"),
    "lineart_realistic": Net("sk_model.pth", "lineart"),
    "lineart_coarse": Net("sk_model2.pth", "lineart"),
    "openpose": Net("body_pose_model.pth", "openpose"),
}
# maps computed from a depth model's prediction: name -> the depth preprocessor whose model it reads
FROM_DEPTH = {"normal_midas": "depth_midas"}
NAMES = (*KINDS, *NETS, *FROM_DEPTH)
DEFAULTS = {"normal_midas": (0.4, 0.0)}  # threshold A / B where a preprocessor has them


def stretched(depth: np.ndarray) -> np.ndarray:
    """A depth map stretched to 0-1 (all 0 when it is flat)."""
    low, high = float(depth.min()), float(depth.max())
    return (depth - low) / (high - low) if high > low else np.zeros_like(depth)


def normal_from_depth(depth: np.ndarray, background: float) -> np.ndarray:
    """An RGB normal map (uint8, H x W x 3) of a relative inverse depth map as the model predicts it
    (near = large): the slopes give x and y, 2 pi the z component; where the depth stretched to 0-1
    is below `background` the normal is (0, 0, 1)."""
    import cv2

    depth = depth.astype(np.float32)
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    far = stretched(depth) < background
    x[far] = 0
    y[far] = 0
    normal = np.stack([x, y, np.full_like(x, 2 * np.pi)], axis=2)
    normal /= np.linalg.norm(normal, axis=2, keepdims=True)
    return np.clip(normal * 127.5 + 127.5, 0, 255).astype(np.uint8)


def is_annotator(name: str) -> bool:
    return name.strip().lower() in NAMES


class Annotators:
    """The annotator models of one folder, loaded on first use and kept (one per name and device)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._lock = threading.Lock()
        self._loaded: dict[tuple[str, str], Any] = {}

    def problem(self, name: str) -> str | None:
        """Why `name` cannot run here (None: it can)."""
        key = name.strip().lower()
        if key in NETS:
            if self._net_file(key) is not None:
                return None
            return (f"preprocessor {key} needs {NETS[key].file} (the file the A1111 ControlNet extension "
                    f"downloads for it): put it in {self.folder}")
        model = FROM_DEPTH.get(key, key)  # the depth model a map is made from
        folder = self.folder / model
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return None
        return (f"preprocessor {key} needs a depth model that is not there: put its config.json and "
                f"model.safetensors (e.g. from {KINDS[model].example}) in {folder}")

    def _net_file(self, key: str) -> Path | None:
        if not self.folder.is_dir():
            return None
        return next(iter(sorted(self.folder.rglob(NETS[key].file))), None)

    def run(self, name: str, image: Image.Image, device: torch.device | str = "cpu", a: float = -1) -> Image.Image:
        """The preprocessor's map of `image` at its own size (RGB); `a`: threshold A (-1: its default)."""
        import torch

        key = name.strip().lower()
        if (why := self.problem(key)) is not None:
            raise ValueError(why)
        if key in NETS:
            return self._run_net(key, image, torch.device(device))
        if key in FROM_DEPTH:
            depth = self._depth_array(FROM_DEPTH[key], image, torch.device(device))
            return Image.fromarray(normal_from_depth(depth, a if a >= 0 else DEFAULTS[key][0]))
        scaled = stretched(self._depth_array(key, image, torch.device(device)))
        return Image.fromarray(np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")

    def _run_net(self, key: str, image: Image.Image, device: torch.device) -> Image.Image:
        from webui.controlnet import annotator_nets as nets

        net = self._net(key, device)
        rgb = np.asarray(image.convert("RGB"))
        kind = NETS[key].kind
        if kind == "openpose":
            from webui.controlnet import openpose

            return Image.fromarray(openpose.pose(net, rgb, device))
        found = nets.hed_edges(net, rgb, device) if kind == "hed" else nets.lineart_lines(net, rgb, device)
        return Image.fromarray(found).convert("RGB")

    def _net(self, key: str, device: torch.device) -> Any:
        import torch

        from webui.controlnet import annotator_nets as nets
        from webui.models.errors import ModelError
        from webui.models.readers import read_state_dict

        spec = NETS[key]
        with self._lock:
            if (spec.file, str(device)) not in self._loaded:
                path = self._net_file(key)
                assert path is not None  # problem() said it is there
                try:
                    state = read_state_dict(path)
                except (OSError, ValueError, ModelError) as err:  # ModelError: a pickle refused as unsafe
                    raise ValueError(f"preprocessor {key}: cannot read {path.name}: {err}") from None
                state = {k.removeprefix("module."): v for k, v in state.items()}
                if spec.kind == "openpose":
                    from webui.controlnet.openpose import BodyPose

                    net = BodyPose()
                else:
                    net = nets.HED() if spec.kind == "hed" else nets.LineArt(nets.residual_blocks(state))
                try:
                    net.load_state_dict(state)
                except RuntimeError as err:
                    raise ValueError(f"preprocessor {key}: {path.name} is not the {spec.kind} network "
                                     f"({str(err).splitlines()[0]})") from None
                self._loaded[(spec.file, str(device))] = net.to(device=device, dtype=torch.float32).eval()
            return self._loaded[(spec.file, str(device))]

    def _depth_array(self, key: str, image: Image.Image, device: torch.device) -> np.ndarray:
        """The model's relative inverse depth of `image` at its own size (near = large)."""
        import torch

        kind = KINDS[key]
        model = self._model(key, device)
        rgb = image.convert("RGB")
        w, h = (max(kind.multiple, round(side / kind.multiple) * kind.multiple) for side in rgb.size)
        array = np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
        array = (array - np.asarray(kind.mean, dtype=np.float32)) / np.asarray(kind.std, dtype=np.float32)
        pixels = torch.from_numpy(array).permute(2, 0, 1)[None].to(device=model.device, dtype=torch.float32)
        with torch.no_grad():
            depth = model(pixel_values=pixels).predicted_depth[:, None].float()
        return torch.nn.functional.interpolate(depth, size=(rgb.height, rgb.width), mode="bicubic",
                                               align_corners=False)[0, 0].cpu().numpy()

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
