"""Face restoration (A1111's "Restore faces", and the Extras' GFPGAN / CodeFormer visibility):
each face found is cropped square with a margin, restored at the model's 512 px by GFPGAN or
CodeFormer, scaled back and blended into the image through a feathered mask, so pixels away from
the faces never change.

Models: the newest file in `models/GFPGAN/` (GFPGANv1.3 / v1.4) and in `models/Codeformer/`,
loaded through spandrel (CodeFormer needs the `codeformer` extra, `spandrel_extra_arches`, under
a non-commercial licence). Both are called as their authors' code calls them: input and output in
[-1, 1], the StyleGAN noise fixed (GFPGAN: `randomize_noise=False`), so a seed gives one image.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from webui.faces.detect import Box, FaceDetector, FolderFaces, HaarFaces
from webui.models.errors import ModelError
from webui.models.readers import read_state_dict
from webui.upscale.spandrel_arch import Spandrel, describe

log = logging.getLogger(__name__)

RESTORERS = MappingProxyType({"GFPGAN": "GFPGAN", "CodeFormer": "Codeformer"})  # name -> folder under models/
SUFFIXES = (".pth", ".safetensors", ".pt")
SIZE = 512  # both restore 512 x 512 faces
MARGIN = 1.6  # the square crop's side, in face box sides: the chin, the hair line and some context


@dataclass(frozen=True)
class Restorer:
    name: str  # "GFPGAN" or "CodeFormer"
    folder: Path
    path: Path | None  # the weights file in use (None: the folder holds none)


def _crop_box(box: Box, size: tuple[int, int]) -> Box:
    """A square around `box`, MARGIN times its larger side, inside the image."""
    x0, y0, x1, y1 = box
    w, h = size
    side = min(int(max(x1 - x0, y1 - y0) * MARGIN), w, h)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left = min(max(cx - side // 2, 0), w - side)
    top = min(max(cy - side // 2, 0), h - side)
    return left, top, left + side, top + side


def _feather(side: int) -> Image.Image:
    """A mask over a square crop: full inside, fading to nothing towards its border."""
    mask = Image.new("L", (side, side), 0)
    inset = max(1, side // 10)
    ImageDraw.Draw(mask).rectangle((inset, inset, side - 1 - inset, side - 1 - inset), fill=255)
    return mask.filter(ImageFilter.GaussianBlur(max(1, side // 20)))


class FaceRestorers:
    """GFPGAN and CodeFormer from the models folder, each loaded on first use (one kept)."""

    def __init__(self, models_dir: Path, spandrel: Spandrel, detector: FaceDetector | None = None) -> None:
        self.models_dir = Path(models_dir)
        self.spandrel = spandrel
        self.detector: FaceDetector = detector or FolderFaces(self.models_dir / "facedetect", HaarFaces())
        self._lock = threading.Lock()
        self._loaded: tuple[tuple[str, int, str], Any] | None = None  # ((path, mtime, device), descriptor)

    def restorers(self) -> list[Restorer]:
        out = []
        for name, folder in RESTORERS.items():
            root = self.models_dir / folder
            files = sorted((p for p in root.glob("*") if p.suffix.lower() in SUFFIXES and p.is_file()),
                           key=lambda p: p.name.lower()) if root.is_dir() else []
            out.append(Restorer(name, root, files[-1] if files else None))  # v1.4 sorts after v1.3
        return out

    def names(self) -> list[str]:
        """The restorers whose weights are present."""
        return [r.name for r in self.restorers() if r.path is not None]

    def get(self, name: str) -> Restorer:
        """A restorer that can run here: its weights present and spandrel importable (ModelError
        saying what is missing otherwise)."""
        found = next((r for r in self.restorers() if r.name.lower() == (name or "").lower()), None)
        if found is None:
            raise ModelError(f"unknown face restorer {name!r}: choose GFPGAN or CodeFormer")
        if found.path is None:
            raise ModelError(f"no {found.name} weights: put {found.name} .pth or .safetensors in {found.folder}")
        self._spandrel()
        return found

    def _spandrel(self) -> Any:
        spandrel = self.spandrel.module()
        if spandrel is None:
            raise ModelError(f"face restoration needs spandrel: {self.spandrel.problem}")
        return spandrel

    def pick(self, preferred: str) -> str:
        """`preferred` when its weights are here, else the other restorer that is; ModelError
        saying what to put where when neither is."""
        present = self.names()
        if not present:
            folders = " or ".join(f"{r.name} weights in {r.folder}" for r in self.restorers())
            raise ModelError(f"restore_faces: no face restorer here: put {folders} (CodeFormer also needs the "
                             "codeformer extra)")
        self._spandrel()
        if preferred in present:
            return preferred
        log.info("face restorer %s has no weights here: using %s", preferred, present[0])
        return present[0]

    def plan(self, request: Any, settings: Any) -> tuple[str, float] | None:
        """The restorer and CodeFormer weight a generation asks for (a `GenerationRequest`'s own
        fields, else the `Settings`'), None when it restores no faces; ModelError when none can run."""
        wanted = request.restore_faces if request.restore_faces is not None else settings.face_restoration
        if not wanted:
            return None
        name = self.pick(request.face_restoration_model or settings.face_restoration_model)
        weight = request.code_former_weight if request.code_former_weight is not None else settings.code_former_weight
        return name, weight

    def _model(self, restorer: Restorer, device: torch.device) -> Any:
        spandrel = self._spandrel()
        assert restorer.path is not None
        key = (str(restorer.path), restorer.path.stat().st_mtime_ns, str(device))
        with self._lock:
            if self._loaded is None or self._loaded[0] != key:
                self._loaded = None  # the previous model goes before the next one loads
                sd = read_state_dict(restorer.path, lambda _k, dt: torch.float32 if dt.is_floating_point else dt)
                descriptor = describe(spandrel, sd, restorer.path)
                if descriptor.purpose != "FaceSR":
                    raise ModelError(f"a {descriptor.architecture.name} model, not a face restorer", restorer.path)
                descriptor.model.eval().to(device)
                self._loaded = (key, descriptor)
                log.info("loaded face restorer %s (%s) on %s", restorer.name, restorer.path.name, device)
            return self._loaded[1]

    def unload(self) -> None:
        with self._lock:
            self._loaded = None

    def restore(self, image: Image.Image, name: str, *, visibility: float = 1.0, weight: float = 0.5,
                device: torch.device | str = "cpu", boxes: list[Box] | None = None) -> Image.Image:
        """`image` with each face restored by `name` and blended in at `visibility` (0-1);
        `weight`: CodeFormer's fidelity (0: most restored, 1: closest to the input). `boxes`:
        the faces, when the caller found them (else the detector looks)."""
        if visibility <= 0:
            return image
        restorer = self.get(name)
        device = torch.device(device)
        faces = self.detector(image) if boxes is None else boxes
        if not faces:
            return image
        descriptor = self._model(restorer, device)
        out = image.convert("RGB")
        for box in faces:
            crop_box = _crop_box(box, out.size)
            side = crop_box[2] - crop_box[0]
            if side < 8:
                continue
            face = out.crop(crop_box).resize((SIZE, SIZE), Image.Resampling.LANCZOS)
            restored = self._run(descriptor, face, weight, device).resize((side, side), Image.Resampling.LANCZOS)
            blended = Image.blend(out.crop(crop_box), restored, min(1.0, visibility))
            out.paste(blended, crop_box[:2], _feather(side))
        return out

    @staticmethod
    def _run(descriptor: Any, face: Image.Image, weight: float, device: torch.device) -> Image.Image:
        x = torch.from_numpy(np.asarray(face, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None].to(device)
        with torch.inference_mode():
            if descriptor.architecture.name == "CodeFormer":
                y = descriptor.model(x, weight=weight)[0]
            else:
                y = descriptor.model(x, return_rgb=False, randomize_noise=False)[0]
        y = ((y[0].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(y)
